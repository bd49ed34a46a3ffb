"""What is legal when: the connection and ring transition tables, and the feature gates.

This module owns the vhost-user state machine as data (h11 ``_state.py`` style). ``TRANSITIONS``
maps each ``ConnectionState`` to the requests legal in it and the state each one leads to;
``RING_TRANSITIONS`` does the same per ring for the requests that address a ring. A request that
is absent from the table for the current state is a protocol error; a request absent from every
state is one this backend does not support at all. ``GATES`` adds what the spec makes a request
depend on besides the state: a protocol feature negotiated, a virtio feature offered or acked.
The tables are also what moves: the connection takes every new state and ring phase from
``next_state`` / ``next_phase``, never sets one by hand. A ``Trigger`` is a move no request names
(the last memory region removed, the connection closed), so it sits in the same table.

The order QEMU 7.2 uses is the reference (``ENVIRONMENT.md``): queries and SET_PROTOCOL_FEATURES
before SET_OWNER; SET_VRING_CALL/ERR/ENABLE right after SET_OWNER, before any features or memory;
then SET_FEATURES, SET_MEM_TABLE, and per ring NUM, BASE, ADDR, KICK, CALL; GET_VRING_BASE to stop.
A reconnect replays everything on a new connection, which starts in ``CONNECTED`` again.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from nicsim.vhost import features as f
from nicsim.vhost.errors import FrontendProtocolError
from nicsim.vhost.protocol import Request as R
from nicsim.virtio.features import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_NET_F_MTU


class ConnectionState(enum.Enum):
    """Where the session is. Each later state implies everything the earlier ones did."""

    CONNECTED = "connected"  # socket open, nobody owns the session yet
    OWNED = "owned"  # SET_OWNER received
    NEGOTIATED = "negotiated"  # SET_FEATURES received: ring formats are known
    READY = "ready"  # a memory table exists: ring addresses can be translated
    CLOSED = "closed"  # close() called, or the stream was lost; nothing is legal


class RingPhase(enum.Enum):
    """Ring states of the spec ("Ring states"); enabled/disabled is a separate flag."""

    STOPPED = "stopped"
    STARTED = "started"


class Trigger(enum.Enum):
    """A move of the connection state that is not a request (h11 keys its table by event type too)."""

    MEMORY_EMPTIED = "the last memory region was removed"  # fired after the REM_MEM_REG that did it
    CLOSED = "the connection was closed, or its stream could not be framed any more"


S = ConnectionState
_OPEN = (S.CONNECTED, S.OWNED, S.NEGOTIATED, S.READY)
_OWNED = (S.OWNED, S.NEGOTIATED, S.READY)
_NEGOTIATED = (S.NEGOTIATED, S.READY)
_READY = (S.READY,)

TRANSITIONS: dict[ConnectionState, dict[R | Trigger, ConnectionState]] = {s: {} for s in ConnectionState}


def _allow(
    requests: Iterable[R | Trigger], states: Iterable[ConnectionState], to: ConnectionState | None = None
) -> None:
    for state in states:
        for req in requests:
            TRANSITIONS[state][req] = to if to is not None else state


# Queries are harmless in any open state (QEMU sends them before SET_OWNER).
_allow((R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM, R.GET_MAX_MEM_SLOTS), _OPEN)
# QEMU's vhost_user_backend_init negotiates protocol features and sets up the backend channel
# before SET_OWNER; changing protocol features after SET_FEATURES is not something any frontend does.
_allow((R.SET_PROTOCOL_FEATURES,), (S.CONNECTED, S.OWNED))
_allow((R.SET_BACKEND_REQ_FD,), _OPEN)
# SET_OWNER marks the session start (spec); a second one is refused (kernel vhost: EBUSY).
_allow((R.SET_OWNER,), (S.CONNECTED,), S.OWNED)
_allow((R.SET_FEATURES,), (S.OWNED,), S.NEGOTIATED)
# Re-sent on every device start, once per queue pair with multiqueue, and to toggle LOG_ALL. While
# a ring is started only the same bits are legal (the handler checks: it depends on ring phases).
_allow((R.SET_FEATURES,), _NEGOTIATED)
# RESET_OWNER is deprecated; the spec recommends only disabling rings, keeping the session.
_allow((R.RESET_OWNER,), _OWNED)
_allow((R.SET_VRING_CALL, R.SET_VRING_ERR, R.SET_VRING_ENABLE, R.GET_VRING_BASE), _OWNED)
_allow((R.SET_LOG_FD, R.SEND_RARP, R.NET_SET_MTU, R.SET_VRING_ENDIAN), _OWNED)
_allow((R.GET_CONFIG, R.SET_CONFIG, R.SET_STATUS, R.GET_STATUS), _OWNED)
# Ring size and base need the negotiated features (RING_PACKED changes their meaning).
_allow((R.SET_VRING_NUM, R.SET_VRING_BASE, R.GET_INFLIGHT_FD, R.SET_INFLIGHT_FD), _NEGOTIATED)
_allow((R.SET_MEM_TABLE, R.ADD_MEM_REG), (S.NEGOTIATED,), S.READY)
_allow((R.SET_MEM_TABLE, R.ADD_MEM_REG), _READY)
# REM_MEM_REG keeps READY while regions remain; without any, ring addresses cannot be translated.
_allow((R.REM_MEM_REG,), _READY)
_allow((Trigger.MEMORY_EMPTIED,), _READY, S.NEGOTIATED)
# Ring addresses are frontend virtual addresses: they mean nothing until memory is known, and a
# ring cannot start (SET_VRING_KICK) without them.
_allow((R.SET_VRING_ADDR, R.SET_VRING_KICK, R.SET_LOG_BASE, R.IOTLB_MSG), _READY)
# From CLOSED nothing moves: close() is idempotent by not asking again.
_allow((Trigger.CLOSED,), _OPEN, S.CLOSED)

SUPPORTED: frozenset[R] = frozenset(r for table in TRANSITIONS.values() for r in table if isinstance(r, R))
"""Requests legal in at least one state; everything else is "not supported by this backend"."""

P = RingPhase
RING_TRANSITIONS: dict[RingPhase, dict[R, RingPhase]] = {
    P.STOPPED: {
        R.SET_VRING_NUM: P.STOPPED,
        R.SET_VRING_ADDR: P.STOPPED,
        R.SET_VRING_BASE: P.STOPPED,
        R.SET_VRING_ENDIAN: P.STOPPED,
        R.SET_VRING_KICK: P.STARTED,  # spec: the ring starts on SET_VRING_KICK
        R.SET_VRING_CALL: P.STOPPED,
        R.SET_VRING_ERR: P.STOPPED,
        R.SET_VRING_ENABLE: P.STOPPED,
        R.GET_VRING_BASE: P.STOPPED,
        R.RESET_OWNER: P.STOPPED,
    },
    P.STARTED: {
        # Size, base and endianness of a running ring cannot change (kernel vhost: EBUSY);
        # addresses can (the LOG flag toggles during migration), and fds can be replaced.
        R.SET_VRING_ADDR: P.STARTED,
        R.SET_VRING_KICK: P.STARTED,
        R.SET_VRING_CALL: P.STARTED,
        R.SET_VRING_ERR: P.STARTED,
        R.SET_VRING_ENABLE: P.STARTED,
        R.GET_VRING_BASE: P.STOPPED,  # spec: the ring stops on GET_VRING_BASE
        R.RESET_OWNER: P.STOPPED,  # deprecated; it stops every ring (see EVERY_RING)
    },
}
EVERY_RING: frozenset[R] = frozenset({R.RESET_OWNER})
"""Ring requests that move every ring at once; the others name one ring in their payload."""
RING_REQUESTS: frozenset[R] = frozenset(r for table in RING_TRANSITIONS.values() for r in table) - EVERY_RING
"""Requests that name one ring: legal only if that ring's phase has them in ``RING_TRANSITIONS``."""


def next_state(state: ConnectionState, move: R | Trigger) -> ConnectionState:
    """The state ``move`` leads to from ``state``; ``FrontendProtocolError`` if the table has none."""
    nxt = TRANSITIONS[state].get(move)
    if nxt is None:
        raise FrontendProtocolError(f"not legal in state {state.name}")
    return nxt


def next_phase(phase: RingPhase, req: R, index: int) -> RingPhase:
    """The phase ``req`` moves ring ``index`` to from ``phase``; ``FrontendProtocolError`` if none."""
    nxt = RING_TRANSITIONS[phase].get(req)
    if nxt is None:
        raise FrontendProtocolError(f"not legal while vring {index} is {phase.value}")
    return nxt


@dataclass(frozen=True, kw_only=True)
class Gate:
    """Conditions besides the state. Each field is a bit number, or None for "no condition"."""

    protocol: int | None = None  # this protocol feature must have been negotiated
    protocol_offered: int | None = None  # this protocol feature must have been offered
    virtio_offered: int | None = None  # this virtio feature must be in GET_FEATURES
    virtio_acked: int | None = None  # this virtio feature must be in SET_FEATURES
    protocol_negotiated: bool = False  # SET_PROTOCOL_FEATURES must have been received


GATES: dict[R, Gate] = {
    R.GET_PROTOCOL_FEATURES: Gate(virtio_offered=f.VHOST_USER_F_PROTOCOL_FEATURES),
    R.SET_PROTOCOL_FEATURES: Gate(virtio_offered=f.VHOST_USER_F_PROTOCOL_FEATURES),
    # Spec: only when MQ is set in the *queried* protocol features.
    R.GET_QUEUE_NUM: Gate(protocol_offered=f.VHOST_USER_PROTOCOL_F_MQ),
    # Spec: only when VHOST_USER_F_PROTOCOL_FEATURES has been negotiated; QEMU sends it before
    # SET_FEATURES, so the evidence is SET_PROTOCOL_FEATURES.
    R.SET_VRING_ENABLE: Gate(protocol_negotiated=True),
    R.SEND_RARP: Gate(protocol=f.VHOST_USER_PROTOCOL_F_RARP),
    # QEMU sends NET_SET_MTU before SET_FEATURES on the first start, so MTU can only be "offered".
    R.NET_SET_MTU: Gate(protocol=f.VHOST_USER_PROTOCOL_F_NET_MTU, virtio_offered=VIRTIO_NET_F_MTU),
    R.SET_BACKEND_REQ_FD: Gate(protocol=f.VHOST_USER_PROTOCOL_F_BACKEND_REQ),
    R.IOTLB_MSG: Gate(virtio_acked=VIRTIO_F_ACCESS_PLATFORM),
    R.SET_VRING_ENDIAN: Gate(protocol=f.VHOST_USER_PROTOCOL_F_CROSS_ENDIAN),
    R.GET_CONFIG: Gate(protocol=f.VHOST_USER_PROTOCOL_F_CONFIG),
    R.SET_CONFIG: Gate(protocol=f.VHOST_USER_PROTOCOL_F_CONFIG),
    R.GET_INFLIGHT_FD: Gate(protocol=f.VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD),
    R.SET_INFLIGHT_FD: Gate(protocol=f.VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD),
    R.GET_MAX_MEM_SLOTS: Gate(protocol=f.VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS),
    R.ADD_MEM_REG: Gate(protocol=f.VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS),
    R.REM_MEM_REG: Gate(protocol=f.VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS),
    R.SET_STATUS: Gate(protocol=f.VHOST_USER_PROTOCOL_F_STATUS),
    R.GET_STATUS: Gate(protocol=f.VHOST_USER_PROTOCOL_F_STATUS),
    R.SET_LOG_BASE: Gate(protocol=f.VHOST_USER_PROTOCOL_F_LOG_SHMFD),
}


def gate_failure(
    req: R, *, offered: int, acked: int | None, offered_protocol: int, acked_protocol: int | None
) -> str | None:
    """Why ``req`` is not allowed by its gate, or None if it is."""
    gate = GATES.get(req)
    if gate is None:
        return None
    if gate.virtio_offered is not None and not f.has(offered, gate.virtio_offered):
        return f"needs virtio feature {f.feature_names(f.bit(gate.virtio_offered))[0]} offered"
    if gate.virtio_acked is not None and not f.has(acked or 0, gate.virtio_acked):
        return f"needs virtio feature {f.feature_names(f.bit(gate.virtio_acked))[0]} negotiated"
    if gate.protocol_offered is not None and not f.has(offered_protocol, gate.protocol_offered):
        name = f.feature_names(f.bit(gate.protocol_offered), protocol=True)[0]
        return f"needs protocol feature {name} offered"
    if gate.protocol_negotiated and acked_protocol is None:
        return "needs protocol features negotiated (SET_PROTOCOL_FEATURES)"
    if gate.protocol is not None and not f.has(acked_protocol or 0, gate.protocol):
        name = f.feature_names(f.bit(gate.protocol), protocol=True)[0]
        return f"needs protocol feature {name} negotiated"
    return None
