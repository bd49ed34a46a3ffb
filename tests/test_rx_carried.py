"""Big frames a header-passing port (the TAP) queued with their headers reach mergeable buffers the
same whether written straight from the backlog (``RxPath._deliver_carried``: header and frame into the
buffers, a compiled call per frame with the kernels on) or staged first (the batch path's copy and
scatter): the same used entries, bytes, headers (num_buffers, GSO fields kept with GUEST_CSUM, zeroed
without), stats and drops, in random rounds where buffers run out and frames wait."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from nicsim.virtio import rx as rx_module
from rings import kernels
from rings.driver import TxLayout
from tests.test_short_rounds import GCSUM, MRG, V1, World, world

HUGE = 1 << 40  # a SLICE_COPY_MIN no round reaches: every round staged


def step(w: World, op: tuple[Any, ...], staged: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(rx_module, "SLICE_COPY_MIN", HUGE if staged else 1024)
    kind = op[0]
    if kind == "post":
        _, size, count = op
        return w.rx.post_rx(size, count=count, layout=TxLayout.ONE) if w.rx.num_free >= count else "full"
    if kind == "push":
        return [w.dev.push(np.frombuffer(body, np.uint8)) for body in op[1]]
    if kind == "round":
        return w.dev.deliver_rx(0)
    return [(c.id, c.len, c.data) for c in w.rx.reap()]


@pytest.mark.parametrize("engine", ["numpy", "compiled"])
@pytest.mark.parametrize("csum", [True, False], ids=["guest-csum", "no-guest-csum"])
@pytest.mark.parametrize("seed", range(3))
def test_big_carried_frames_land_as_staged_frames_do(
    engine: str, csum: bool, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(seed)
    features = V1 | MRG | (GCSUM if csum else 0)
    ops: list[tuple[Any, ...]] = []
    for _ in range(40):
        r = int(rng.integers(0, 4))
        if r == 0:
            ops.append(("post", int(rng.choice([12 + 1514, 2048, 4096])), int(rng.integers(1, 12))))
        elif r == 1:
            frames = []
            for _ in range(int(rng.integers(1, 4))):
                header = bytearray(rng.integers(0, 256, 12, dtype=np.uint8).tobytes())
                header[1] = int(rng.choice([0, 1, 4, 0x81]))  # none, TCPv4, TCPv6, TCPv4 with ECN
                size = int(rng.choice([1200, 1514, 3000, 9000, 20000]))
                frames.append(bytes(header) + rng.integers(0, 256, size, dtype=np.uint8).tobytes())
            ops.append(("push", frames))
        elif r == 2:
            ops.append(("round",))
        else:
            ops.append(("reap",))
    ops += [("post", 4096, 30), ("round",), ("reap",)]
    worlds = []
    for _ in range(2):
        w = world(features, short_round=0, carried=True, hooks=False, pool=64, tx_batch=32, rx_batch=32)
        worlds.append(w)
    direct, staged = worlds
    if engine == "compiled":
        assert kernels.enable()
    try:
        for op in ops:
            got = step(direct, op, False, monkeypatch)
            want = step(staged, op, True, monkeypatch)
            assert got == want, op
        snap_d, snap_s = direct.dev.snapshot(), staged.dev.snapshot()
        for snap in (snap_d, snap_s):
            for q in snap["queues"]:
                q.pop("inflight_high")
        assert snap_d == snap_s
        assert snap_d["queues"][0]["packets"] > 0
    finally:
        kernels.disable()
