"""The paged decode-attention kernel (csrc/paged_attention.cpp), built on first use.

The C++ source is compiled once per machine with the system's g++ (-O3 -march=native
-fopenmp) into $LMSTACK_CACHE/kernels/, named by a hash of the source, the flags, the
compiler and the CPU, and loaded with ctypes (which releases the GIL during the call).
Loaded after torch, the library's libgomp.so.1 resolves to the copy torch already
loaded, so the kernel's parallel loop runs on the calling thread's OpenMP team rather than
starting a second runtime (tests/test_paged_kernel.py checks that only one is mapped).

Where there is no compiler, the build fails or LMSTACK_KERNELS=0, `load()` returns None
and the engine keeps its torch path; `status()` says which and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

from lmstack.config import cache_dir

log = logging.getLogger("lmstack.engine")

SOURCE = Path(__file__).parent / "csrc" / "paged_attention.cpp"
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
MAX_DIM, MAX_GROUP = 256, 16  # the kernel's fixed buffers (see the source)

_state: dict = {}


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str) -> Path:
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), version.encode()):
        key.update(part)
    key.update(_cpu_signature().encode())
    target = cache_dir() / "kernels" / f"paged_attention-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes never load a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[:500]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load():
    """The kernel's ctypes function, or None (see `status()` for the reason)."""
    if "fn" in _state:
        return _state["fn"]
    fn, reason = None, ""
    if os.environ.get("LMSTACK_KERNELS", "1") == "0":
        reason = "disabled by LMSTACK_KERNELS=0"
    else:
        compiler = os.environ.get("CXX", "g++")
        try:
            lib = ctypes.CDLL(str(_build(compiler)))
            fn = lib.lmstack_paged_decode
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 9 + [ctypes.c_float]
            reason = "compiled"
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            reason = f"unavailable ({type(exc).__name__}: {exc}); using the torch path"
            log.warning("paged attention kernel %s", reason)
    _state["fn"], _state["reason"] = fn, reason
    return fn


def status() -> str:
    load()
    return _state["reason"]


def supports(q: torch.Tensor, pool: torch.Tensor) -> bool:
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = pool.shape[1]
    return (
        q.dtype in (torch.float32, torch.bfloat16)
        and pool.dtype == q.dtype
        and q.device.type == "cpu"
        and dim <= MAX_DIM
        and heads % kv_heads == 0
        and heads // kv_heads <= MAX_GROUP
        and load() is not None
    )


def paged_decode(
    q: torch.Tensor,
    pool: torch.Tensor,
    tables: torch.Tensor,
    lengths: torch.Tensor,
    work: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence over its blocks: q [B, H, d] -> [B, H, d].

    pool is one layer's [2, kv_heads, blocks, block_size, d]; tables [B, W] and lengths
    [B] are int64 (lengths count the visible tokens, the current one included). `work`,
    fp32 scratch of at least threads * group * max(lengths) elements, may be shared by
    the layers of a step.
    """
    fn = load()
    batch, heads, dim = q.shape
    _, kv_heads, num_blocks, block_size, _ = pool.shape
    q = q.contiguous()
    tables = tables.contiguous()
    max_len = int(lengths.max())
    need = torch.get_num_threads() * (heads // kv_heads) * max_len
    if work is None or work.numel() < need:
        work = torch.empty(need, dtype=torch.float32)
    out = torch.empty_like(q)
    code = fn(
        q.data_ptr(),
        pool.data_ptr(),
        tables.data_ptr(),
        lengths.data_ptr(),
        out.data_ptr(),
        work.data_ptr(),
        q.element_size(),
        batch,
        heads,
        kv_heads,
        num_blocks,
        block_size,
        dim,
        tables.shape[1],
        max_len,
        dim**-0.5,
    )
    if code != 0:
        raise ValueError(f"paged attention kernel refused q {tuple(q.shape)} pool {pool.shape}")
    return out
