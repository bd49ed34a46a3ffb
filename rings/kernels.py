"""The compiled kernels of the hot path, and the switch between them and the numpy path.

The kernels' sources are plain Python over arrays: the chain walk (:mod:`rings.walk_kernel`), the
pool's free and track loops (:mod:`rings.pool_kernels`) and whole device rounds
(:mod:`rings.round_kernels`). Each takes only what it can finish without an error and declines the
rest, with nothing changed, to the numpy code, which stays the reference the tests compare them with.
They are compiled with numba (an established package with wheels, needing no compiler here) only when
:func:`enable` is called: importing this module imports no compiler, and a machine without numba keeps
the numpy path. The compiled code is cached on disk (numba's ``cache=True``), so only the first
process after an install pays the compile. Callers look a kernel up here on every use (``None``: off).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from . import round_kernels as rk
from .chains import ChainBatch
from .layout import DESC_DTYPE, vring_need_event
from .pool_kernels import _free_normal_py, _track_py
from .pool_layout import descriptor_dtype
from .scatter_kernel import _scatter_frame_py
from .walk_kernel import _Arrays, _declined_py, _walk_into_py, _walk_split_py, _walk_table_py

__all__ = [
    "absorb_split", "complete_split", "disable", "enable", "enabled", "engine", "fill_split", "free_normal",
    "link", "return_chunk", "scatter_frame", "scatter_template", "sum_frames", "take_split", "track",
    "walk_split",
]  # fmt: skip

_compiled_walk: Callable[..., _Arrays] | None = None
free_normal: Callable[..., int] | None = None
"""The compiled ``rings.pool_kernels._free_normal_py`` once enabled (the pool calls it), else None."""
track: Callable[..., bool] | None = None
"""The compiled ``rings.pool_kernels._track_py`` once enabled (the pool calls it), else None."""
take_split: Callable[..., tuple[int, int]] | None = None
"""The compiled ``rings.round_kernels._take_split_py`` once enabled (``SplitQueue.take_round``)."""
complete_split: Callable[..., int] | None = None
"""The compiled ``rings.round_kernels._complete_split_py`` once enabled, else None."""
scatter_template: Callable[..., int] | None = None
"""The compiled ``rings.round_kernels._scatter_template_py`` once enabled, else None."""
sum_frames: Callable[..., tuple[int, int]] | None = None
"""The compiled ``rings.round_kernels._sum_frames_py`` once enabled, else None."""
fill_split: Callable[..., tuple[int, int]] | None = None
"""The compiled ``rings.round_kernels._fill_split_py`` once enabled (``SplitQueue.fill_round``)."""
absorb_split: Callable[..., tuple[int, int, int]] | None = None
"""The compiled ``rings.round_kernels._absorb_split_py`` once enabled (``SplitQueue.absorb_round``)."""
scatter_frame: Callable[..., int] | None = None
"""The compiled ``rings.scatter_kernel._scatter_frame_py`` once enabled, else None."""
return_chunk: Callable[..., int] | None = None
"""The compiled ``rings.round_kernels._return_chunk_py`` once enabled, else None: for kernels
outside ``rings`` that take a round with :data:`take_split` and give it back in the same call (a
port's own compiled round, ``nicsim.ports.fd_kernels``)."""
_why_not: str = "not enabled"
_compiled: tuple[Callable[..., Any], ...] | None = None  # compiled once per process, kept across disable


def link(fn: Callable[..., Any], **helpers: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with the helpers it calls by name bound to ``helpers`` (compiled ones, so that numba
    compiles a call into them), leaving the module's own names, the Python sources, as they are.
    Public for kernels outside ``rings`` that call these (``nicsim.ports.fd_kernels``)."""
    return types.FunctionType(fn.__code__, {**fn.__globals__, **helpers}, fn.__name__, fn.__defaults__,
                              fn.__closure__)  # fmt: skip


def enable() -> bool:
    """Compile (or load from numba's cache) the kernels and use them; False, with the reason in
    :func:`engine`, when numba is missing or fails. Idempotent."""
    global _compiled
    if _compiled_walk is not None:
        return True
    if _compiled is None:
        _compiled = _compile()
    if _compiled is None:
        return False
    _install(_compiled)
    return True


def _install(kernels: tuple[Callable[..., Any], ...] | None) -> None:
    """Make ``kernels`` (as :func:`_compile` returns them) the ones callers find, or None for none."""
    global _compiled_walk, free_normal, track, take_split, complete_split, scatter_template, sum_frames
    global absorb_split, fill_split, scatter_frame, return_chunk
    values: tuple[Any, ...] = kernels if kernels is not None else (None,) * 11
    (_compiled_walk, free_normal, track, take_split, complete_split, scatter_template, sum_frames,
     absorb_split, fill_split, scatter_frame, return_chunk) = values


def _compile() -> tuple[Callable[..., Any], ...] | None:
    """Compile the kernels (or load them from numba's disk cache), once per process: the walk, free,
    track, take, complete, scatter and sum kernels; None, with the reason kept, when that fails."""
    global _why_not
    try:
        import numba
    except ImportError as exc:  # the numpy path stays: slower, never wrong
        _why_not = f"numba is not installed ({exc})"
        return None
    try:
        # The GIL stays held: the pool kernels mark descriptors they are checking, which no other
        # thread may see (the interlocked pool calls them under its lock anyway).
        jit = numba.njit(cache=True, boundscheck=False)
        declined, free_fn = jit(_declined_py), jit(_free_normal_py)
        walk_into = jit(link(_walk_into_py, _walk_table=jit(_walk_table_py)))
        walk = jit(link(_walk_split_py, _declined=declined, _walk_into=walk_into))
        track_fn = jit(_track_py)
        take = jit(link(rk._take_split_py, _walk_into=walk_into))
        complete = jit(link(rk._complete_split_py, _free_normal=free_fn))
        scatter, summer = jit(rk._scatter_template_py), jit(rk._sum_frames_py)
        store_fence = compiled_fence(numba, "release")
        wants = jit(link(rk._wants_interrupt_py, vring_need_event=jit(vring_need_event)))
        next_round = jit(link(rk._next_round_py, _full_fence=compiled_fence(numba, "seq_cst"),
                               _load_fence=compiled_fence(numba, "acquire"), _wants_interrupt=wants))
        return_chunk = jit(link(rk._return_chunk_py, _complete_split=complete, _store_fence=store_fence))
        absorb = jit(link(rk._absorb_split_py, _take_split=take, _sum_frames=summer,
                           _return_chunk=return_chunk, _next_round=next_round))
        fill = jit(link(rk._fill_split_py, _take_split=take, _scatter_template=scatter,
                         _return_chunk=return_chunk, _next_round=next_round))
        frame = jit(_scatter_frame_py)
        _compile_now(walk, take, complete, scatter, summer, absorb, fill, frame)
    except Exception as exc:  # numba raises its own error classes; any of them means: no kernels
        _why_not = f"numba could not compile the kernels ({type(exc).__name__}: {exc})"
        return None
    return walk, free_fn, track_fn, take, complete, scatter, summer, absorb, fill, frame, return_chunk


def compiled_fence(numba: Any, ordering: str) -> Any:
    """A compiled LLVM ``fence`` for kernels to call (here and in ``nicsim.ports.fd_kernels``).
    ``release``: every load and store before it is done before any store after it; ``acquire``:
    every load before it is done before any load or store after it; the compiler moves nothing
    across either, and on x86-64 neither is an instruction (TSO already orders these), elsewhere
    each is the barrier the hardware needs. ``seq_cst``: also every store before it before any load
    after it (x86-64: ``mfence``)."""

    def fence(typingctx: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            builder.fence(ordering)
            return context.get_dummy_value()

        return numba.types.void(), codegen

    return numba.extending.intrinsic(fence)


def _compile_now(*kernels: Callable[..., Any]) -> None:
    """Compile for the argument types the rings pass (field views of structured arrays, contiguous
    work arrays), now rather than in the first round."""
    walk, take, complete, scatter, summer, absorb, fill, frame = kernels
    table = np.zeros(2, DESC_DTYPE)
    ring = (table["addr"], table["len"], table["flags"], table["next"])
    bounds = (np.zeros(1, np.uint64), np.ones(1, np.uint64))
    for regions in (1, 2):
        walk(np.zeros(0, np.uint16), *ring, *bounds, tuple(np.zeros(8, np.uint8) for _ in range(regions)),
             True)  # fmt: skip
    # The pool's fields as PacketPool.round_state gives them (reserved 0, the device's pools).
    record = np.zeros(2, descriptor_dtype(0))
    arrays = (record["state"], record["ever"], np.arange(2, dtype=np.intp), record["queue"], record["head"],
              record["addr"], record["length"], record["reserved"])  # fmt: skip
    area = rk.RoundArea(2)
    avail = np.zeros(5, np.uint16)[2:4]
    for regions in (1, 2):
        datas = tuple(np.zeros(8, np.uint8) for _ in range(regions))
        take(avail, *ring, *bounds, datas, 0, 0, True, True, 0, 0, 0, 0, 2, *arrays, 0, *area.outputs)
        take(avail, *ring, *bounds, datas, 0, 0, False, False, 0, 0, 0, 0, 2, *arrays, 0, *area.outputs)
    used = np.zeros(4, np.uint32).reshape(2, 2)
    complete(used, 0, area.heads[:0], area.lens[:0], area.descs[:0], 0, 2, arrays[0], arrays[2])
    scatter(np.zeros(8, np.uint8), 0, 0, area.s_region[:0], area.s_offset[:0], area.s_len[:0],
            area.s_writable[:0], np.zeros(1, np.uint8), area.lens[:0])  # fmt: skip
    summer(np.zeros(8, np.uint8), 0, 0, area.s_chain, area.s_region, area.s_offset, area.s_len,
           area.s_writable, 12)
    # One version per number of guest memory regions (a tuple of their bytes): QEMU gives one or two
    # for a small guest; another count compiles in its first round (once: numba caches it on disk).
    for regions in (1, 2):
        datas = tuple(np.zeros(8, np.uint8) for _ in range(regions))
        absorb(avail, *ring, *bounds, 0, 0, True, 0, 0, 0, 0, 2, *arrays, 0, *area.outputs, used, 0,
               area.zeros, datas, True, np.zeros(2, np.uint16), 0, np.zeros(5, np.uint16), 1, 0, True, 0)
        fill(avail, *ring, *bounds, 0, 0, True, 0, 0, 2, *arrays, 0, *area.outputs, used, 0, datas,
             np.zeros(1, np.uint8), np.zeros(2, np.uint16), 0, np.zeros(5, np.uint16), 1, 0, True, 0, 0)
        frame(datas, area.s_region, area.s_offset, area.s_len, area.s_writable, area.first[:0],
              np.zeros(1, np.uint8), np.zeros(1, np.uint8))


def disable() -> None:
    """Back to the numpy walker everywhere (the reference; tests compare the two). The compiled
    kernels are kept: ``enable`` puts them back without compiling again."""
    global _why_not
    _install(None)
    _why_not = "disabled"


def enabled() -> bool:
    return _compiled_walk is not None


def engine() -> str:
    """What walks the batches, for stats and ``--help``: ``compiled`` or ``numpy (why)``."""
    return "compiled" if _compiled_walk is not None else f"numpy ({_why_not})"


def walk_split(
    heads: npt.NDArray[np.uint16],
    table: Any,
    starts: npt.NDArray[np.uint64],
    sizes: npt.NDArray[np.uint64],
    *,
    datas: tuple[npt.NDArray[np.uint8], ...],
    indirect: bool,
    walk: Callable[..., _Arrays] | None = None,
) -> ChainBatch | None:
    """The ChainBatch of ``heads`` over descriptor ``table`` (a :class:`~rings.walker.DescriptorTable`)
    and guest memory regions ``starts``/``sizes`` (sorted) whose bytes are ``datas`` (indirect tables
    are read there), or None when the kernels are off or the batch needs the numpy walker. ``walk``
    overrides the kernel (the tests pass the Python source)."""
    fn = walk if walk is not None else _compiled_walk
    if fn is None:
        return None
    out = fn(heads, table.d_addr, table.d_len, table.d_flags, table.d_next, starts, sizes, datas, indirect)
    if not out[0]:
        return None
    n = heads.shape[0]
    return ChainBatch(
        heads=heads, first_seg=out[1], seg_count=out[2], readable_len=out[3], writable_len=out[4],
        error=np.zeros(n, np.uint8), errors={}, seg_chain=out[5], seg_desc=out[6], seg_addr=out[7],
        seg_len=out[8], seg_writable=out[9], seg_region=out[10], seg_offset=out[11],
    )  # fmt: skip
