"""``nicsim serve --nice N``: the backend yields the CPU to the guests on a host with too few cores.

Under TCG each busy guest keeps a core busy with its vCPU, and on a host with fewer cores than busy
vCPUs plus nicsim, every cycle nicsim spends comes out of a guest's. Most of it is well spent, but
not all: a guest that floods one that cannot keep up (64-byte frames from A's pktgen to B) makes
nicsim take and drop A's frames as fast as A sends them, on B's time. At a lower priority nicsim
takes A's frames only when the guests leave it a core: A's ring fills and paces A's driver, and B's
vCPU gets the core (two guests on two cores: B received 82-83k frames a second against 55-62k, and
nicsim used 15 % of a core against 38-39 %).

The cost is latency under contention: with every core busy a low-priority nicsim waits for its turn.
So it is off by default. ``N`` is nice(1)'s: 0 (unchanged) to 19 (yield the most).

Linux's autogroups (``/proc/sys/kernel/sched_autogroup_enabled``) share the CPU between sessions
first and between a session's processes after, so a nice value alone only ranks nicsim against its
own session. A nicsim that leads its own session (``setsid``, or a launcher's ``start_new_session``,
as ``nicsim bench`` starts it) has an autogroup of its own, and its nice is set there too; a nicsim
started from a shell shares that shell's autogroup, which is left alone.
"""

from __future__ import annotations

import os
from pathlib import Path

MAX_NICE = 19
AUTOGROUP = Path("/proc/self/autogroup")


def check_nice(value: int) -> None:
    """ValueError unless ``value`` is a nice value nicsim may take (it only ever lowers its priority)."""
    if not 0 <= value <= MAX_NICE:
        raise ValueError(f"--nice {value}: use 0 (unchanged) to {MAX_NICE} (yield the most)")


def lower_priority(value: int, *, autogroup: Path = AUTOGROUP) -> list[str]:
    """Run this process at nice ``value`` (its threads started later inherit it), and its autogroup
    too when it leads its own session; what was set, in words."""
    check_nice(value)
    if value == 0:
        return []
    os.setpriority(os.PRIO_PROCESS, 0, value)
    done = [f"nice {value}"]
    if os.getsid(0) == os.getpid() and autogroup.exists():
        try:
            autogroup.write_text(str(value))
        except OSError as err:  # kernel without autogroups at run time: the nice value alone holds
            done.append(f"its autogroup not ({err.strerror})")
        else:
            done.append(f"its own autogroup at nice {value}")
    return done
