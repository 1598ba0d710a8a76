"""The reward model: the SFT model with a scalar head, trained on pairs with Bradley-Terry.

Loss -log sigmoid(r_chosen - r_rejected) through TRL's RewardTrainer (on accelerate, so
the same code runs multi-GPU / DeepSpeed with `accelerate launch`). Pairs are tokenized
here with the chat template and *truncated* to `max_length` (response tail first, then the
oldest prompt tokens) rather than dropped, as RewardTrainer would. Validation accuracy is
measured before training and after every epoch; training stops early when it stops
improving and the best epoch's weights are the ones saved. Full fine-tune, LoRA (merged
before saving), or only the top `train_layers` blocks plus the head, the cheap option on a
CPU. The saved directory is a plain `AutoModelForSequenceClassification` checkpoint.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmstack.align.data import Pair
from lmstack.align.trl_args import shared_trainer_args, silence, trainer_scratch
from lmstack.cpu import native_bf16
from lmstack.errors import InputError, ModelLoadError

# Padding must not be a token that occurs in the text: the head reads the last non-pad
# token, and SmolLM2's own pad token is <|im_end|>, which ends every turn.
PAD_TOKEN = "<|endoftext|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@dataclass
class RewardConfig:
    epochs: int = 2
    lr: float = 1e-5
    # The scalar head starts random: at the body's 1e-5 it barely moves in 1-2 epochs of a
    # few hundred pairs (measured: validation accuracy 0.41 on the shared pairs), so it gets
    # its own rate. None: the body's rate.
    head_lr: float | None = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 8
    max_length: int = 384
    lora: bool = False
    lora_rank: int = 16
    train_layers: int | None = None  # None: every layer; K: only the top K blocks + head
    patience: int = 1  # epochs without a better validation accuracy before stopping
    max_steps: int = -1  # for smoke tests
    eval_before: bool = True  # validation accuracy of the untrained head, for reference
    # bf16 autocast only where the CPU multiplies bf16 natively (AMX / AVX512-BF16: 3-9x
    # faster); on AVX2-only CPUs torch's bf16 matmul runs under 1 GFLOPS, fp32 is far faster.
    bf16: bool = field(default_factory=native_bf16)
    seed: int = 0
    val_fraction: float = 0.2


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (sound for small n and p near 0 or 1)."""
    if n == 0:
        return (0.0, 1.0)
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.pad_token = PAD_TOKEN
    return tokenizer


def encode(tokenizer, messages: list[dict], response: str, max_length: int) -> list[int]:
    """Chat-templated prompt + response in at most max_length tokens, the reply kept whole.

    The reply is what the two sides of a pair differ in, so it is kept; the prompt loses its
    oldest tokens first. Only a reply longer than `max_length - min(64, max_length // 4)`
    loses its tail, so the model always sees the end of the prompt. (Cutting the reply
    first, as this did before, left 80 of a median 330 reply tokens at --max-length 160.)
    """
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer(response + "<|im_end|>", add_special_tokens=False)["input_ids"]
    if len(prompt_ids) + len(reply_ids) > max_length:
        reply_ids = reply_ids[: max_length - min(64, max_length // 4)]
        prompt_ids = prompt_ids[max(0, len(prompt_ids) + len(reply_ids) - max_length) :]
    return prompt_ids + reply_ids


def split_pairs(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """A seeded held-out fraction; pairs sharing a prompt stay on one side (no leakage)."""
    prompts = sorted({json.dumps(p.prompt) for p in pairs})
    random.Random(seed).shuffle(prompts)
    held = set(prompts[: max(1, round(fraction * len(prompts)))])
    train = [p for p in pairs if json.dumps(p.prompt) not in held]
    val = [p for p in pairs if json.dumps(p.prompt) in held]
    if not train or not val:
        raise InputError("need pairs with at least 2 distinct prompts to hold out a validation set")
    return train, val


class RewardModel:
    """A trained reward model directory, loaded for scoring."""

    def __init__(self, model_dir: str | Path, max_length: int | None = None, batch_size: int = 8):
        import torch
        from transformers import AutoModelForSequenceClassification

        self.dir = Path(model_dir)
        check_reward_dir(self.dir)
        if max_length is None:
            max_length = trained_max_length(self.dir)
        self.tokenizer = load_tokenizer(self.dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            str(self.dir), dtype=torch.float32
        )
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.eval()
        self.max_length = max_length
        self.batch_size = batch_size

    def score(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        ids = [encode(self.tokenizer, m, r, self.max_length) for m, r in zip(prompts, responses)]
        return score_ids(self.model, ids, self.tokenizer.pad_token_id, self.batch_size)


def trained_max_length(model_dir: Path, default: int = 512) -> int:
    """The --max-length the model was trained with: score the way it learned to."""
    try:
        report = json.loads((model_dir / "reward_report.json").read_text())
        return int(report["config"]["max_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return default


def score_ids(model, sequences: list[list[int]], pad_id: int, batch_size: int = 8) -> list[float]:
    import torch

    # bf16 autocast where the CPU has native bf16 (the matmuls run on AMX / AVX512-BF16; the
    # scalar head's order barely moves); fp32 elsewhere, where bf16 is the slow path.
    device = next(model.parameters()).device.type

    scores: list[float] = []
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # less padding
    out = [0.0] * len(sequences)
    bf16 = device != "cpu" or native_bf16()
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, len(order), batch_size):
            batch = [sequences[i] for i in order[start : start + batch_size]]
            width = max(len(s) for s in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, seq in enumerate(batch):
                input_ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            input_ids, mask = input_ids.to(device), mask.to(device)
            logits = model(input_ids=input_ids, attention_mask=mask).logits.squeeze(-1)
            scores += logits.float().tolist()
    for i, s in zip(order, scores):
        out[i] = s
    return out


def check_reward_dir(path: Path) -> None:
    """A clear error unless `path` holds a scalar-head sequence-classification checkpoint."""
    config_file = path / "config.json"
    if not path.is_dir() or not config_file.is_file():
        raise ModelLoadError(f"{path} is not a reward model directory: no config.json")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{config_file}: not valid JSON ({exc})") from exc
    archs = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ModelLoadError(
            f"{path} is not a reward model directory: architectures {archs} has no "
            "*ForSequenceClassification (train one with `lmstack align reward train`)"
        )
    labels = config.get("num_labels", len(config.get("id2label") or {}) or 1)
    if labels != 1:
        raise ModelLoadError(f"{path}: a reward model has one output, this one has {labels}")
    if not list(path.glob("*.safetensors")) or not (path / "tokenizer.json").is_file():
        raise ModelLoadError(
            f"{path} is not a reward model directory: weights or tokenizer missing"
        )


def pair_accuracy(model, tokenizer, pairs: list[Pair], max_length: int, batch_size: int = 8):
    """(accuracy, chosen-minus-rejected margins) of a reward model on pairs."""
    chosen = [encode(tokenizer, p.prompt, p.chosen, max_length) for p in pairs]
    rejected = [encode(tokenizer, p.prompt, p.rejected, max_length) for p in pairs]
    scores = score_ids(model, chosen + rejected, tokenizer.pad_token_id, batch_size)
    margins = [c - r for c, r in zip(scores[: len(pairs)], scores[len(pairs) :])]
    return sum(m > 0 for m in margins) / len(pairs), margins


def evaluate_reward(model_dir: str | Path, pairs: list[Pair], max_length: int | None = None):
    rm = RewardModel(model_dir, max_length=max_length)
    accuracy, margins = pair_accuracy(rm.model, rm.tokenizer, pairs, rm.max_length)
    hits = sum(m > 0 for m in margins)
    low, high = wilson_interval(hits, len(pairs))
    return {
        "accuracy": round(accuracy, 4),
        "pairs": len(pairs),
        "ci95": [round(low, 4), round(high, 4)],
        "mean_margin": round(sum(margins) / len(margins), 4),
        "max_length": rm.max_length,
    }


def train_reward(
    train_pairs: list[Pair],
    val_pairs: list[Pair],
    out_dir: Path,
    base_model: str | None = None,
    config: RewardConfig | None = None,
    log=print,
) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, TrainerCallback
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    from lmstack.models import model_dir

    config = config or RewardConfig()
    if not train_pairs or not val_pairs:
        raise InputError("reward training needs training and validation pairs")
    if config.epochs < 1:
        raise InputError(f"--epochs must be >= 1, got {config.epochs}")
    torch.manual_seed(config.seed)
    base = model_dir(base_model)
    out_dir = Path(out_dir)
    tokenizer = load_tokenizer(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base), num_labels=1, dtype=torch.float32
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    peft_config = None
    if config.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            task_type="SEQ_CLS",
            r=config.lora_rank,
            lora_alpha=2 * config.lora_rank,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"],
        )
    elif config.train_layers is not None:
        freeze_below(model, config.train_layers)

    def rows(pairs):
        return Dataset.from_list(
            [
                {
                    "chosen_ids": encode(tokenizer, p.prompt, p.chosen, config.max_length),
                    "rejected_ids": encode(tokenizer, p.prompt, p.rejected, config.max_length),
                }
                for p in pairs
            ]
        )

    history = []
    val_initial = None
    if config.eval_before:
        val_initial, _ = pair_accuracy(model, tokenizer, val_pairs, config.max_length)
        log(f"validation accuracy before training: {val_initial:.3f} on {len(val_pairs)} pairs")
        history.append({"epoch": 0, "val_accuracy": round(val_initial, 4)})
    best = {"accuracy": -1.0, "epoch": 0, "state": None, "margin": 0.0}
    started = time.monotonic()

    class EpochEval(TrainerCallback):
        """Exact validation accuracy each epoch; keep the best weights; stop when stale."""

        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            accuracy, margins = pair_accuracy(model, tokenizer, val_pairs, config.max_length)
            model.train()
            epoch = round(state.epoch or 0)
            losses = [h["loss"] for h in state.log_history if "loss" in h]
            history.append(
                {
                    "epoch": epoch,
                    "val_accuracy": round(accuracy, 4),
                    "val_margin": round(sum(margins) / len(margins), 4),
                    "train_loss": round(losses[-1], 4) if losses else None,
                    "elapsed_s": round(time.monotonic() - started, 1),
                }
            )
            log(f"epoch {epoch}: validation accuracy {accuracy:.3f}")
            if accuracy > best["accuracy"]:
                best.update(accuracy=accuracy, epoch=epoch, margin=sum(margins) / len(margins))
                best["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            elif epoch - best["epoch"] >= config.patience:
                log(f"early stop: no better validation accuracy since epoch {best['epoch']}")
                control.should_training_stop = True
            return control

    args = TRLRewardConfig(
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        eval_strategy="no",
        max_length=None,  # already truncated above; never drop a pair
        **shared_trainer_args(out_dir, config.bf16, config.seed),
    )
    optimizers = (None, None)
    if not config.lora and config.head_lr is not None:
        head = [p for n, p in model.named_parameters() if n.startswith("score.")]
        body = [
            p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("score.")
        ]
        groups = [{"params": head, "lr": config.head_lr}]
        if body:
            groups.append({"params": body, "lr": config.lr})
        optimizers = (torch.optim.AdamW(groups, weight_decay=config.weight_decay), None)
    trainer = silence(
        RewardTrainer(
            optimizers=optimizers,
            model=model,
            args=args,
            train_dataset=rows(train_pairs),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[EpochEval()],
        )
    )
    trainer.train()
    trained = trainer.model
    if best["state"] is not None:
        trained.load_state_dict(best["state"])
    if config.lora:
        trained = trained.merge_and_unload()
    seconds = time.monotonic() - started
    save_reward_model(trained, tokenizer, out_dir, base)
    shutil.rmtree(trainer_scratch(out_dir), ignore_errors=True)
    # The saved weights are the best epoch's, so its validation accuracy is the final one.
    hits = round(best["accuracy"] * len(val_pairs))
    low, high = wilson_interval(hits, len(val_pairs))
    report = {
        "train_pairs": len(train_pairs),
        "val_pairs": len(val_pairs),
        "val_accuracy_before": None if val_initial is None else round(val_initial, 4),
        "val_accuracy": round(best["accuracy"], 4),
        "val_ci95": [round(low, 4), round(high, 4)],
        "val_mean_margin": round(best["margin"], 4),
        "best_epoch": best["epoch"],
        "history": history,
        "train_seconds": round(seconds, 1),
        "config": asdict(config),
        "base_model": str(base),
    }
    (out_dir / "reward_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def freeze_below(model, train_layers: int) -> None:
    """Train only the top `train_layers` decoder blocks, the final norm and a reward head."""
    layers = model.model.layers
    if not 0 <= train_layers <= len(layers):
        raise InputError(f"--train-layers must be in [0, {len(layers)}], got {train_layers}")
    for p in model.parameters():
        p.requires_grad = False
    for block in layers[len(layers) - train_layers :]:
        for p in block.parameters():
            p.requires_grad = True
    for p in model.model.norm.parameters():
        p.requires_grad = True
    # A reward model's new scalar head trains; a policy's LM head stays frozen: it is tied
    # to the input embeddings (49k x 576), the largest and least useful matrix to update.
    head = getattr(model, "score", None)
    if head is not None:
        for p in head.parameters():
            p.requires_grad = True


def save_reward_model(model, tokenizer, out_dir: Path, base: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
