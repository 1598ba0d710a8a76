"""What this CPU can do, and the development switch that restricts it.

`LMSTACK_CPU_ISA=avx2` makes an AVX-512 machine behave as an AVX2-only one, for testing the
other CPU kind: lmstack's kernels are compiled without AVX-512 (lmstack.kernels), torch's
own kernels are limited to AVX2 (ATEN_CPU_CAPABILITY) and oneDNN's too
(ONEDNN_MAX_CPU_ISA), and `--dtype auto` decides as it would on such a CPU. `apply_isa_env()`
sets the two torch variables; `import lmstack` calls it, before anything imports torch.
`LMSTACK_CPU_ISA=native` (the default) leaves everything as the CPU is.
The precision `--dtype auto` picks from these features: lmstack.model.precision.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

ISAS = ("native", "avx2")


def requested_isa() -> str:
    isa = os.environ.get("LMSTACK_CPU_ISA", "native").strip().lower() or "native"
    if isa not in ISAS:
        from lmstack.errors import InputError

        raise InputError(f"LMSTACK_CPU_ISA={isa!r} is not one of {', '.join(ISAS)}")
    return isa


def apply_isa_env() -> None:
    """Under LMSTACK_CPU_ISA=avx2, restrict torch and oneDNN too (before torch loads)."""
    if os.environ.get("LMSTACK_CPU_ISA", "").strip().lower() == "avx2":
        os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
        os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")


@lru_cache(maxsize=1)
def _cpuinfo_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def features() -> frozenset[str]:
    """The CPU's feature flags (as /proc/cpuinfo names them), less what LMSTACK_CPU_ISA hides."""
    flags = _cpuinfo_flags()
    if requested_isa() == "avx2":
        flags = frozenset(f for f in flags if not f.startswith(("avx512", "amx")))
    return flags


def native_bf16() -> bool:
    flags = features()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _cpuinfo_fields() -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor's block is enough
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def generation(vendor: str, family: int, model: int) -> str | None:
    """AMD's core generation from family/model: cloud VMs often report only "AMD EPYC",
    which hides a 1.7x difference between Zen 4 and Zen 5 (measured here, both servers)."""
    if vendor != "AuthenticAMD":
        return None
    if family == 23:
        return "Zen 2" if model >= 0x30 else "Zen"
    if family == 25:
        return "Zen 4" if 0x10 <= model < 0x20 or 0x60 <= model < 0xB0 else "Zen 3"
    if family == 26:
        return "Zen 5"
    return None


def describe() -> str:
    """One line for logs and reports: the CPU model (with AMD's generation, and family and
    model numbers) and the ISA level lmstack uses."""
    info = _cpuinfo_fields()
    name = info.get("model name") or "unknown CPU"
    try:
        family, model = int(info["cpu family"]), int(info["model"])
    except (KeyError, ValueError):
        return f"{name} ({isa_level()})"
    gen = generation(info.get("vendor_id", ""), family, model)
    where = f"{gen}, family {family} model {model}" if gen else f"family {family} model {model}"
    return f"{name} [{where}] ({isa_level()})"


def isa_level() -> str:
    flags = features()
    if native_bf16():
        return "avx512_bf16"
    if "avx512f" in flags:
        return "avx512"
    if {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return "baseline"
