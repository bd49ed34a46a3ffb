"""The suite's deliberately broken variant: it expects no loss on the lossy link, so it must fail.

Not collected with the rest (its name does not start with ``test_``); run it by name:
``pytest examples/broken_lossy_link.py``. nicsim's own suite does, and checks that it fails.
"""

from __future__ import annotations

from test_lossy_link import COUNT, ping_b_from_a


async def test_a_lossy_link_loses_nothing(nicsim_server, nicsim_vm) -> None:
    ping, _ = await ping_b_from_a(nicsim_server, nicsim_vm, impair=["b:rx:loss=20% seed=1"])
    assert ping["received"] == COUNT, "wrong on purpose: 20 % of the frames to B are lost"
