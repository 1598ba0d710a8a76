"""DPO with TRL's DPOTrainer: the simpler alternative to reward model + PPO.

The policy learns directly from pairs (loss -log sigmoid(beta * (log-ratio chosen - log-ratio
rejected)) against a frozen copy of the SFT model). The result is saved like a PPO policy:
a plain HF directory that `lmstack serve --model DIR` serves.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmstack.align.data import Pair
from lmstack.align.policy import load_policy, save_policy
from lmstack.align.reward import PAD_TOKEN
from lmstack.align.trl_args import shared_trainer_args, silence, trainer_scratch
from lmstack.cpu import native_bf16
from lmstack.errors import InputError


@dataclass
class DPOSettings:
    beta: float = 0.1
    lr: float = 5e-6
    epochs: int = 1
    batch_size: int = 4
    max_length: int = 256
    max_steps: int = -1
    # bf16 autocast only where the CPU multiplies bf16 natively (AMX / AVX512-BF16: 3-9x
    # faster); on AVX2-only CPUs torch's bf16 matmul runs under 1 GFLOPS, fp32 is far faster.
    bf16: bool = field(default_factory=native_bf16)
    seed: int = 0


def train_dpo(policy: str | Path, pairs: list[Pair], out_dir: str | Path, settings=None) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    settings = settings or DPOSettings()
    if not pairs:
        raise InputError("DPO needs at least one preference pair")
    if settings.beta <= 0:
        raise InputError(f"--beta must be > 0, got {settings.beta}")
    out_dir = Path(out_dir)
    model, tokenizer, base = load_policy(policy)
    tokenizer.pad_token = PAD_TOKEN
    rows = [
        {
            "prompt": p.prompt,
            "chosen": [{"role": "assistant", "content": p.chosen}],
            "rejected": [{"role": "assistant", "content": p.rejected}],
        }
        for p in pairs
    ]
    args = DPOConfig(
        beta=settings.beta,
        learning_rate=settings.lr,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        max_length=settings.max_length,
        truncation_mode="keep_start",
        **shared_trainer_args(out_dir, settings.bf16, settings.seed),
    )
    started = time.monotonic()
    trainer = silence(
        DPOTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
    )
    trainer.train()
    seconds = round(time.monotonic() - started, 1)
    metrics = [h for h in trainer.state.log_history if "loss" in h]
    save_policy(trainer.model, base, out_dir)
    shutil.rmtree(trainer_scratch(out_dir), ignore_errors=True)
    return {
        "pairs": len(pairs),
        "seconds": seconds,
        "settings": asdict(settings),
        "log": metrics,
        "out": str(out_dir),
    }
