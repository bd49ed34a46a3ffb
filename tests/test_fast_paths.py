"""The hot path's shortcuts give exactly what the general code gives: the walker's one-descriptor batch,
single-region address translation, and the generator's template write at any buffer alignment."""

from __future__ import annotations

import numpy as np
import pytest

from nicsim.ports import GeneratorConfig, GeneratorPort
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.features import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1
from nicsim.virtio.rx import scatter_template_words
from rings.chains import ChainBatch
from rings.driver import GuestDriver
from rings.errors import GuestMemoryError
from rings.memory import GuestMemory, MemoryRegion
from rings.walker import ChainWalker

U64 = 1 << 64


def _reference_translate(
    mem: GuestMemory, gpas: list[int], lens: list[int]
) -> tuple[list[int], list[int], list[bool]]:
    region: list[int] = []
    offset: list[int] = []
    ok: list[bool] = []
    for g, n in zip(gpas, lens, strict=True):
        if n == 0:
            region.append(-1), offset.append(0), ok.append(True)
            continue
        try:
            r, o = mem._find(g, n)
        except GuestMemoryError:
            region.append(-1), offset.append(0), ok.append(False)
        else:
            region.append(r), offset.append(o), ok.append(True)
    return region, offset, ok


@pytest.mark.parametrize(
    "layout",
    [
        [(0, 4096)],
        [(1 << 20, 8192)],
        [(U64 - 4096, 4096)],
        [(5, 1)],
        [(0, 4096), (4096, 4096)],
        [(4096, 100), (1 << 30, 1 << 12), (U64 - 10, 10)],
    ],
)
def test_translate_batch_matches_one_lookup_at_a_time(layout: list[tuple[int, int]]) -> None:
    mem = GuestMemory(
        [
            MemoryRegion(guest_phys_addr=s, size=z, user_addr=i << 40, data=np.zeros(z, np.uint8))
            for i, (s, z) in enumerate(layout)
        ]
    )
    edges = {0, 1, 2, U64 - 1, U64 - 2}
    for s, z in layout:
        for d in (-2, -1, 0, 1, 2):
            edges |= {(s + d) % U64, (s + z + d) % U64, (z + d) % U64}
    values = sorted(edges)
    gpas = [a for a in values for _ in values]
    lens = [n for _ in values for n in values]
    region, offset, ok = mem.translate_batch(np.array(gpas, np.uint64), np.array(lens, np.uint64))
    ref = _reference_translate(mem, gpas, lens)
    assert region.dtype == np.int32 and offset.dtype == np.uint64 and ok.dtype == np.bool_
    assert region.tolist() == ref[0]
    assert offset.tolist() == ref[1]
    assert ok.tolist() == ref[2]


def _batches_equal(a: ChainBatch, b: ChainBatch) -> None:
    for name in (
        "heads", "first_seg", "seg_count", "readable_len", "writable_len", "error", "seg_chain", "seg_desc",
        "seg_addr", "seg_len", "seg_writable", "seg_region", "seg_offset",
    ):  # fmt: skip
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        assert x.tolist() == y.tolist(), name
    assert sorted(a.errors) == sorted(b.errors)
    for k in a.errors:
        assert type(a.errors[k]) is type(b.errors[k]) and str(a.errors[k]) == str(b.errors[k])


@pytest.mark.parametrize("seed", range(6))
def test_one_descriptor_batches_walk_as_the_lockstep_walk_does(seed: int) -> None:
    rng = np.random.default_rng(seed)
    drv = GuestDriver()
    q = drv.add_queue(0, 64)
    end = drv.ram.end
    for _ in range(48):
        kind = int(rng.integers(0, 6))
        buf = drv.ram.alloc(256)
        if kind == 0:
            seg = (buf, 256, True)
        elif kind == 1:
            seg = (buf + 3, 100, False)
        elif kind == 2:
            # Zero length: any address, never translated.
            seg = (int(rng.integers(0, U64, dtype=np.uint64)), 0, bool(rng.integers(0, 2)))
        elif kind == 3:
            seg = (end + 64, 64, True)  # outside guest memory
        elif kind == 4:
            seg = (end - 8, 64, False)  # runs past the end of RAM
        else:
            seg = (buf, 1, bool(rng.integers(0, 2)))
        q.post_chain([seg])
    dq = q.device_queue()
    mem = drv.memory
    heads = dq.pop_avail(mem, 48)
    fast = ChainWalker(mem, dq._views(mem), heads, queue=dq.index, indirect=True).run()
    slow_walker = ChainWalker(mem, dq._views(mem), heads, queue=dq.index, indirect=True)
    slow = slow_walker._run_lockstep(heads.astype(np.int64))
    assert len(fast.errors) > 0  # the batch did exercise the failure branch
    _batches_equal(fast, slow)


@pytest.mark.parametrize("misalign", [0, 1, 4, 7])
@pytest.mark.parametrize("size", [60, 64, 1496])
def test_generator_writes_exact_frames_into_buffers_at_any_alignment(misalign: int, size: int) -> None:
    """DPDK's virtio-user posts RX buffers at 4 mod 8; every alignment gets the same bytes, nothing past
    the header + frame is touched, and buffers in both regions are written."""
    drv = GuestDriver((1 << 20, 1 << 20))
    rx = drv.add_queue(0, 64, event_idx=True)
    drv.add_queue(1, 64, event_idx=True)
    gen = GeneratorPort(GeneratorConfig(size=size, count=16))
    dev = VirtioNetDevice(port=gen)
    dev.set_features((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_EVENT_IDX))
    dev.set_memory(drv.memory)
    dev.start_queue(0, rx.device_queue())
    buf_len = 12 + 1514
    bufs = []
    for i in range(16):
        base = drv.ram.alloc(buf_len + 16, region=i % 2)
        drv.ram.write(base, b"\xaa" * (buf_len + 16))
        gpa = base + misalign
        bufs.append((base, gpa))
        rx.post_chain([(gpa, buf_len, True)])
    res = dev.poll_rx(0)
    assert res.processed == 16
    done = rx.reap()
    assert [c.len for c in done] == [12 + size] * 16
    hdr = bytes(10) + (1).to_bytes(2, "little")
    for c in done:
        assert c.data == hdr + gen.template.tobytes()
    for base, gpa in bufs:
        assert drv.ram.read(base, misalign) == b"\xaa" * misalign
        after = gpa + 12 + size
        assert drv.ram.read(after, base + buf_len + 16 - after) == b"\xaa" * (base + buf_len + 16 - after)


def test_template_write_declines_multi_segment_chains() -> None:
    drv = GuestDriver()
    q = drv.add_queue(0, 16)
    for _ in range(2):
        a, b = drv.ram.alloc(12), drv.ram.alloc(1514)
        q.post_chain([(a, 12, True), (b, 1514, True)])
    dq = q.device_queue()
    cb = dq.walk(drv.memory, dq.pop_avail(drv.memory, 2))
    before = drv.ram.backing.copy()
    assert not scatter_template_words(drv.memory, cb, np.arange(2), np.ones(72, np.uint8))
    assert np.array_equal(before, drv.ram.backing)
