"""The guest image for test sessions, built at most once at a time however many processes ask.

``images.build.build_image`` is safe against a finished image being published twice (one rename,
the loser keeps the winner's), but two builds that start together both download into the shared
``debs/`` directory: one can hash a ``.deb`` the other is still writing, find a wrong SHA-256 and
delete it under the other's feet. pytest-xdist starts every worker at once, so ``locked_build_image``
holds an exclusive ``flock`` on ``<cache>/.build.lock`` around the call: the first worker builds,
the others wait and then find the image in the cache. The lock is the kernel's, so it is released
when a process dies.
"""

from __future__ import annotations

import fcntl
from collections.abc import Callable
from pathlib import Path
from typing import Any

LOCK_NAME = ".build.lock"


def locked_build_image(cache_dir: Path | None = None, *, progress: Callable[[str], None] = print) -> Any:
    """``images.build.build_image(cache_dir)`` under the cache's build lock; returns its ``GuestImage``."""
    from images.build import build_image, default_cache_dir  # only sessions that boot guests pay for it

    cache = (cache_dir or default_cache_dir()).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / LOCK_NAME).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return build_image(cache, progress=progress)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
