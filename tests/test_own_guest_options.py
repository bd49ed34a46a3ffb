"""The user's own guest, without booting one: QEMU's argv for a kernel, initrd, disk and extra
command line; the checks on those files (``TestVM`` and ``nicsim vm`` name the option and say what
to do); and the image builder's ``--kernel-package`` (name check, cache key, resolution record,
built-in modules).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from images import build, kmod
from images.apt import ImageBuildError, Package
from images.build import check_kernel_package, image_key, resolution_record
from nicsim.cli import main as nicsim_main
from qemu.testvm import (
    ConsoleFile,
    InvalidOptionError,
    Runstate,
    TestVM,
    VMSpec,
    Workload,
    build_cmdline,
    check_file,
    disk_format,
    kernel_cmdline,
)


def opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def spec(**kw: object) -> VMSpec:
    base: dict[str, object] = {
        "kernel": "/k/vmlinuz", "initrd": "/k/initrd", "console": ConsoleFile(path="/l/c"),
    }  # fmt: skip
    base.update(kw)
    return VMSpec(**base)  # type: ignore[arg-type]


def guest_file(tmp_path: Path, name: str, data: bytes = b"\x7fELF-ish") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# ---- QEMU's argv -----------------------------------------------------------------------------------


def test_kernel_and_initrd_are_passed_as_given_and_no_initrd_means_none() -> None:
    argv = build_cmdline(spec(kernel="/own/vmlinuz-6.1.0-56-amd64", initrd="/own/initrd.img-6.1.0-56-amd64"))
    assert opt(argv, "-kernel") == ["/own/vmlinuz-6.1.0-56-amd64"]
    assert opt(argv, "-initrd") == ["/own/initrd.img-6.1.0-56-amd64"]
    assert opt(build_cmdline(spec(initrd=None)), "-initrd") == []


def test_a_disk_is_virtio_blk_with_snapshot_on_so_the_file_is_never_written() -> None:
    argv = build_cmdline(spec(disk="/own/disk.qcow2", disk_format="qcow2"))
    assert opt(argv, "-drive") == ["file=/own/disk.qcow2,if=none,id=disk0,format=qcow2,snapshot=on"]
    assert "virtio-blk-pci,drive=disk0" in opt(argv, "-device")
    assert opt(build_cmdline(spec()), "-drive") == []  # no disk unless asked for


def test_a_disk_format_must_be_raw_or_qcow2_and_a_comma_in_its_path_is_refused() -> None:
    with pytest.raises(InvalidOptionError, match="auto"):
        build_cmdline(spec(disk="/own/disk.img", disk_format="auto"))  # resolved by the caller first
    with pytest.raises(InvalidOptionError, match="comma"):
        build_cmdline(spec(disk="/own/a,b.img"))


def test_extra_command_line_comes_after_the_nicsim_contract_as_a_string_or_words() -> None:
    argv = build_cmdline(spec(extra_append="root=/dev/vda1  ro\tquiet", workloads=[Workload("sleep")]))
    (append,) = opt(argv, "-append")
    assert append == "console=ttyS0 panic=-1 nicsim.run=sleep root=/dev/vda1 ro quiet"
    assert kernel_cmdline(nic=None, guest_ip=None, workloads=[], extra=["init=/bin/sh"]).endswith(
        " init=/bin/sh"
    )


def test_extra_command_line_refuses_control_characters_and_an_overlong_line() -> None:
    with pytest.raises(InvalidOptionError, match="control character"):
        kernel_cmdline(nic=None, guest_ip=None, workloads=[], extra=["a\x07b"])
    with pytest.raises(InvalidOptionError, match="2047"):
        kernel_cmdline(nic=None, guest_ip=None, workloads=[], extra="x" * 2100)


# ---- checking the files ------------------------------------------------------------------------------


def test_check_file_names_the_option_and_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError, match=r"^--kernel .*/nope: no such file; give a kernel"):
        check_file(tmp_path / "nope", "--kernel", "give a kernel")
    with pytest.raises(InvalidOptionError, match="not a regular file"):
        check_file(tmp_path, "--disk", "give a disk")
    with pytest.raises(InvalidOptionError, match="empty"):
        check_file(guest_file(tmp_path, "empty", b""), "--initrd", "give an initrd")
    ok = guest_file(tmp_path, "vmlinuz")
    assert check_file(ok, "--kernel", "") == ok


def test_an_unreadable_file_says_how_to_make_it_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # root reads every file whatever its mode, so ask os.access the question a plain user gets.
    kernel = guest_file(tmp_path, "vmlinuz")
    monkeypatch.setattr(os, "access", lambda *_a, **_k: False)
    with pytest.raises(InvalidOptionError, match=r"--kernel .*: not readable by this user .*chmod a\+r"):
        check_file(kernel, "--kernel", "")


def test_disk_format_auto_reads_the_qcow2_magic_else_raw(tmp_path: Path) -> None:
    assert disk_format(guest_file(tmp_path, "a.qcow2", b"QFI\xfb\x00\x00\x00\x03"), "auto") == "qcow2"
    assert disk_format(guest_file(tmp_path, "a.img", bytes(512)), "auto") == "raw"
    assert disk_format(tmp_path / "not-read", "qcow2") == "qcow2"  # an explicit format is taken as is
    with pytest.raises(InvalidOptionError, match="vmdk"):
        disk_format(tmp_path / "a.img", "vmdk")


@pytest.mark.parametrize("missing", ["kernel", "initrd", "disk"])
async def test_testvm_refuses_a_missing_file_before_qemu_starts(tmp_path: Path, missing: str) -> None:
    files = {name: guest_file(tmp_path, name) for name in ("kernel", "initrd", "disk")}
    files[missing] = tmp_path / f"no-such-{missing}"
    vm = TestVM(**files, accel="tcg", qemu="nicsim-no-such-qemu")  # type: ignore[arg-type]
    with pytest.raises(InvalidOptionError, match=rf"^{missing}= .*no-such-{missing}: no such file"):
        await vm.launch()
    assert vm.runstate is Runstate.STOPPED and vm.exitcode is None


async def test_testvm_extra_append_as_a_string_is_not_split_into_characters(tmp_path: Path) -> None:
    vm = TestVM(kernel=guest_file(tmp_path, "k"), extra_append="root=/dev/vda1 ro")
    assert vm._spec.extra_append == "root=/dev/vda1 ro"


def nicsim_vm(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = nicsim_main(["vm", "--nic", "none", "--accel", "tcg", *argv])
    return code, capsys.readouterr().err


def test_nicsim_vm_names_the_option_of_a_missing_or_empty_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kernel = guest_file(tmp_path, "vmlinuz")
    code, err = nicsim_vm(capsys, "--kernel", str(tmp_path / "vmlinuz-nope"))
    assert code == 2
    assert err.startswith("nicsim vm: --kernel ") and "no such file" in err and "built-in guest" in err
    code, err = nicsim_vm(capsys, "--kernel", str(kernel), "--initrd", str(tmp_path))
    assert code == 2 and "--initrd" in err and "not a regular file" in err
    empty = guest_file(tmp_path, "disk.img", b"")
    code, err = nicsim_vm(capsys, "--kernel", str(kernel), "--disk", str(empty))
    assert code == 2 and "--disk" in err and "empty" in err
    assert err.count("\n") == 1  # one line, no traceback


def test_nicsim_vm_refuses_kernel_package_with_a_kernel_of_ones_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kernel = guest_file(tmp_path, "vmlinuz")
    code, err = nicsim_vm(capsys, "--kernel-package", "linux-image-amd64", "--kernel", str(kernel))
    assert code == 2 and "--kernel-package" in err


# ---- the image builder for another kernel package ------------------------------------------------------


def test_kernel_package_defaults_to_the_cloud_kernel_and_refuses_what_is_not_a_kernel_package() -> None:
    assert check_kernel_package(None) == "linux-image-cloud-amd64"
    assert check_kernel_package("linux-image-amd64") == "linux-image-amd64"
    assert check_kernel_package("linux-image-6.1.0-56-amd64") == "linux-image-6.1.0-56-amd64"
    for bad in ("busybox-static", "linux-image-amd64 && true", "Linux-Image-amd64", ""):
        with pytest.raises(ImageBuildError, match="linux-image-amd64"):
            check_kernel_package(bad)


def test_the_kernel_package_is_part_of_the_key_and_has_its_own_resolution_record(tmp_path: Path) -> None:
    pkgs = [Package(name="busybox-static", version="1", arch="amd64", sha256="b" * 64, size=1)]
    inputs = {"init.sh": "0" * 64}
    assert image_key(pkgs, inputs, "linux-image-amd64") != image_key(pkgs, inputs)
    assert image_key(pkgs, inputs) == image_key(pkgs, inputs, "linux-image-cloud-amd64")
    assert resolution_record(tmp_path) == tmp_path / "resolved.json"
    assert resolution_record(tmp_path, "linux-image-amd64") == tmp_path / "resolved-linux-image-amd64.json"
    assert build._lists_fingerprint("linux-image-amd64") != build._lists_fingerprint()


def test_a_metapackage_resolves_to_its_kernel_and_a_versioned_package_to_itself() -> None:
    meta = {"Package": "linux-image-amd64", "Depends": "linux-image-6.1.0-56-amd64 (= 6.1.192-2)"}
    assert build._kernel_image_package("linux-image-amd64", meta) == "linux-image-6.1.0-56-amd64"
    versioned = {"Package": "linux-image-6.1.0-56-amd64", "Depends": "kmod, linux-base (>= 4.3~)"}
    versioned_name = "linux-image-6.1.0-56-amd64"
    assert build._kernel_image_package(versioned_name, versioned) == versioned_name


def test_a_wanted_module_the_kernel_has_built_in_is_skipped(tmp_path: Path) -> None:
    moddir = tmp_path / "lib" / "modules" / "6.1.0-test"
    moddir.mkdir(parents=True)
    (moddir / "modules.dep").write_text("kernel/a/virtio_net.ko: kernel/a/virtio.ko\nkernel/a/virtio.ko:\n")
    (moddir / "modules.builtin").write_text("kernel/drivers/block/virtio_blk.ko\n")
    assert kmod.builtin_modules(moddir) == {"virtio_blk"}
    order = kmod.load_order(("virtio_net", "virtio_blk"), moddir)
    assert [name for name, _ in order] == ["virtio", "virtio_net"]
    (moddir / "modules.builtin").unlink()
    with pytest.raises(ImageBuildError, match="virtio_blk"):
        kmod.load_order(("virtio_blk",), moddir)


def test_an_unknown_kernel_package_says_how_to_list_the_known_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    def show(names: object, progress: object) -> dict[str, dict[str, str]]:
        raise ImageBuildError("APT knows no candidate for linux-image-nope even after apt-get update")

    monkeypatch.setattr(build.apt, "show", show)
    hint = r"linux-image-nope.*apt-cache search --names-only \^linux-image-"
    with pytest.raises(ImageBuildError, match=hint):
        build._resolve_fresh(lambda _: None, "linux-image-nope")
