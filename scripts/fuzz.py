"""Run every fuzz test with a much larger Hypothesis budget and say how many cases each one ran.

CI runs the fuzz tests with a small budget (each file well under 20 seconds). Before a release, after
touching the ring walker, the vhost-user parser, the packet pool or the inflight recovery, run them
for longer::

    python scripts/fuzz.py                    # 20000 examples per test
    python scripts/fuzz.py --examples 2000    # a quicker pass
    python scripts/fuzz.py -k parser -x       # only the parser fuzzers, stop at the first failure

It runs pytest in-process on the fuzz test files (the ring walkers, split and packed, and random
packed driver/device sessions, the vhost-user parser and
connection, the packet pool's model-based test and the inflight crash schedules), gives every
Hypothesis test ``--examples`` examples with no deadline, and prints, per test, the number of cases
it ran (calls of the test body, shrinking included; steps are not counted for state machines, runs
are) and the time it took. A failure prints Hypothesis's minimal example as usual; the exit status is
pytest's.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FUZZ_FILES = (
    "tests/test_fuzz_rings.py",
    "tests/test_fuzz_packed.py",
    "tests/test_packed.py",
    "tests/test_fuzz_parser.py",
    "tests/test_vhost_fuzz.py",
    "tests/test_pool.py",
    "tests/test_inflight.py",
)


class FuzzBudget:
    """pytest plugin: keep only Hypothesis tests, raise their budget, count their cases and time."""

    def __init__(self, examples: int) -> None:
        self.examples = examples
        self.cases: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.outcomes: dict[str, str] = {}
        self._machines: set[type] = set()

    def _counted(self, nodeid: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            self.cases[nodeid] += 1
            return fn(*args, **kwargs)

        return run

    def pytest_collection_modifyitems(self, config: Any, items: list[Any]) -> None:
        from hypothesis import settings
        from hypothesis.stateful import RuleBasedStateMachine

        keep, drop = [], []
        for item in items:
            fn = getattr(item, "obj", None)
            cls = getattr(item, "cls", None)
            if fn is not None and hasattr(fn, "hypothesis"):
                # The budget itself comes from NICSIM_FUZZ_EXAMPLES, which every fuzz test reads;
                # here we only count the calls of the test body (Hypothesis's ``inner_test`` hook).
                fn.hypothesis.inner_test = self._counted(item.nodeid, fn.hypothesis.inner_test)
            elif cls is not None and isinstance(getattr(cls, "settings", None), settings):
                for machine in vars(item.module).values():
                    if (
                        isinstance(machine, type)
                        and issubclass(machine, RuleBasedStateMachine)
                        and machine is not RuleBasedStateMachine
                        and machine not in self._machines
                    ):
                        # One machine per run: count constructions.
                        self._machines.add(machine)
                        machine.__init__ = self._counted(item.nodeid, machine.__init__)  # type: ignore[method-assign]
            else:
                drop.append(item)
                continue
            self.cases[item.nodeid] = 0
            keep.append(item)
        items[:] = keep
        config.hook.pytest_deselected(items=drop)

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.nodeid in self.cases and (report.when == "call" or report.outcome != "passed"):
            self.seconds[report.nodeid] = self.seconds.get(report.nodeid, 0.0) + report.duration
            if report.when == "call" or report.outcome == "failed":
                self.outcomes[report.nodeid] = report.outcome

    def summary(self) -> str:
        lines = [f"{'cases':>9} {'seconds':>8}  outcome  test"]
        for nodeid, n in self.cases.items():
            outcome = self.outcomes.get(nodeid, "not run")
            lines.append(f"{n:>9} {self.seconds.get(nodeid, 0.0):>8.1f}  {outcome:<7}  {nodeid}")
        total = sum(self.cases.values())
        lines.append(f"{total:>9} {sum(self.seconds.values()):>8.1f}  total ({len(self.cases)} tests)")
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=20000, help="Hypothesis examples per test")
    parser.add_argument("-k", dest="keyword", help="only tests matching this pytest -k expression")
    parser.add_argument("-x", action="store_true", help="stop at the first failure")
    args = parser.parse_args(argv)
    os.environ["NICSIM_FUZZ_EXAMPLES"] = str(args.examples)  # read by the fuzz test modules
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    import pytest

    plugin = FuzzBudget(args.examples)
    pytest_args = ["-q", "-p", "no:cacheprovider", *FUZZ_FILES]
    if args.keyword:
        pytest_args += ["-k", args.keyword]
    if args.x:
        pytest_args.append("-x")
    start = time.monotonic()
    status = pytest.main(pytest_args, plugins=[plugin])
    print()
    print(f"Hypothesis budget: {args.examples} examples per test; wall time {time.monotonic() - start:.1f} s")
    print(plugin.summary())
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
