"""The pytest plugin users get with ``pip install nicsim`` (registered as ``pytest11`` entry point).

Fixtures, all safe under pytest-xdist (``pytest -n auto``, and remote ``--tx`` workers): every name,
socket path, namespace, MAC and address they hand out is unique per worker and per process
(:mod:`nicsim.testing.unique`), and everything they start is stopped by pid at teardown, pass or fail.

``nicsim_image``   (session) the guest kernel + initramfs, built on first use and cached on disk; workers
                   that start together build it once (a file lock, :mod:`nicsim.testing.image`).
``nicsim_server``  factory: ``nicsim_server("a", "b", port="switch", impair=["b:rx:loss=20% seed=1"],
                   pcap=True)`` starts ``nicsim serve`` on sockets named ``a`` and ``b`` and returns a
                   :class:`~nicsim.testing.ServerProcess` (``.socket(name)``, ``.stats()``,
                   ``await .wait_stats(pred)``, ``.pcap``, ``.stop()``).
``nicsim_vm``      (async; needs pytest-asyncio) factory: ``nicsim_vm(server.socket("a"), *workloads)``
                   returns a ``qemu.testvm.TestVM`` with a unique name and MAC; ``await nicsim_vm.boot(b, a)``
                   launches guests in order, each up before the next; all are closed at teardown.
``nicsim_netns``   factory of ``qemu.testvm.Netns`` (``lo`` up), deleted at teardown with what runs in it.
``nicsim_ids``     (session) this worker's :class:`~nicsim.testing.WorkerIds` (``.mac()``, ``.address(n)``,
                   ``.name(base)``), for anything else a test must name uniquely.

The ``vm`` marker is registered here, and a test that uses ``nicsim_vm`` or ``nicsim_image`` is marked
``vm`` automatically, so ``-m "not vm"`` leaves out every test that boots a guest. Options:
``--nicsim-accel`` (auto, kvm or tcg) and ``--nicsim-cache`` (the image cache directory). When a test
fails, its report gets a "nicsim" section naming the guests' console logs (with their last lines), the
server's capture, stats file and output, all kept under the test's ``tmp_path``.

``nicsim_lab``     (async) factory: ``report = await nicsim_lab(topology)`` runs a whole lab once, from
                   a topology file or the same thing as a dict (:mod:`nicsim.lab`), under a name
                   unique to this worker, and returns its :class:`~nicsim.lab.run.LabReport`
                   (``.passed``, ``.outcomes``, ``.results``; ``nicsim.lab.report.render_table`` makes
                   the table a person reads). The
                   lab's consoles, captures and logs end up in the test's ``tmp_path``.
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from nicsim.testing import ServerProcess, VMFactory, WorkerIds, locked_build_image

try:
    import pytest_asyncio
except ImportError:  # the plugin loads in every pytest run; without pytest-asyncio only nicsim_vm is lost
    pytest_asyncio = None  # type: ignore[assignment]

VM_FIXTURES = ("nicsim_vm", "nicsim_image", "nicsim_lab")
TAIL_LINES = 8
_artifacts = pytest.StashKey[list[tuple[str, Path]]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("nicsim", "nicsim test guests")
    group.addoption(
        "--nicsim-accel", default="auto", choices=("auto", "kvm", "tcg"),
        help="accelerator of the guests nicsim_vm makes (default: auto, KVM when usable)",
    )  # fmt: skip
    group.addoption(
        "--nicsim-cache", default=None, metavar="DIR",
        help="guest image cache (default: $NICSIM_CACHE/images or ~/.cache/nicsim/images)",
    )  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "vm: boots a real QEMU guest (needs qemu-system-x86 and the nicsim guest image)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in VM_FIXTURES):
            item.add_marker(pytest.mark.vm)


def record_artifact(request: pytest.FixtureRequest, label: str, path: Path) -> None:
    """Name ``path`` in the failure report of the test ``request`` belongs to."""
    request.node.stash.setdefault(_artifacts, []).append((label, path))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    artifacts = item.stash.get(_artifacts, [])
    if report.failed and artifacts:
        report.sections.append(("nicsim", _describe(artifacts)))
    return report


def _describe(artifacts: list[tuple[str, Path]]) -> str:
    lines = []
    for label, path in artifacts:
        lines.append(f"{label}: {path}" + ("" if path.exists() else " (not written)"))
        if path.suffix in (".log",) and path.exists():
            tail = path.read_text(errors="replace").splitlines()[-TAIL_LINES:]
            lines.extend(f"    {line}" for line in tail)
    return "\n".join(lines)


# ---- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def nicsim_ids() -> WorkerIds:
    """This worker's source of unique names, MACs (``02:...``) and addresses (``10.128+w.N.0/24``)."""
    return WorkerIds()


@pytest.fixture(scope="session")
def nicsim_image(pytestconfig: pytest.Config) -> Any:
    """The guest image (``GuestImage``: ``.kernel``, ``.initrd``, ``.manifest``), built once, cached."""
    cache = pytestconfig.getoption("nicsim_cache")
    return locked_build_image(Path(cache) if cache else None)


@pytest.fixture
def nicsim_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: ``nicsim_server(*socket_names, port=None, impair=(), pcap=False, args=())`` starts
    ``nicsim serve`` (see :class:`~nicsim.testing.ServerProcess`); each is stopped at teardown."""
    made: list[ServerProcess] = []

    def start(*names: str, **options: Any) -> ServerProcess:
        out = tmp_path / f"nicsim-server{len(made) + 1}"
        server = ServerProcess(names, out_dir=out, **options)
        made.append(server)
        for label, path in (("capture", server.pcap), ("stats", server.stats_path),
                            ("server output", server.log_path)):  # fmt: skip
            if path is not None:
                record_artifact(request, f"{label} of server {len(made)}", path)
        return server.start()

    try:
        yield start
    finally:
        for server in reversed(made):
            server.stop()


@pytest.fixture
def nicsim_netns(nicsim_ids: WorkerIds) -> Iterator[Callable[[], Any]]:
    """Factory of fresh network namespaces (``qemu.testvm.Netns``, ``lo`` up), named
    ``nicsim-<worker>-<pid>-<n>``; each is deleted at teardown with its TAPs and the processes
    its ``popen`` started (needs root, as ``ip netns add`` does)."""
    from qemu.testvm import Netns

    made: list[Netns] = []

    def make() -> Netns:
        ns = Netns.create(f"nicsim-{nicsim_ids.worker}")
        made.append(ns)
        return ns

    try:
        yield make
    finally:
        for ns in reversed(made):
            ns.close()


def _vm_factory(request: pytest.FixtureRequest, image: Any, ids: WorkerIds, tmp_path: Path) -> VMFactory:
    accel = str(request.config.getoption("nicsim_accel"))
    return VMFactory(image, ids, tmp_path, accel=accel,
                     record=lambda label, path: record_artifact(request, label, path))  # fmt: skip


if pytest_asyncio is not None:

    @pytest_asyncio.fixture
    async def nicsim_vm(
        request: pytest.FixtureRequest,
        nicsim_image: Any,
        nicsim_ids: WorkerIds,
        nicsim_server: Any,
        nicsim_netns: Any,
        tmp_path: Path,
    ) -> AsyncIterator[VMFactory]:
        """Factory of test guests (:class:`~nicsim.testing.VMFactory`): ``nicsim_vm(socket, *workloads,
        name=, guest_ip=, **TestVM options)``; ``await nicsim_vm.boot(*vms)``; all closed at teardown,
        before the servers and namespaces of this test go."""
        factory = _vm_factory(request, nicsim_image, nicsim_ids, tmp_path)
        try:
            yield factory
        finally:
            await factory.close()

    @pytest_asyncio.fixture
    async def nicsim_lab(
        request: pytest.FixtureRequest, nicsim_image: Any, nicsim_ids: WorkerIds, tmp_path: Path
    ) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
        """Factory: ``await nicsim_lab(topology, timeout=None)`` runs the lab (a topology file's path,
        or a dict in its format) once and returns the report; everything it started is stopped
        before it returns."""
        runs = itertools.count(1)

        async def run(topology: Mapping[str, Any] | str | Path, *, timeout: float | None = None) -> Any:
            from nicsim.lab import plan as planning
            from nicsim.lab import topology as topo
            from nicsim.lab.run import run_lab

            if isinstance(topology, Mapping):
                top = topo.from_dict(topology, source=f"{request.node.name} (dict)", base_dir=tmp_path)
            else:
                top = topo.load(topology)
            top = topo.renamed(top, nicsim_ids.name("lab"))
            if timeout is not None:
                top = dataclasses.replace(top, timeout=timeout)
            n = next(runs)
            # Sockets need a short path (108 bytes); the results move to tmp_path once the lab is down.
            run_dir = Path(tempfile.mkdtemp(prefix=f"nicsim-{nicsim_ids.tag}-"))
            report = await run_lab(planning.plan(top, run_dir), image=nicsim_image, progress=None)
            kept = tmp_path / f"lab{n}"
            shutil.move(run_dir, kept)
            for g in report.plan.guests:
                record_artifact(request, f"console of lab guest {g}", kept / g / "console.log")
            for log in sorted(kept.glob("switch-*.log")):
                record_artifact(request, f"lab {log.stem}", log)
            return report

        yield run

else:

    @pytest.fixture
    def nicsim_vm() -> None:
        """Needs pytest-asyncio (guests are driven with asyncio): pip install pytest-asyncio."""
        pytest.fail("the nicsim_vm fixture needs pytest-asyncio: pip install pytest-asyncio", pytrace=False)
