"""A whole lab from a dict in the topology-file format: two guests, a link that loses a fifth of what
one receives, and the checks nicsim evaluates. The same dict as TOML runs with `nicsim lab run`."""

from nicsim.lab.report import render_table

LAB = {
    "switches": {"lan": {"capture": "lan.pcapng"}},
    "guests": {"h1": {"switch": "lan"}, "h2": {"switch": "lan"}},
    "links": [{"guest": "h2", "rx": "loss=20% seed=1"}],
    "checks": [
        {"kind": "ping", "from": "h1", "to": "h2", "count": 20, "max_loss_pct": 50},
        {"kind": "capture", "switch": "lan", "filter": "icmp", "min": 20},
    ],
}


async def test_a_lossy_lab_passes_its_checks(nicsim_lab):
    report = await nicsim_lab(LAB)
    assert report.passed, render_table(report)
    ping = report.outcomes[0]
    assert 0 < ping.value < 50  # some loss, as the link was told, but not all
