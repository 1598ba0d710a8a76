"""The shipped LoRA adapter, merged into the base weights once and cached as an HF directory.

`triage_model()` is what plain `lmstack triage` runs: the bundled model plus the adapter in
data/adapter/ (W + alpha/r * B @ A for every adapted linear layer), written to
$LMSTACK_CACHE/models/triage-<hash of adapter and base>/ on first use, so the engine loads
it like any other `--model DIR`. No peft import at run time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from lmstack.config import cache_dir
from lmstack.errors import ModelLoadError

SHIPPED_ADAPTER = Path(__file__).parent / "data" / "adapter"


def adapter_info(adapter_dir: Path = SHIPPED_ADAPTER) -> dict | None:
    manifest = Path(adapter_dir) / "adapter.json"
    if not manifest.is_file():
        return None
    return json.loads(manifest.read_text())


def triage_model(adapter_dir: Path = SHIPPED_ADAPTER) -> Path | None:
    """The merged model directory for the adapter, or None when no adapter is shipped."""
    adapter_dir = Path(adapter_dir)
    info = adapter_info(adapter_dir)
    if info is None:
        return None
    from lmstack.models import model_dir

    base = model_dir(info.get("base", "bundled"))
    weights = adapter_dir / "adapter.safetensors"
    digest = hashlib.sha256()
    digest.update(weights.read_bytes())
    digest.update((adapter_dir / "adapter.json").read_bytes())
    digest.update(str(base.resolve()).encode())
    out = cache_dir() / "models" / f"triage-{digest.hexdigest()[:12]}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".merge-", dir=out.parent))
    try:
        merge(base, adapter_dir, tmp)
        try:
            os.replace(tmp, out)
        except OSError:  # another process merged it first
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def merge(base_dir: Path, adapter_dir: Path, out_dir: Path) -> None:
    """Write base + LoRA deltas to `out_dir` as an HF directory (fp32 safetensors)."""
    import torch
    from safetensors.torch import load_file, save_file

    from lmstack.models import state_dict

    info = adapter_info(adapter_dir)
    if info is None:
        raise ModelLoadError(f"{adapter_dir}: no adapter.json")
    scale = info["alpha"] / info["rank"]
    state = state_dict(base_dir)
    lora = load_file(str(Path(adapter_dir) / "adapter.safetensors"))
    merged = 0
    for name, a in lora.items():
        if ".lora_A." not in name:
            continue
        b = lora[name.replace(".lora_A.", ".lora_B.")]
        target = name.replace(".lora_A.weight", ".weight")
        if target not in state:
            raise ModelLoadError(f"{adapter_dir}: adapter layer {target} is not in the base model")
        delta = (b.float() @ a.float()) * scale
        state[target] = (state[target].float() + delta).to(state[target].dtype).contiguous()
        merged += 1
    if merged == 0:
        raise ModelLoadError(f"{adapter_dir}: adapter.safetensors has no LoRA weights")
    # Tied embeddings share storage; safetensors refuses shared tensors, so copy them.
    state = {k: v.clone().contiguous() for k, v in state.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for file in Path(base_dir).iterdir():
        if file.is_file() and not file.name.endswith(".safetensors"):
            shutil.copy2(file, out_dir / file.name)
    (out_dir / "triage_adapter.json").write_text(json.dumps(info, indent=2))
    del torch
