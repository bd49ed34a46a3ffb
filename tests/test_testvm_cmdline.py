"""Unit tests of ``qemu.testvm``'s command-line building and workload rendering (no QEMU runs)."""

from __future__ import annotations

import pytest

from qemu.testvm import (
    ConsoleFd,
    ConsoleFile,
    ConsoleStdio,
    GuestOutputError,
    InvalidOptionError,
    QmpFd,
    QmpPath,
    Route,
    TapNic,
    UserNic,
    VhostUserNic,
    VMSpec,
    Workload,
    build_cmdline,
    in_netns,
    kernel_cmdline,
    parse_result_line,
    parse_results,
    render_run,
)


def opt(argv: list[str], flag: str) -> list[str]:
    """Every value given to ``flag`` in ``argv``."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def device(argv: list[str]) -> dict[str, str]:
    (dev,) = [d for d in opt(argv, "-device") if d.startswith("virtio-net-pci")]
    return dict(p.partition("=")[::2] for p in dev.split(",")[1:])


def spec(**kw: object) -> VMSpec:
    base: dict[str, object] = {
        "kernel": "/k/vmlinuz",
        "initrd": "/k/initrd",
        "console": ConsoleFile(path="/l/c"),
    }
    base.update(kw)
    return VMSpec(**base)  # type: ignore[arg-type]


# ---- workloads -------------------------------------------------------------------------------------


def test_workload_renders_name_then_params_in_order() -> None:
    assert Workload("ping", target="10.0.2.2", count=3).render() == "ping,target=10.0.2.2,count=3"


def test_workload_renders_booleans_as_1_and_0() -> None:
    assert Workload("iperf3-client", reverse=True, udp=False).render() == "iperf3-client,reverse=1,udp=0"


def test_workload_without_params_is_just_its_name() -> None:
    assert Workload("shell").render() == "shell"


def test_render_run_joins_workloads_with_semicolons() -> None:
    run = render_run([Workload("ping", target="10.0.2.2", count=3), Workload("iperf3-client", time=5)])
    assert run == "ping,target=10.0.2.2,count=3;iperf3-client,time=5"


@pytest.mark.parametrize("value", ["a b", "a,b", "a;b", "a\tb", 'a"b', ""])
def test_workload_rejects_values_that_break_the_command_line(value: str) -> None:
    with pytest.raises(InvalidOptionError):
        Workload("ping", target=value)


@pytest.mark.parametrize("name", ["", "a b", "a;b", "a,b", "-x"])
def test_workload_rejects_bad_names(name: str) -> None:
    with pytest.raises(InvalidOptionError):
        Workload(name)


def test_workload_rejects_bad_parameter_names() -> None:
    with pytest.raises(InvalidOptionError):
        Workload("ping", **{"a=b": "1"})


def test_workload_parse_reads_the_cli_form() -> None:
    assert Workload.parse("ping,target=10.0.2.2,count=3") == Workload("ping", target="10.0.2.2", count="3")


def test_workload_parse_refuses_an_item_without_equals() -> None:
    with pytest.raises(InvalidOptionError):
        Workload.parse("ping,target")


def test_invalid_option_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        Workload("ping", target="a b")


# ---- result lines ----------------------------------------------------------------------------------


def test_parse_results_reads_every_result_line_in_order() -> None:
    text = (
        "[ 1.0] boot noise\nNICSIM-READY\n"
        'NICSIM-RESULT {"workload": "ping", "ok": true, "loss_pct": 0}\n'
        'NICSIM-RESULT {"workload": "iperf3-client", "ok": false, "error": "no route"}\nNICSIM-DONE\n'
    )
    first, second = parse_results(text)
    assert (first.workload, first.ok, first["loss_pct"]) == ("ping", True, 0)
    assert (second.workload, second.ok, second.error) == ("iperf3-client", False, "no route")


@pytest.mark.parametrize(
    "line",
    [
        "NICSIM-RESULT {not json",
        'NICSIM-RESULT ["a"]',
        'NICSIM-RESULT {"ok": true}',
        'NICSIM-RESULT {"workload": "x"}',
    ],
)
def test_malformed_result_lines_raise_guest_output_error(line: str) -> None:
    with pytest.raises(GuestOutputError):
        parse_result_line(line)


# ---- kernel command line ---------------------------------------------------------------------------


def test_kernel_cmdline_follows_the_contract() -> None:
    line = kernel_cmdline(
        nic=UserNic(mac="52:54:00:12:34:56"),
        guest_ip="10.0.2.15/24",
        workloads=[
            Workload("ping", target="10.0.2.2", count=3),
            Workload("iperf3-client", server="10.0.2.2"),
        ],
    )
    assert line == (
        "console=ttyS0 panic=-1 nicsim.mac=52:54:00:12:34:56 nicsim.ip=10.0.2.15/24 nicsim.mtu=1500 "
        "nicsim.run=ping,target=10.0.2.2,count=3;iperf3-client,server=10.0.2.2"
    )


def test_kernel_cmdline_without_nic_has_no_network_params() -> None:
    assert kernel_cmdline(nic=None, guest_ip="10.0.2.15/24", workloads=[Workload("sleep")]) == (
        "console=ttyS0 panic=-1 nicsim.run=sleep"
    )


def test_kernel_cmdline_gives_each_further_nic_its_own_params_then_forwarding_and_routes() -> None:
    line = kernel_cmdline(
        nics=[
            VhostUserNic(socket="/s/a", mac="02:00:00:00:00:01", guest_ip="10.1.0.1/24"),
            VhostUserNic(socket="/s/b", mac="02:00:00:00:00:02", guest_ip="10.2.0.1/24", guest_mtu=9000),
            UserNic(mac="02:00:00:00:00:03"),
        ],
        guest_ip="10.0.2.15/24",  # NIC 0 has its own: that one wins
        workloads=[Workload("sleep")],
        forward=True,
        routes=[Route(to="10.3.0.0/24", via="10.2.0.2"), Route.parse("default,via=10.1.0.254")],
    )
    assert line == (
        "console=ttyS0 panic=-1 nicsim.mac=02:00:00:00:00:01 nicsim.ip=10.1.0.1/24 nicsim.mtu=1500 "
        "nicsim.eth1.mac=02:00:00:00:00:02 nicsim.eth1.ip=10.2.0.1/24 nicsim.eth1.mtu=9000 "
        "nicsim.eth2.mac=02:00:00:00:00:03 nicsim.forward=1 "
        "nicsim.route=10.3.0.0/24,via=10.2.0.2 nicsim.route=default,via=10.1.0.254 nicsim.run=sleep"
    )


@pytest.mark.parametrize("text", ["10.3.0.0/24", "10.3.0.0/24,via=x", "10.3.0.1/24,via=10.2.0.2",
                                  "10.3.0.0/24,via=10.2.0.2,dev=eth1"])  # fmt: skip
def test_a_route_that_is_not_network_via_address_is_refused(text: str) -> None:
    with pytest.raises(InvalidOptionError, match="route"):
        Route.parse(text)


def test_several_nics_each_get_their_own_ids_and_mac_and_vectors_0() -> None:
    argv = build_cmdline(spec(nics=[VhostUserNic(socket="/s/a", mac="02:00:00:00:00:01"),
                                    TapNic(mac="02:00:00:00:00:02", ifname="tap1"),
                                    UserNic(mac="02:00:00:00:00:03")]))  # fmt: skip
    assert opt(argv, "-chardev")[-1] == "socket,id=c0,path=/s/a"
    assert opt(argv, "-netdev") == [
        "vhost-user,id=n0,chardev=c0",
        "tap,id=n1,ifname=tap1,script=no,downscript=no,vhost=off",
        "user,id=n2,restrict=on",
    ]
    devices = [d.split(",") for d in opt(argv, "-device")]
    assert [d[1:4] for d in devices] == [
        [f"id=nic{i}", f"netdev=n{i}", f"mac=02:00:00:00:00:0{i + 1}"] for i in range(3)
    ]
    assert all("vectors=0" in d for d in devices)


def test_one_nic_by_nic_or_by_nics_is_the_same_command_line() -> None:
    nic = VhostUserNic(socket="/s/a")
    assert build_cmdline(spec(nic=nic)) == build_cmdline(spec(nics=[nic]))


def test_two_nics_with_one_mac_or_nic_and_nics_together_are_refused() -> None:
    with pytest.raises(InvalidOptionError, match="NICs 0 and 1 both have MAC 52:54:00:12:34:56"):
        build_cmdline(spec(nics=[UserNic(), UserNic()]))
    with pytest.raises(InvalidOptionError, match="not both"):
        build_cmdline(spec(nic=UserNic(), nics=[UserNic(mac="02:00:00:00:00:09")]))


def test_kernel_cmdline_refuses_extra_words_with_spaces() -> None:
    with pytest.raises(InvalidOptionError):
        kernel_cmdline(nic=None, guest_ip=None, workloads=[], extra=["a b"])


# ---- machine, memory, console, QMP -----------------------------------------------------------------


def test_memory_is_a_shared_memfd_backend_of_the_requested_size() -> None:
    argv = build_cmdline(spec(memory_mb=512))
    assert opt(argv, "-m") == ["512M"]
    assert opt(argv, "-object") == ["memory-backend-memfd,id=mem,size=512M,share=on"]
    assert opt(argv, "-machine") == ["memory-backend=mem"]


def test_fixed_options_boot_headless_without_defaults_or_reboot() -> None:
    argv = build_cmdline(spec())
    assert argv[0] == "qemu-system-x86_64"
    for flag in ("-nodefaults", "-no-reboot"):
        assert flag in argv
    assert opt(argv, "-display") == ["none"]
    assert opt(argv, "-kernel") == ["/k/vmlinuz"]
    assert opt(argv, "-initrd") == ["/k/initrd"]


def test_accel_tcg_and_kvm_are_passed_and_kvm_uses_the_host_cpu() -> None:
    assert opt(build_cmdline(spec(accel="tcg")), "-accel") == ["tcg"]
    kvm = build_cmdline(spec(accel="kvm"))
    assert opt(kvm, "-accel") == ["kvm"] and opt(kvm, "-cpu") == ["host"]


def test_accel_auto_must_be_resolved_before_building() -> None:
    with pytest.raises(InvalidOptionError):
        build_cmdline(spec(accel="auto"))


def test_console_to_a_file() -> None:
    argv = build_cmdline(spec(console=ConsoleFile(path="/l/console.log")))
    assert opt(argv, "-chardev")[0] == "file,id=ser0,path=/l/console.log"
    assert opt(argv, "-serial") == ["chardev:ser0"]


def test_console_on_an_fd_is_also_logged() -> None:
    argv = build_cmdline(spec(console=ConsoleFd(fd=7, logfile="/l/c.log")))
    assert opt(argv, "-chardev")[0] == "socket,id=ser0,fd=7,logfile=/l/c.log,logappend=off"


def test_console_on_stdio_hands_ctrl_c_to_the_guest() -> None:
    argv = build_cmdline(spec(console=ConsoleStdio()))
    assert opt(argv, "-chardev")[0] == "stdio,id=ser0,mux=on,signal=off"


def test_qmp_on_a_unix_socket_path_does_not_block_start_up() -> None:
    argv = build_cmdline(spec(qmp=QmpPath(path="/r/qmp.sock")))
    assert "socket,id=qmp,path=/r/qmp.sock,server=on,wait=off" in opt(argv, "-chardev")
    assert opt(argv, "-mon") == ["chardev=qmp,mode=control"]


def test_qmp_on_an_inherited_fd() -> None:
    assert "socket,id=qmp,fd=9" in opt(build_cmdline(spec(qmp=QmpFd(fd=9))), "-chardev")


def test_paths_with_commas_are_refused() -> None:
    with pytest.raises(InvalidOptionError):
        build_cmdline(spec(kernel="/a,b/vmlinuz"))


# ---- NICs ------------------------------------------------------------------------------------------


def test_no_nic_means_no_netdev() -> None:
    argv = build_cmdline(spec())
    assert opt(argv, "-netdev") == [] and opt(argv, "-device") == []


def test_vhost_user_client_by_default() -> None:
    argv = build_cmdline(spec(nic=VhostUserNic(socket="/r/vu.sock")))
    assert "socket,id=c0,path=/r/vu.sock" in opt(argv, "-chardev")
    assert opt(argv, "-netdev") == ["vhost-user,id=n0,chardev=c0"]
    assert device(argv)["netdev"] == "n0"


def test_vhost_user_server_does_not_wait_and_client_can_reconnect() -> None:
    server = build_cmdline(spec(nic=VhostUserNic(socket="/r/vu.sock", server=True)))
    assert "socket,id=c0,path=/r/vu.sock,server=on,wait=off" in opt(server, "-chardev")
    client = build_cmdline(spec(nic=VhostUserNic(socket="/r/vu.sock", reconnect=1)))
    assert "socket,id=c0,path=/r/vu.sock,reconnect=1" in opt(client, "-chardev")


def test_reconnect_with_server_is_refused() -> None:
    with pytest.raises(InvalidOptionError):
        build_cmdline(spec(nic=VhostUserNic(socket="/s", server=True, reconnect=1)))


def test_vhost_user_multiqueue_sets_queues_and_mq() -> None:
    argv = build_cmdline(spec(nic=VhostUserNic(socket="/s", queues=2)))
    assert opt(argv, "-netdev") == ["vhost-user,id=n0,chardev=c0,queues=2"]
    assert device(argv)["mq"] == "on"


def test_host_mtu_is_passed_and_checked_against_qemus_range() -> None:
    assert device(build_cmdline(spec(nic=VhostUserNic(socket="/s", host_mtu=9000))))["host_mtu"] == "9000"
    assert "host_mtu" not in device(build_cmdline(spec(nic=VhostUserNic(socket="/s"))))
    for bad in (67, 65536):
        with pytest.raises(InvalidOptionError):
            build_cmdline(spec(nic=VhostUserNic(socket="/s", host_mtu=bad)))


def test_virtio_net_device_options() -> None:
    nic = VhostUserNic(
        socket="/s", mac="52:54:00:aa:bb:cc", rx_queue_size=1024, tx_queue_size=512, packed=True,
        mrg_rxbuf=False, offloads={"csum": False, "guest_tso4": True},
    )  # fmt: skip
    props = device(build_cmdline(spec(nic=nic)))
    assert props["mac"] == "52:54:00:aa:bb:cc"
    assert (props["rx_queue_size"], props["tx_queue_size"]) == ("1024", "512")
    assert (props["packed"], props["mrg_rxbuf"]) == ("on", "off")
    assert (props["csum"], props["guest_tso4"]) == ("off", "on")


def test_tcg_adds_vectors_0_and_every_accel_skips_the_option_rom() -> None:
    tcg = device(build_cmdline(spec(nic=VhostUserNic(socket="/s"), accel="tcg")))
    kvm = device(build_cmdline(spec(nic=VhostUserNic(socket="/s"), accel="kvm")))
    assert tcg["vectors"] == "0" and "vectors" not in kvm
    assert tcg["romfile"] == "" and kvm["romfile"] == ""


@pytest.mark.parametrize("size", [128, 300, 2048])
def test_queue_sizes_must_be_powers_of_two_in_range(size: int) -> None:
    with pytest.raises(InvalidOptionError):
        build_cmdline(spec(nic=VhostUserNic(socket="/s", rx_queue_size=size)))


def test_unknown_offload_and_bad_mac_are_refused() -> None:
    with pytest.raises(InvalidOptionError):
        build_cmdline(spec(nic=UserNic(offloads={"warp_drive": True})))
    with pytest.raises(InvalidOptionError):
        build_cmdline(spec(nic=UserNic(mac="52:54:00:12:34")))


def test_tap_backend_runs_no_scripts() -> None:
    argv = build_cmdline(spec(nic=TapNic(ifname="tap3")))
    assert opt(argv, "-netdev") == ["tap,id=n0,ifname=tap3,script=no,downscript=no,vhost=off"]


def test_user_backend_is_always_restricted() -> None:
    assert opt(build_cmdline(spec(nic=UserNic())), "-netdev") == ["user,id=n0,restrict=on"]


def test_in_netns_wraps_with_ip_netns_exec() -> None:
    assert in_netns(["qemu", "-x"], "nicsim-1-0") == ["ip", "netns", "exec", "nicsim-1-0", "qemu", "-x"]
    assert in_netns(["qemu"], None) == ["qemu"]
    with pytest.raises(InvalidOptionError):
        in_netns(["qemu"], "../etc")


def _iperf_line(doc: object) -> str:
    import json

    fields = {"workload": "iperf3-client", "ok": True, "server": "s", "iperf3": doc}
    return "NICSIM-RESULT " + json.dumps(fields)


def test_the_host_reads_the_numbers_out_of_iperf3s_json() -> None:
    doc = {
        "start": {"version": "iperf 3.12"},
        "end": {
            "sum_sent": {"seconds": 2.0, "bytes": 250_000_000, "bits_per_second": 1.0e9, "retransmits": 3},
            "sum_received": {"seconds": 2.01, "bytes": 249_000_000, "bits_per_second": 0.99e9},
            "cpu_utilization_percent": {"host_total": 40.5, "remote_total": 12.0},
        },
    }
    result = parse_result_line(_iperf_line(doc))
    assert result.ok and result.error is None
    assert result["sent_bps"] == 1.0e9 and result["received_bps"] == 0.99e9
    assert result["sent_bytes"] == 250_000_000 and result["received_bytes"] == 249_000_000
    assert result["seconds"] == 2.01 and result["retransmits"] == 3 and result["cpu_host_pct"] == 40.5
    assert "iperf3" not in result.data  # the numbers replace the raw document
    udp = {"end": {"sum": {"seconds": 2.0, "bits_per_second": 5e6, "lost_packets": 2, "packets": 100,
                           "lost_percent": 2.0, "jitter_ms": 0.1}}}  # fmt: skip
    res = parse_result_line(_iperf_line(udp))
    assert res.ok and res["lost_packets"] == 2 and res["lost_pct"] == 2.0 and res["received_bps"] == 5e6


@pytest.mark.parametrize(
    ("doc", "error"),
    [
        ({"start": {}, "error": "unable to connect to server: refused"}, "iperf3: unable to connect"),
        ({"start": {}, "end": {}}, "iperf3 produced no summary"),
        ([1, 2], "not a JSON object"),
    ],
)
def test_an_iperf3_failure_in_its_json_fails_the_workload(doc: object, error: str) -> None:
    result = parse_result_line(_iperf_line(doc))
    assert not result.ok and result.error is not None and error in result.error
    assert result.data["ok"] is False
