"""How fast this host runs Python right now: a fixed loop's time, taken before and after a run.

A host that is itself a virtual machine has spells: on this project's machine everything ran at half
speed for hours (QEMU tap's lone ping 0.32 ms one day, 0.63-0.88 ms the next) and a spell costs
nicsim's Python more than a peer's C (tcp-tx 1.17x QEMU's tap on a fast spell, 0.93x on a slow one,
with the same code). So a run says which spell it saw: the best of a few runs of a fixed pure-Python
loop (what nicsim's hot path mostly is), before the first cell and after the last. Two runs compare
only when these agree; one run whose before and after differ much crossed spells.
"""

from __future__ import annotations

import time

LOOP_STEPS = 1_000_000
REPEAT = 5


def python_loop_ms(steps: int = LOOP_STEPS, repeat: int = REPEAT) -> float:
    """Milliseconds the fastest of ``repeat`` runs of a ``steps``-step Python loop took."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        total = 0
        for i in range(steps):
            total += i & 7
        best = min(best, time.perf_counter() - started)
    return best * 1000
