"""Chunk versions, the store's crash points, and who holds a Milvus Lite file.

A version names one write's chunks: `<ms since the epoch, hex>-<random>`, so garbage
collection can tell a version some writer is still busy with (young, not yet named by the
registry) from one an interrupted ingestion left behind (old). Versions written before this
format (32 hex digits) count as old.

`checkpoint(point)` marks the steps of a write (see DocStore.replace). It does nothing
unless the test hook LMSTACK_TEST_CRASH_AT is set: `<point>[:<n>]` kills this process with
SIGKILL the n-th time (default the first) a write reaches `<point>`; `any` matches every
point. tests/hardening/test_store_crash.py uses it to kill real ingestions mid-write.
"""

from __future__ import annotations

import math
import os
import signal
import time
import uuid
from pathlib import Path

CRASH_ENV = "LMSTACK_TEST_CRASH_AT"
# In write order: what a crash right after each leaves behind is in DocStore.replace.
CRASH_POINTS = (
    "after_gc",
    "after_chunks",
    "after_flush",
    "after_registry",
    "after_delete",
    "after_batch",
)
# A version nobody names is deleted only when older than this: longer than any writer takes
# from inserting its chunks to naming them in the registry (one embedding batch, a flush).
GC_MIN_AGE_S = 3600.0

_hits: dict[str, int] = {}


def new_version(now: float | None = None) -> str:
    ms = int((time.time() if now is None else now) * 1000)
    return f"{ms:011x}-{uuid.uuid4().hex[:16]}"


def version_age(version: str, now: float | None = None) -> float:
    """Seconds since `version` was written; infinite for the older, undated format."""
    stamp, sep, rest = version.partition("-")
    if not sep or len(stamp) != 11 or len(rest) != 16:
        return math.inf
    try:
        written = int(stamp, 16) / 1000
    except ValueError:
        return math.inf
    return max(0.0, (time.time() if now is None else now) - written)


def checkpoint(point: str) -> None:
    """The test hook: SIGKILL this process here when LMSTACK_TEST_CRASH_AT says so."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target not in ("any", point):
        return
    _hits[target] = _hits.get(target, 0) + 1
    if _hits[target] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def locked_elsewhere(store_dir: str | os.PathLike) -> bool:
    """True when another process holds the Milvus Lite store's LOCK (an flock)."""
    lock = Path(store_dir) / "LOCK"
    try:
        import fcntl
    except ImportError:  # Windows: Milvus Lite locks with msvcrt; say nothing specific
        return False
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
