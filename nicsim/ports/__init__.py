"""The ports a nicsim device can be wired to, behind the one interface in :mod:`nicsim.ports.base`.

``make_port(name)`` builds a built-in port by name (``responder``, the default; ``sink``; ``generator``;
``reflect``).
"""

from __future__ import annotations

from nicsim.ports.base import Port, RxSink, TxFrames
from nicsim.ports.generator import GeneratorConfig, GeneratorPort
from nicsim.ports.reflect import ReflectPort
from nicsim.ports.responder import ResponderConfig, ResponderPort
from nicsim.ports.sink import SinkPort

PORTS: dict[str, type[Port]] = {
    "responder": ResponderPort,
    "sink": SinkPort,
    "generator": GeneratorPort,
    "reflect": ReflectPort,
}


def make_port(name: str = "responder") -> Port:
    try:
        return PORTS[name]()
    except KeyError:
        raise ValueError(f"unknown port {name!r}; built-in ports: {', '.join(PORTS)}") from None


__all__ = [
    "PORTS", "GeneratorConfig", "GeneratorPort", "Port", "ReflectPort", "ResponderConfig",
    "ResponderPort", "RxSink", "SinkPort", "TxFrames", "make_port",
]
