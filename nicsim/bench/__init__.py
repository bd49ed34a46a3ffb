"""``nicsim bench``: boot a test guest and measure its network throughput, backends side by side.

Modules: ``matrix`` (cells, repetitions, min/median/max; pure), ``procstat`` (CPU time from /proc),
``backend`` (the Backend interface and child-process plumbing), one module per backend — ``serve``
(nicsim), ``tap`` (QEMU's tap in a namespace, with ``blaster`` as its UDP sender), ``testpmd`` (DPDK),
``dpdk_tap`` (DPDK forwarding to a TAP: latency rows) —, the modes ``vm`` (one guest per run, the
measured window), ``backend_only`` (DPDK's virtio-user as the frontend, no VM) and ``pair``/``pair_run``
(``--guests 2``: guest to guest, nicsim's switch against a Linux bridge), ``runner`` (what both modes
share: samples, the loop over the plan, the working directory), ``counts`` (the guest's count against
the backend's own, the negotiated features), ``command`` (one invocation of either mode, from options to
exit code), ``report`` (table, JSON, plot), ``stream`` (``--json-stream``), ``baseline`` (``--baseline``
and ``--max-regress``), ``progress`` (stderr) and ``sysinfo`` (versions and machine). The options are
defined in ``nicsim.cli.bench``.
"""

from .backend import Backend, BenchError, BenchRun, RunContext
from .dpdk_tap import DpdkTapBackend
from .matrix import Cell, Direction, Plan, Summary, build_plan, ratio
from .runner import CellResult, Sample
from .serve import (
    NicsimBackend,
    NicsimBusyPollBackend,
    NicsimCountOnlyBackend,
    NicsimMergeableBackend,
    NicsimNoLaneBackend,
)
from .tap import QemuTapBackend
from .testpmd import DpdkBackend
from .vm import VmRunner

# name -> the class that benchmarks it under a guest (the backend-only mode has its own names,
# backend_only.BACKEND_ONLY_NAMES: it drives the backends itself, without these classes).
BACKEND_CLASSES: dict[str, type[Backend]] = {
    "nicsim": NicsimBackend,
    "qemu-tap": QemuTapBackend,
    "dpdk": DpdkBackend,
    "nicsim-count-only": NicsimCountOnlyBackend,  # guest TX without reading the bytes: a labelled row
    "nicsim-busy-poll": NicsimBusyPollBackend,  # polls its core as DPDK does: a labelled row
    "nicsim-mergeable": NicsimMergeableBackend,  # guest RX in the peers' mergeable mode: a labelled row
    "nicsim-no-lane": NicsimNoLaneBackend,  # requests through the event loop, no request lane: labelled
    "dpdk-tap": DpdkTapBackend,  # latency rows: testpmd forwarding to a TAP, as nicsim and qemu-tap are
}
PEERS = ("qemu-tap", "dpdk")
LATENCY_PEERS = ("dpdk-tap",)  # added to --peers when the plan has latency rows

__all__ = [
    "BACKEND_CLASSES",
    "LATENCY_PEERS",
    "PEERS",
    "Backend",
    "BenchError",
    "BenchRun",
    "Cell",
    "CellResult",
    "Direction",
    "DpdkBackend",
    "DpdkTapBackend",
    "NicsimBackend",
    "NicsimBusyPollBackend",
    "NicsimCountOnlyBackend",
    "Plan",
    "QemuTapBackend",
    "RunContext",
    "Sample",
    "Summary",
    "VmRunner",
    "build_plan",
    "ratio",
]
