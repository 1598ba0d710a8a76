"""The TRL trainer settings reward-model and DPO training share, written once.

Both run on accelerate through TRL's trainers; on this CPU they need `use_cpu`, and both
turn off what TRL turns on for large models: gradient checkpointing (a 135M model fits, and
the recompute costs a third more CPU time), per-step printing (stdout belongs to --json
output), checkpoints (the caller saves the best weights itself) and progress bars.
"""

from __future__ import annotations

from pathlib import Path


def trainer_scratch(out_dir: Path) -> Path:
    """Where the trainer may write; removed once training has finished."""
    return Path(out_dir) / ".trainer"


def shared_trainer_args(out_dir: Path, bf16: bool, seed: int) -> dict:
    """Keyword arguments for `trl.RewardConfig` / `trl.DPOConfig` common to both trainers."""
    import torch

    return {
        "output_dir": str(trainer_scratch(out_dir)),
        "save_strategy": "no",
        "logging_steps": 5,
        "report_to": [],
        "use_cpu": not torch.cuda.is_available(),
        "bf16": bf16,
        "seed": seed,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "gradient_checkpointing": False,
    }


def silence(trainer):
    """Remove the callback that prints every log dict to stdout; return the trainer."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer
