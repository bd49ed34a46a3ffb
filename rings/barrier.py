"""A full memory barrier for code that shares memory with another CPU (the guest's vCPUs) and has no
fence instruction to hand: Python has none, and the split ring needs one at two points (virtio 1.2
§2.7.10 and §2.7.7, both directions of notification suppression).

This module owns :func:`full_fence`. Where the device stores to guest memory and must then load what
the driver may have stored concurrently (used.idx then used_event; avail_event or the used flags then
avail.idx), each side's store must be visible before its own load, or both sides can read the other's
old value and both go to sleep: QEMU, Linux vhost and DPDK put ``smp_mb()`` at exactly those points.
A plain store then a plain load is not enough even on x86: TSO keeps stores in order and loads in
order, but lets a later load pass an earlier store (the store-buffer case: Intel SDM vol. 3A, "Loads
May Be Reordered with Earlier Stores to Different Locations").

What the fence is made of, and why it is enough on x86-64. Acquiring and releasing an uncontended
``_thread`` lock (``threading.Lock``) is an atomic read-modify-write in C. CPython 3.11 on Linux
builds its locks on POSIX semaphores (``Python/thread_pthread.h``, ``USE_SEMAPHORES``):
``lock.acquire()`` first tries without blocking (``Modules/_threadmodule.c``, ``acquire_timed``: "first
a simple non-blocking try without releasing the GIL"), ``PyThread_acquire_lock_timed(lock, 0, 0)``,
which is ``sem_trywait``; ``lock.release()`` is ``PyThread_release_lock``, which is ``sem_post``. In
glibc both are a ``lock cmpxchg`` on the semaphore word (``__new_sem_wait_fast``, ``__new_sem_post``).
Checked with gdb on CPython 3.11.2 and glibc 2.36 (Debian 12): one ``sem_trywait`` and one
``sem_post`` per acquire/release pair, each disassembling to ``lock cmpxchg``. On x86 a locked
instruction is a full barrier (Intel SDM vol. 3A, "Memory Ordering in P6 and More Recent Processor
Families": "Reads or writes cannot be reordered with I/O instructions, locked instructions, or
serializing instructions"), so every store the ring code issued before the call is globally visible
before any load it issues after. The numpy stores and loads around the call happen in other C
functions, so no compiler can move them across it either.

What it does not guarantee. On aarch64, glibc's semaphore CAS has acquire (trywait) or release (post)
semantics only: a later load may still be satisfied before an earlier store is visible, which is the
one reordering this fence exists to stop; a real ``dmb ish`` would be needed, and no CPython primitive
documents one. With a different lock implementation (another libc, or a CPython whose lock is a
``PyMutex``) the instruction must be checked again; on x86-64 every atomic compare-and-swap is a locked
instruction, so the argument holds wherever the lock's uncontended path is a CAS or an atomic add.

Cost: one call is about 70 ns here (two C calls on a prebound lock), paid once per batch at each of
the two points, never per packet.
"""

from __future__ import annotations

from _thread import allocate_lock

_LOCK = allocate_lock()  # never contended: only ever held for the instant between the two calls
_acquire = _LOCK.acquire
_release = _LOCK.release


def full_fence() -> None:
    """Order every earlier store before every later load on this CPU (x86-64: a locked instruction;
    see the module docstring for what it relies on and where it is not enough)."""
    _acquire()
    _release()
