"""The ports a nicsim device can be wired to, behind the one interface in :mod:`nicsim.ports.base`.

``make_port(name)`` builds a built-in port by name (``responder``, the default; ``sink``; ``generator``;
``reflect``; ``tap`` needs a :class:`TapConfig` and is built by ``nicsim serve --port tap,...``).
"""

from __future__ import annotations

from nicsim.ports.base import Port, RxSink, TxFrames
from nicsim.ports.generator import GeneratorConfig, GeneratorPort
from nicsim.ports.reflect import ReflectPort
from nicsim.ports.responder import ResponderConfig, ResponderPort
from nicsim.ports.sink import SinkPort
from nicsim.ports.tap import TapConfig, TapError, TapPort

PORTS: dict[str, type[Port]] = {
    "responder": ResponderPort,
    "sink": SinkPort,
    "generator": GeneratorPort,
    "reflect": ReflectPort,
    "tap": TapPort,
}


def make_port(name: str = "responder") -> Port:
    if name == "tap":
        raise ValueError("the tap port needs a namespace: TapPort(TapConfig(netns=..., ifname=...))")
    try:
        return PORTS[name]()
    except KeyError:
        raise ValueError(f"unknown port {name!r}; built-in ports: {', '.join(PORTS)}") from None


__all__ = [
    "PORTS", "GeneratorConfig", "GeneratorPort", "Port", "ReflectPort", "ResponderConfig",
    "ResponderPort", "RxSink", "SinkPort", "TapConfig", "TapError", "TapPort", "TxFrames", "make_port",
]
