"""The ports a nicsim device can be wired to, behind the one interface in :mod:`nicsim.ports.base`.

``make_port(name)`` builds a built-in port by name (``responder``, the default; ``sink``; ``generator``;
``reflect``; ``switch``, alone a switch of one port: ``nicsim serve`` joins one per socket; ``tap``
needs a :class:`TapConfig` and is built by ``nicsim serve --port tap,...``; ``vxlan`` needs a
:class:`VxlanConfig`, ``nicsim serve --port vxlan,...``).
"""

from __future__ import annotations

from nicsim.ports.base import Port, RxSink, TxFrames
from nicsim.ports.generator import GeneratorConfig, GeneratorPort
from nicsim.ports.reflect import ReflectPort
from nicsim.ports.responder import ResponderConfig, ResponderPort
from nicsim.ports.sink import SinkPort
from nicsim.ports.switch import Switch, SwitchPort
from nicsim.ports.tap import TapConfig, TapError, TapPort
from nicsim.ports.vxlan import VxlanConfig, VxlanError, VxlanPort

PORTS: dict[str, type[Port]] = {
    "responder": ResponderPort,
    "sink": SinkPort,
    "generator": GeneratorPort,
    "reflect": ReflectPort,
    "tap": TapPort,
    "vxlan": VxlanPort,
    "switch": SwitchPort,
}


def enable_kernels() -> bool:
    """Compile (or load from numba's cache) every compiled kernel: ``rings``' hot path, then the
    ports' own rounds (the tap's reads and writes, :mod:`nicsim.ports.fd_kernels`, and its request
    lane, :mod:`nicsim.ports.lane_kernel`; the switch's forward, :mod:`nicsim.ports.switch_kernel`).
    Returns whether ``rings``' kernels are on: without them the ports' rounds are off too, and the
    numpy path runs (a lane that does not compile only leaves requests to the pumps). Idempotent."""
    from nicsim.ports import fd_kernels, lane_kernel, switch_kernel

    on = fd_kernels.enable() and switch_kernel.enable()
    if on:
        lane_kernel.enable()
    return on


def make_port(name: str = "responder") -> Port:
    if name == "tap":
        raise ValueError("the tap port needs a namespace: TapPort(TapConfig(netns=..., ifname=...))")
    if name == "vxlan":
        raise ValueError("the vxlan port needs a remote: VxlanPort(VxlanConfig(remote=..., vni=...))")
    try:
        return PORTS[name]()
    except KeyError:
        raise ValueError(f"unknown port {name!r}; built-in ports: {', '.join(PORTS)}") from None


__all__ = [
    "PORTS", "GeneratorConfig", "GeneratorPort", "Port", "ReflectPort", "ResponderConfig",
    "ResponderPort", "RxSink", "SinkPort", "Switch", "SwitchPort", "TapConfig", "TapError", "TapPort",
    "TxFrames", "VxlanConfig", "VxlanError", "VxlanPort", "make_port",
]
