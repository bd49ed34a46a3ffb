"""Real guests under QEMU: the ``qemu.testvm`` harness boots the guest image and drives it.

Every network test gives the guest a TAP inside a namespace the test created (10.0.2.2/24 on the
namespace's end), so no packet leaves that namespace. Each boot is kept short (a few workloads),
and every test checks that no QEMU outlives it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qemu.testvm import InvalidOptionError, Netns, Runstate, TapNic, TestVM, VMLaunchError, Workload

pytestmark = pytest.mark.vm

BOOT_TIMEOUT = 120.0  # a deadline for failure under a loaded TCG host, not a performance claim


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def tap_namespace(netns: Callable[[], Netns]) -> Netns:
    ns = netns()
    ns.add_tap("tap0", "10.0.2.2/24")
    return ns


async def test_ping_to_the_namespace_end_of_a_tap_loses_nothing(
    guest_image: Any, netns: Callable[[], Netns]
) -> None:
    ns = tap_namespace(netns)
    async with TestVM(
        kernel=guest_image.kernel,
        initrd=guest_image.initrd,
        nic=TapNic(ifname="tap0"),
        netns=ns.name,
        workloads=[Workload("ping", target="10.0.2.2", count=3)],
    ) as vm:
        (result,) = await vm.results(BOOT_TIMEOUT)
        pid = vm.pid
    assert result.workload == "ping" and result.ok, result
    assert result["loss_pct"] == 0
    assert result["received"] == 3
    assert not pid_alive(pid)


async def test_iperf3_client_reports_numbers_against_a_server_in_the_namespace(
    guest_image: Any, netns: Callable[[], Netns]
) -> None:
    ns = tap_namespace(netns)
    server = ns.popen("iperf3", "-s", "-1", "-B", "10.0.2.2", stdout=subprocess.DEVNULL)
    async with TestVM(
        kernel=guest_image.kernel,
        initrd=guest_image.initrd,
        nic=TapNic(ifname="tap0"),
        netns=ns.name,
        workloads=[Workload("iperf3-client", server="10.0.2.2", time=2, proto="tcp", reverse=0)],
    ) as vm:
        (result,) = await vm.results(BOOT_TIMEOUT)
    assert result.workload == "iperf3-client" and result.ok, result
    for key in ("sent_bps", "received_bps", "sent_bytes", "received_bytes"):
        assert isinstance(result[key], int | float), (key, result.data)
    assert result["received_bytes"] > 0 and result["received_bps"] > 0
    # iperf3 -s -1 serves one test and exits; the fixture would kill it by pid otherwise.
    assert server.wait() == 0


async def test_sockperf_ping_pong_reports_a_transaction_rate_against_a_server_in_the_namespace(
    guest_image: Any, netns: Callable[[], Netns]
) -> None:
    ns = tap_namespace(netns)
    # sockperf's server never exits by itself: the fixture's close kills it by pid.
    ns.popen("sockperf", "server", "-i", "10.0.2.2", "-p", "11111", stdout=subprocess.DEVNULL)
    async with TestVM(
        kernel=guest_image.kernel,
        initrd=guest_image.initrd,
        nic=TapNic(ifname="tap0"),
        netns=ns.name,
        workloads=[Workload("sockperf-ping-pong", server="10.0.2.2", port=11111, time=1, size=64)],
    ) as vm:
        (result,) = await vm.results(BOOT_TIMEOUT)
    assert result.workload == "sockperf-ping-pong" and result.ok, result
    assert result["transactions"] > 0 and result["seconds"] > 0 and result["tps"] > 0, result.data
    assert result["round_trip"] is True and result["dropped"] == 0
    assert 0 < result["rtt_p50_us"] <= result["rtt_p99_us"] <= result["rtt_max_us"], result.data
    # One message outstanding: the rate and the mean round trip are two views of the same thing.
    assert result["tps"] * result["rtt_avg_us"] / 1e6 == pytest.approx(1.0, rel=0.2), result.data
    assert "sockperf" not in result.data  # the numbers replace the raw report


async def test_missing_kernel_is_refused_before_qemu_starts_naming_the_parameter(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-kernel"
    vm = TestVM(kernel=missing, accel="tcg")
    with pytest.raises(InvalidOptionError, match=r"kernel= .*no-such-kernel: no such file") as info:
        async with vm:
            pass
    assert "kernel image" in str(info.value)
    assert vm.runstate is Runstate.STOPPED and vm.exitcode is None  # QEMU never ran


async def test_bad_qemu_option_raises_launch_error_with_qemu_message(guest_image: Any) -> None:
    with pytest.raises(VMLaunchError) as info:
        async with TestVM(
            kernel=guest_image.kernel, initrd=guest_image.initrd, accel="tcg",
            extra_args=["-device", "nicsim-no-such-device"],
        ):  # fmt: skip
            pass
    assert "nicsim-no-such-device" in info.value.log
    assert info.value.exitcode not in (None, 0)


async def test_cancelling_the_task_that_holds_the_vm_kills_qemu(guest_image: Any) -> None:
    started: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def hold() -> None:
        async with TestVM(
            kernel=guest_image.kernel, initrd=guest_image.initrd, accel="tcg",
            workloads=[Workload("sleep", seconds=600)],
        ) as vm:  # fmt: skip
            await vm.wait_for("NICSIM-READY", BOOT_TIMEOUT)
            started.set_result(vm.pid)
            await asyncio.sleep(3600)

    task = asyncio.create_task(hold())
    pid = await started
    assert pid_alive(pid)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not pid_alive(pid)


async def test_two_vms_boot_at_once(guest_image: Any) -> None:
    async def boot(n: int) -> tuple[int, list[Any]]:
        async with TestVM(
            kernel=guest_image.kernel, initrd=guest_image.initrd, accel="tcg", name=f"vm{n}",
            workloads=[Workload("sleep", seconds=0)],
        ) as vm:  # fmt: skip
            results = await vm.results(BOOT_TIMEOUT)
            return vm.pid, results

    (pid_a, results_a), (pid_b, results_b) = await asyncio.gather(boot(0), boot(1))
    assert pid_a != pid_b
    assert [(r.workload, r.ok) for r in results_a] == [("sleep", True)]
    assert [(r.workload, r.ok) for r in results_b] == [("sleep", True)]
    assert not pid_alive(pid_a) and not pid_alive(pid_b)


async def test_guest_power_off_ends_qemu_with_exit_code_0(guest_image: Any) -> None:
    async with TestVM(
        kernel=guest_image.kernel, initrd=guest_image.initrd, accel="auto",
        workloads=[Workload("sleep", seconds=0)],
    ) as vm:  # fmt: skip
        assert vm.accel in ("kvm", "tcg")
        await vm.results(BOOT_TIMEOUT)
        assert await vm.wait_exit(BOOT_TIMEOUT) == 0
        assert "NICSIM-DONE" in vm.console_text
