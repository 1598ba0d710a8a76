"""A reward model fitted on the frozen SFT model's features: the reward model a CPU can afford.

Fine-tuning through TRL's RewardTrainer runs the whole body forward and backward every
epoch; on this 2-core CPU the shared pairs (about 700 tokens per prompt + reply) allow a
few hundred tokens and the top 2 blocks, and that model stayed at chance. Here the body
runs once, forward only, over every (prompt, reply) at the full `max_length`. At every depth
k the final-normed hidden state of the last real token is kept: exactly what a copy of the
model cut after block k feeds its scalar head. A head w is then fitted at each depth by the
Bradley-Terry loss, mean softplus(-w . (f_chosen - f_rejected)) + l2 |w|^2 / 2, which is
convex, so L-BFGS finds its minimum in well under a second.

Depth and l2 are chosen by grouped k-fold cross-validation on the training pairs alone
(pairs sharing a prompt stay in one fold); the validation pairs are scored once, by the
saved model. The saved directory is the body cut after the chosen block plus the head: a
plain *ForSequenceClassification checkpoint, scored like any other (`RewardModel`).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmstack.align.data import Pair
from lmstack.align.reward import (
    encode,
    load_tokenizer,
    pair_accuracy,
    save_reward_model,
    wilson_interval,
)
from lmstack.cpu import native_bf16
from lmstack.errors import InputError


@dataclass
class HeadConfig:
    max_length: int = 1024
    depths: list[int] | None = None  # None: every block 1..L
    l2s: list[float] = field(default_factory=lambda: [1.0, 10.0, 100.0])
    folds: int = 5
    # bf16 autocast only where the CPU multiplies bf16 natively (AMX / AVX512-BF16: 3-9x
    # faster); on AVX2-only CPUs torch's bf16 matmul runs under 1 GFLOPS, fp32 is far faster.
    bf16: bool = field(default_factory=native_bf16)
    seed: int = 0

    def check(self, layers: int) -> None:
        if self.max_length < 16:
            raise InputError(f"--max-length must be >= 16, got {self.max_length}")
        bad = [d for d in self.depths or [] if not 1 <= d <= layers]
        if bad:
            raise InputError(f"--depths must be in [1, {layers}], got {bad}")
        if not self.l2s or any(x <= 0 for x in self.l2s):
            raise InputError(f"--l2 values must be > 0, got {self.l2s}")
        if self.folds < 2:
            raise InputError(f"--folds must be >= 2, got {self.folds}")


def depth_features(model, tokenizer, pairs: list[Pair], max_length: int, bf16=True, log=None):
    """[pairs, 2 (chosen, rejected), depth 0..L, hidden] last-real-token features, each the
    final norm of the hidden state after that many blocks (the last one is normed already)."""
    import torch

    seqs = []
    for p in pairs:
        seqs += [encode(tokenizer, p.prompt, r, max_length) for r in (p.chosen, p.rejected)]
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    out = torch.zeros(len(seqs), layers + 1, hidden)
    device = next(model.parameters()).device
    started = time.monotonic()
    # One sequence per pass, shortest first: no padding to compute or to mask.
    for done, i in enumerate(sorted(range(len(seqs)), key=lambda i: len(seqs[i])), 1):
        ids = torch.tensor([seqs[i]], device=device)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            states = model.model(input_ids=ids, output_hidden_states=True).hidden_states
            last = torch.stack([s[0, -1] for s in states[:-1]])
            out[i, :-1] = model.model.norm(last).float().cpu()
            out[i, -1] = states[-1][0, -1].float().cpu()
        if log and (done % 100 == 0 or done == len(seqs)):
            log(f"features: {done}/{len(seqs)} sequences, {time.monotonic() - started:.0f} s")
    return out.view(len(pairs), 2, layers + 1, hidden)


def fit_head(diffs, l2: float):
    """Bradley-Terry head on feature differences [n, h] (chosen - rejected): weights [h]."""
    import torch

    w = torch.zeros(diffs.shape[1], dtype=torch.float64, requires_grad=True)
    x = diffs.double()
    optimizer = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.softplus(-(x @ w)).mean() + 0.5 * l2 * (w @ w) / len(x)
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach().float()


def standardised(features, rows):
    """Per-dimension scale of `features` [n, 2, h] over `rows`, so one l2 suits every depth."""
    flat = features[rows].reshape(-1, features.shape[-1])
    return flat.std(0).clamp(min=1e-6)


def fold_ids(groups: list[str], folds: int, seed: int) -> list[int]:
    """A fold per pair; pairs sharing a prompt share a fold."""
    keys = sorted(set(groups))
    random.Random(seed).shuffle(keys)
    fold_of = {k: i % folds for i, k in enumerate(keys)}
    return [fold_of[g] for g in groups]


def cross_validate(features, groups: list[str], depths, l2s, folds: int, seed: int) -> list[dict]:
    """Grouped k-fold pairwise accuracy of every (depth, l2), best first."""
    import torch

    fold = torch.tensor(fold_ids(groups, folds, seed))
    rows = []
    for depth in depths:
        f = features[:, :, depth]
        for l2 in l2s:
            hits = 0
            for k in range(folds):
                train, test = fold != k, fold == k
                if not test.any() or not train.any():
                    continue
                scale = standardised(f, train)
                d = (f[:, 0] - f[:, 1]) / scale
                w = fit_head(d[train], l2)
                hits += int((d[test] @ w > 0).sum())
            rows.append({"depth": depth, "l2": l2, "cv_accuracy": round(hits / len(groups), 4)})
    # Ties go to the shallower, more regularised head: cheaper to run, less to overfit.
    return sorted(rows, key=lambda r: (-r["cv_accuracy"], r["depth"], -r["l2"]))


def length_baseline(tokenizer, train: list[Pair], val: list[Pair]) -> dict:
    """The feature to beat: 'the longer (or shorter) reply wins', direction set on train."""

    def longer(pairs):
        n = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
        return [n(p.chosen) > n(p.rejected) for p in pairs]

    rate = sum(longer(train)) / len(train)
    prefer_longer = rate >= 0.5
    hits = sum(x == prefer_longer for x in longer(val))
    low, high = wilson_interval(hits, len(val))
    return {
        "rule": "longer reply wins" if prefer_longer else "shorter reply wins",
        "train_accuracy": round(max(rate, 1 - rate), 4),
        "val_accuracy": round(hits / len(val), 4),
        "val_ci95": [round(low, 4), round(high, 4)],
    }


def cut_after(model, depth: int):
    """The model with only its first `depth` blocks (in place); its own final norm stays."""
    model.model.layers = model.model.layers[:depth]
    model.config.num_hidden_layers = depth
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:depth]
    return model


def fit_reward_head(
    train_pairs: list[Pair],
    val_pairs: list[Pair],
    out_dir: Path,
    base_model: str | None = None,
    config: HeadConfig | None = None,
    log=print,
) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification

    from lmstack.models import model_dir

    config = config or HeadConfig()
    if len(train_pairs) < config.folds or not val_pairs:
        raise InputError(
            f"need at least --folds={config.folds} training pairs and one validation pair, "
            f"got {len(train_pairs)} and {len(val_pairs)}"
        )
    base = model_dir(base_model)
    tokenizer = load_tokenizer(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base), num_labels=1, dtype=torch.float32
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    layers = model.config.num_hidden_layers
    config.check(layers)
    depths = config.depths or list(range(1, layers + 1))
    timings = {}
    t0 = time.monotonic()
    features = depth_features(model, tokenizer, train_pairs, config.max_length, config.bf16, log)
    timings["features_s"] = round(time.monotonic() - t0, 1)

    t0 = time.monotonic()
    groups = [json.dumps(p.prompt) for p in train_pairs]
    table = cross_validate(features, groups, depths, config.l2s, config.folds, config.seed)
    best = table[0]
    log(f"cross-validation on {len(train_pairs)} training pairs: best {best}")
    f = features[:, :, best["depth"]]
    scale = standardised(f, slice(None))
    w = fit_head((f[:, 0] - f[:, 1]) / scale, best["l2"]) / scale
    train_hits = int(((f[:, 0] - f[:, 1]) @ w > 0).sum())
    timings["fit_s"] = round(time.monotonic() - t0, 1)

    cut_after(model, best["depth"])
    with torch.no_grad():
        model.score.weight.copy_(w.view(1, -1))
    t0 = time.monotonic()
    val_accuracy, margins = pair_accuracy(model, tokenizer, val_pairs, config.max_length)
    timings["val_s"] = round(time.monotonic() - t0, 1)
    save_reward_model(model, tokenizer, Path(out_dir), base)
    hits = sum(m > 0 for m in margins)
    low, high = wilson_interval(hits, len(val_pairs))
    report = {
        "method": "frozen-features head",
        "train_pairs": len(train_pairs),
        "val_pairs": len(val_pairs),
        "depth": best["depth"],
        "l2": best["l2"],
        "cv_accuracy": best["cv_accuracy"],
        "train_accuracy": round(train_hits / len(train_pairs), 4),
        "val_accuracy": round(val_accuracy, 4),
        "val_ci95": [round(low, 4), round(high, 4)],
        "val_mean_margin": round(sum(margins) / len(margins), 4),
        "baseline_length": length_baseline(tokenizer, train_pairs, val_pairs),
        "cv_table": table,
        "timings": timings,
        "train_seconds": round(sum(timings.values()), 1),
        "config": {**asdict(config), "max_length": config.max_length},
        "base_model": str(base),
    }
    if not math.isfinite(report["val_mean_margin"]):
        raise InputError("the fitted head gives non-finite scores; try a larger --l2")
    (Path(out_dir) / "reward_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
