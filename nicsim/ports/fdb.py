"""The forwarding database of a learning L2 switch: which port each MAC address was last seen on.

This module owns :class:`ForwardingTable`, pure and clock-driven (the caller passes ``now`` in seconds):
:meth:`~ForwardingTable.learn` records the source addresses of a batch received on one port,
:meth:`~ForwardingTable.lookup` maps a batch of destination addresses to an output port or
:data:`FLOOD`. MAC addresses are uint64 keys (the six bytes big-endian, see :func:`mac_keys`), kept in
one sorted array so that a batch is learned or looked up with one ``searchsorted``; steady-state
learning of known addresses allocates nothing per frame and inserts nothing.

Rules, as a Linux bridge applies them (net/bridge/br_fdb.c, br_input.c):
- a destination with the group bit set (broadcast, multicast) always floods; an unknown or aged-out
  unicast destination floods;
- a source with the group bit set is never learned (it is not a valid station address);
- an entry ages out ``ageing`` seconds after its address was last seen as a *source* (default 300 s,
  the bridge's ``ageing_time``; 0 means nothing stays learned, a hub);
- an address seen on another port moves there (counted as ``moved``);
- the table holds at most ``max_entries``: past it the least recently seen entries are evicted
  (counted), after aged-out ones are purged;
- a destination on the port the frame came in on is filtered (:data:`FILTER`), not sent back.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_AGEING", "FILTER", "FLOOD", "ForwardingTable", "fan_out", "is_group", "mac_key", "mac_keys",
    "mac_text",
]

FLOOD: Final = -1   # send to every port but the ingress one
FILTER: Final = -2  # the destination sits behind the ingress port: send nowhere
DEFAULT_AGEING: Final = 300.0  # seconds, as Linux's bridge ageing_time
_GROUP_BIT_INT: Final = 1 << 40  # the I/G bit: least significant bit of the first octet
_GROUP_BIT: Final = np.uint64(_GROUP_BIT_INT)
_MAC_WEIGHTS = np.array([1 << (8 * (5 - i)) for i in range(6)], dtype=np.uint64)
_MAC_BYTES = np.arange(6, dtype=np.int64)

MacKeys = npt.NDArray[np.uint64]


def mac_keys(data: npt.NDArray[np.uint8], offsets: npt.NDArray[np.int64], at: int = 0) -> MacKeys:
    """The MAC address at byte ``at`` of every frame (0: destination, 6: source) as uint64 keys."""
    octets = data[np.asarray(offsets, dtype=np.int64)[:, None] + (at + _MAC_BYTES)[None, :]]
    keys: MacKeys = (octets.astype(np.uint64) * _MAC_WEIGHTS).sum(axis=1, dtype=np.uint64)
    return keys


def mac_key(mac: str | bytes) -> int:
    """One MAC address (``"52:54:00:12:34:56"`` or six bytes) as the integer key the table uses."""
    raw = mac if isinstance(mac, bytes) else bytes(int(p, 16) for p in mac.split(":"))
    if len(raw) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return int.from_bytes(raw, "big")


def mac_text(key: int) -> str:
    return ":".join(f"{b:02x}" for b in int(key).to_bytes(6, "big"))


def is_group(keys: MacKeys) -> npt.NDArray[np.bool_]:
    """Broadcast and multicast addresses (the group bit), which a switch always floods."""
    group: npt.NDArray[np.bool_] = (np.asarray(keys, dtype=np.uint64) & _GROUP_BIT) != 0
    return group


def fan_out(
    out_ports: npt.NDArray[np.int32], ingress: int, ports: int | list[int]
) -> dict[int, npt.NDArray[np.intp]]:
    """Which frames of a batch go to which port: ``{port: frame indices}`` for every port in ``ports``
    (a count, or the list of ports up now) but ``ingress``, from :meth:`ForwardingTable.lookup`'s
    answer. A flooded frame goes to all of them; ports with nothing to send are left out."""
    flood = out_ports == FLOOD
    targets = range(ports) if isinstance(ports, int) else ports
    result = {}
    for port in targets:  # one vectorised pass per port, not per frame
        if port == ingress:
            continue
        picked = np.flatnonzero(flood | (out_ports == port))
        if picked.size:
            result[port] = picked
    return result


class ForwardingTable:
    """A learning switch's MAC table for ports numbered 0, 1, ... (the caller's numbering)."""

    def __init__(self, *, ageing: float = DEFAULT_AGEING, max_entries: int = 4096) -> None:
        if not ageing >= 0:
            raise ValueError(f"ageing must be >= 0 seconds, got {ageing!r}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries!r}")
        self.ageing = float(ageing)
        self.max_entries = max_entries
        # Three parallel arrays sorted by key: one searchsorted serves a whole batch.
        self._keys: MacKeys = np.zeros(0, np.uint64)
        self._ports = np.zeros(0, np.int32)
        self._seen = np.zeros(0, np.float64)
        self._by_key: dict[int, int] | None = None  # key -> position in the arrays, built when asked
        self.counters = dict.fromkeys(
            ("learned", "moved", "aged", "evicted", "forgotten", "group_source",
             "hit", "flood_unknown", "flood_group", "filtered"), 0)

    def __len__(self) -> int:
        return int(self._keys.size)

    # -- learning --------------------------------------------------------------------------------

    def learn(self, src_macs: MacKeys, port: int, now: float) -> None:
        """Record that the addresses in ``src_macs`` (a batch received on ``port``) live there."""
        if port < 0:
            raise ValueError(f"port must be >= 0, got {port}")
        macs = np.unique(np.asarray(src_macs, dtype=np.uint64))
        group = is_group(macs)
        if group.any():
            self.counters["group_source"] += int(group.sum())
            macs = macs[~group]
        if macs.size == 0:
            return
        pos, found = self._find(macs)
        known = pos[found]
        if known.size:
            moved = self._ports[known] != port
            self.counters["moved"] += int(moved.sum())
            self._ports[known] = port
            self._seen[known] = now
        new = macs[~found]
        if new.size:
            self._insert(new, port, now)

    def learn_one(self, key: int, port: int, now: float) -> None:
        """:meth:`learn` for one address, with plain ints: what a batch of a frame or two costs
        (a ping, a TCP stream's few GSO frames per round) instead of a dozen numpy calls."""
        if key & _GROUP_BIT_INT:
            self.counters["group_source"] += 1
            return
        i = self._positions().get(key)
        if i is None:
            self.learn(np.array([key], np.uint64), port, now)
            return
        if self._ports[i] != port:
            self.counters["moved"] += 1
            self._ports[i] = port
        self._seen[i] = now

    def _positions(self) -> dict[int, int]:
        if self._by_key is None:
            self._by_key = {key: i for i, key in enumerate(self._keys.tolist())}
        return self._by_key

    def _insert(self, new: MacKeys, port: int, now: float) -> None:
        self.expire(now)  # aged entries make room before live ones are evicted
        self._by_key = None
        at = np.searchsorted(self._keys, new)
        self._keys = np.insert(self._keys, at, new)
        self._ports = np.insert(self._ports, at, np.int32(port))
        self._seen = np.insert(self._seen, at, now)
        self.counters["learned"] += int(new.size)
        excess = self._keys.size - self.max_entries
        if excess > 0:
            # Least recently seen first; a stable sort keeps the choice reproducible among equals.
            oldest = np.argsort(self._seen, kind="stable")[:excess]
            self._remove(oldest)
            self.counters["evicted"] += excess

    def _find(self, macs: MacKeys) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.bool_]]:
        if self._keys.size == 0:
            return np.zeros(macs.size, np.intp), np.zeros(macs.size, np.bool_)
        pos = np.minimum(np.searchsorted(self._keys, macs), self._keys.size - 1)
        return pos, self._keys[pos] == macs

    def _remove(self, index: npt.NDArray[np.intp]) -> None:
        self._by_key = None
        self._keys = np.delete(self._keys, index)
        self._ports = np.delete(self._ports, index)
        self._seen = np.delete(self._seen, index)

    # -- forwarding ------------------------------------------------------------------------------

    def lookup(self, dst_macs: MacKeys, now: float, *, ingress: int | None = None) -> npt.NDArray[np.int32]:
        """The output port of each destination: a port number, :data:`FLOOD`, or (with ``ingress``,
        when the destination was learned on that same port) :data:`FILTER`. Does not refresh entries."""
        dst = np.asarray(dst_macs, dtype=np.uint64)
        out = np.full(dst.size, FLOOD, dtype=np.int32)
        group = is_group(dst)
        pos, found = self._find(dst)
        hit = found & ~group
        hit[hit] = self._live(self._seen[pos[hit]], now)
        out[hit] = self._ports[pos[hit]]
        n_group = int(group.sum())
        self.counters["flood_group"] += n_group
        self.counters["flood_unknown"] += dst.size - n_group - int(hit.sum())
        if ingress is not None:
            same = out == ingress
            self.counters["filtered"] += int(same.sum())
            out[same] = FILTER
        self.counters["hit"] += int((out >= 0).sum())
        return out

    def lookup_one(self, key: int, now: float, *, ingress: int | None = None) -> int:
        """:meth:`lookup` for one address, with plain ints; counts as it does."""
        port = FLOOD
        if key & _GROUP_BIT_INT:
            self.counters["flood_group"] += 1
        else:
            i = self._positions().get(key)
            if i is not None and now - float(self._seen[i]) < self.ageing:
                port = int(self._ports[i])
            else:
                self.counters["flood_unknown"] += 1
        if ingress is not None and port == ingress:
            self.counters["filtered"] += 1
            return FILTER
        if port >= 0:
            self.counters["hit"] += 1
        return port

    def _live(self, seen: npt.NDArray[np.float64], now: float) -> npt.NDArray[np.bool_]:
        # Expired once ``ageing`` seconds have passed, as br_fdb's has_expired (time_before_eq).
        return (now - seen) < self.ageing

    # -- removal ---------------------------------------------------------------------------------

    def expire(self, now: float) -> int:
        """Drop the entries that have aged out; returns how many."""
        dead = np.flatnonzero(~self._live(self._seen, now))
        if dead.size:
            self._remove(dead)
            self.counters["aged"] += int(dead.size)
        return int(dead.size)

    def forget_port(self, port: int) -> int:
        """Drop every address learned on ``port`` (its guest left); returns how many."""
        gone = np.flatnonzero(self._ports == port)
        if gone.size:
            self._remove(gone)
            self.counters["forgotten"] += int(gone.size)
        return int(gone.size)

    # -- inspection ------------------------------------------------------------------------------

    def arrays(self) -> tuple[MacKeys, npt.NDArray[np.int32], npt.NDArray[np.float64]]:
        """The table as a compiled forward reads it (``nicsim.ports.switch_kernel``): the sorted keys,
        their ports and when each was last seen as a source (which it may refresh in place, as
        :meth:`learn` does for a known address on its own port). Replaced, not changed, when an entry
        comes or goes: ask again for each round."""
        return self._keys, self._ports, self._seen

    def port_of(self, mac: str | bytes | int, now: float) -> int | None:
        """The port ``mac`` is live on, or None."""
        key = mac if isinstance(mac, int) else mac_key(mac)
        pos, found = self._find(np.array([key], dtype=np.uint64))
        if not found[0] or not self._live(self._seen[pos], now)[0]:
            return None
        return int(self._ports[pos[0]])

    def entries_per_port(self, ports: int) -> npt.NDArray[np.int64]:
        """How many addresses each of ports ``0 .. ports-1`` holds (aged ones included until purged)."""
        return np.bincount(self._ports, minlength=ports)[:ports].astype(np.int64)

    def entries(self, now: float) -> list[tuple[str, int, float]]:
        """Every live entry as (MAC text, port, seconds since last seen), for display."""
        live = self._live(self._seen, now)
        return [
            (mac_text(int(k)), int(p), float(now - s))
            for k, p, s in zip(self._keys[live], self._ports[live], self._seen[live], strict=True)
        ]
