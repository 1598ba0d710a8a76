"""lmstack's CPU kernels (csrc/*.cpp), built on first use.

- `paged_decode`: decode attention straight from the paged KV pool (the engine);
- `rms_norm` (optionally fused with the residual add), `rope_`, `silu_mul`: the
  element-wise layers of a decoder block (the model's inference path);
- `linear_bf16`: the model's bf16 linear layers on AVX512-BF16 CPUs (gemm_bf16.cpp;
  lmstack.model.packed.KernelLinear), compiled to a stub that reports itself unsupported
  elsewhere.

The C++ sources are compiled once per machine with the system's g++ (-O3 -march=native
-fopenmp) into $LMSTACK_CACHE/kernels/, named by a hash of the source, the flags, the
compiler and the CPU, and loaded with ctypes (which releases the GIL during the call).
Loaded after torch, whose libgomp torch puts in the process's global symbol scope, the
kernels' OpenMP calls resolve to that runtime: a parallel loop runs on the calling thread's
existing team rather than starting worker threads of its own (tests/kernels/test_kernels.py
checks that calling the kernel adds no thread to the process).

Where there is no compiler, the build fails or LMSTACK_KERNELS=0, `load()` returns None
and every caller keeps its torch path; `status()` says which and why. `disabled()` turns
them off for a block of code (tests and benchmarks compare both paths in one process).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from lmstack.config import cache_dir

log = logging.getLogger("lmstack.engine")

SOURCES = [
    Path(__file__).parent / "csrc" / name
    for name in (
        "cpu_kernels.cpp",
        "attention_bf16.cpp",
        "prefill_bf16.cpp",
        "gemm_bf16.cpp",
        "gemm_q.cpp",
        "layer_stack.cpp",
        "prefill_f32.cpp",
    )
]
HEADERS = [
    Path(__file__).parent / "csrc" / name for name in ("groups.h", "exp2_poly.h")
]  # included by SOURCES: hashed too
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-std=c++17"]
# Linked without -ffast-math: with it g++ adds crtfastmath.o, whose constructor turns on
# flush-to-zero and denormals-are-zero for the whole process when the library loads, and
# every float in torch, numpy and Python then loses its subnormals.
LINK_FLAGS = ["-shared", "-fopenmp"]
# LMSTACK_CPU_ISA=avx2 (lmstack.cpu): the same sources built as for an AVX2-only CPU, so the
# AVX-512 paths compile to their stubs and every caller takes its AVX2 path.
AVX2_FLAGS = ["-mno-avx512f"]


def build_flags() -> list[str]:
    from lmstack.cpu import requested_isa

    return FLAGS + (AVX2_FLAGS if requested_isa() == "avx2" else [])


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
    key = hashlib.sha256(b"".join(source.read_bytes() for source in SOURCES + HEADERS))
    flags = build_flags()
    for part in (" ".join(flags + LINK_FLAGS), version, _cpu_signature()):
        key.update(part.encode())
    target = cache_dir() / "kernels" / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes never load a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    objects = Path(tempfile.mkdtemp(prefix="build-", dir=target.parent))
    try:
        compile_ = [compiler, *flags, "-c", *map(str, SOURCES)]  # one .o per source, in cwd
        _run(compiler, compile_, objects)
        _run(compiler, [compiler, *LINK_FLAGS, *sorted(map(str, objects.glob("*.o"))), "-o", tmp])
        os.replace(tmp, target)
    finally:
        shutil.rmtree(objects, ignore_errors=True)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _run(compiler: str, command: list[str], cwd: Path | None = None) -> None:
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    if result.returncode != 0:
        raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[:500]}")


_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
SIGNATURES = {
    "lmstack_paged_decode": [_P] * 6 + [_I] * 10 + [_F],
    "lmstack_paged_prefill_bf16": [_P, _P, _P, _I, _I, _P] + [_I] * 6 + [_F],
    "lmstack_rms_norm": [_P] * 4 + [_I] * 4 + [_F],
    "lmstack_rope": [_P] + [_I] * 6 + [_P] * 3,
    "lmstack_silu_mul": [_P] * 2 + [_I] * 4,
    "lmstack_linear_bf16": [_P, _I, _I, _I, _P, _I, _P, _I, _I],
    "lmstack_linear_bf16_supported": [],
    "lmstack_linear_q": [_P, _I, _I, _I, _P, _I, _I, _P, _I, _I],
    "lmstack_linear_q_supported": [],
    "lmstack_layer_stack": [_P, _P, _F] + [_P] * 12,
    "lmstack_paged_prefill_f32": [_P, _P, _P, _I, _I, _P] + [_I] * 6 + [_F],
    "lmstack_prefill_f32_supported": [],
}


def _bind(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = ctypes.c_int, argtypes
    return lib


def load():
    """The kernel library (ctypes), or None when off or unavailable (see `status()`)."""
    if _state.get("off"):
        return None
    if "lib" in _state:
        return _state["lib"]
    import torch  # noqa: F401  (loaded first: its libgomp is the runtime the kernels bind)

    lib, reason = None, ""
    if os.environ.get("LMSTACK_KERNELS", "1") == "0":
        reason = "disabled by LMSTACK_KERNELS=0"
    else:
        compiler = os.environ.get("CXX", "g++")
        try:
            lib = _bind(_build(compiler))
            reason = "compiled"
        except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as exc:
            reason = f"unavailable ({type(exc).__name__}: {exc}); using the torch path"
            log.warning("CPU kernels %s", reason)
    _state["lib"], _state["reason"] = lib, reason
    return lib


@contextlib.contextmanager
def disabled():
    """Run a block on the torch paths (the kernels stay loaded)."""
    before = _state.get("off", False)
    _state["off"] = True
    try:
        yield
    finally:
        _state["off"] = before


def status() -> str:
    if _state.get("off"):
        return "turned off for this block (kernels.disabled())"
    load()
    return _state["reason"]
