"""End to end: what QEMU 7.2 says about the protocol features ``nicsim serve`` offers.

QEMU's virtio-net never reads its config space over vhost-user, and QEMU 7.2 warns "vhost-user backend
supports VHOST_USER_PROTOCOL_F_CONFIG but QEMU does not." on every connection to a net backend that
offers CONFIG. nicsim offers it only with ``--config-space``: by default QEMU's log stays quiet, with the
option the warning is back (which shows that the check looks at the right log).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qemu.testvm import TestVM, VhostUserNic, Workload
from tests.serve_process import nicsim_serve

pytestmark = pytest.mark.vm

BOOT_TIMEOUT = 120.0
WARNING = "supports VHOST_USER_PROTOCOL_F_CONFIG but QEMU does not"


async def _qemu_log(guest_image: Any, tmp_path: Path, *serve_args: str) -> str:
    async with nicsim_serve(tmp_path, *serve_args) as (_, sock, _):
        vm = TestVM(kernel=guest_image.kernel, initrd=guest_image.initrd, nic=VhostUserNic(socket=sock),
                    accel="tcg", workloads=[Workload("ping", target="10.0.2.2", count=1)],
                    log_dir=tmp_path / "vm")  # fmt: skip
        async with vm:
            (result,) = await vm.results(BOOT_TIMEOUT)
        assert result.ok, result
    return (tmp_path / "vm" / "qemu.log").read_text(errors="replace")


@pytest.mark.parametrize("config_space", [False, True], ids=["default", "config-space"])
async def test_qemu_warns_about_config_only_when_it_is_offered(
    guest_image: Any, tmp_path: Path, config_space: bool
) -> None:
    log = await _qemu_log(guest_image, tmp_path, *(["--config-space"] if config_space else []))
    assert (WARNING in log) == config_space, log
