"""`lmstack align reward ...`: train, evaluate and apply a reward model."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lmstack.align.cli_common import dump, echo_report, numbers
from lmstack.cpu import native_bf16
from lmstack.errors import InputError

reward_app = typer.Typer(help="Train, evaluate and apply a reward model.")


@reward_app.command("train")
def reward_train_command(
    pairs: Path = typer.Option(..., "--pairs", help="Preference pairs (any supported format)"),
    out: Path = typer.Option(..., "--out", help="Directory for the reward model"),
    val_pairs: Path | None = typer.Option(None, "--val-pairs", help="Default: hold out some"),
    val_fraction: float = typer.Option(0.2, "--val-fraction"),
    model: str | None = typer.Option(None, "--model", help="SFT model (default: bundled)"),
    epochs: int = typer.Option(2, "--epochs"),
    lr: float = typer.Option(1e-5, "--lr"),
    head_lr: float = typer.Option(1e-3, "--head-lr", help="Rate of the new scalar head"),
    weight_decay: float = typer.Option(0.01, "--weight-decay"),
    batch_size: int = typer.Option(8, "--batch-size"),
    max_length: int = typer.Option(384, "--max-length"),
    method: str = typer.Option(
        "trl", "--method", help="trl: fine-tune with RewardTrainer; head: fit on frozen features"
    ),
    depths: str | None = typer.Option(None, "--depths", help="head: blocks to try, e.g. 8,16"),
    l2: str = typer.Option("1,10,100", "--l2", help="head: L2 strengths to try"),
    folds: int = typer.Option(5, "--folds", help="head: cross-validation folds (train only)"),
    lora: bool = typer.Option(False, "--lora", help="LoRA instead of full fine-tune"),
    train_layers: int | None = typer.Option(None, "--train-layers", help="Top K blocks only"),
    max_steps: int = typer.Option(-1, "--max-steps", help="Stop after N steps (smoke tests)"),
    bf16: bool | None = typer.Option(
        None, "--bf16/--no-bf16", help="bf16 autocast (default: where the CPU has native bf16)"
    ),
    eval_before: bool = typer.Option(
        True, "--eval-before/--no-eval-before", help="Validation accuracy before training"
    ),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Bradley-Terry reward model on the SFT model: fine-tuned with TRL (--method trl), or a
    head on the frozen body with depth and L2 chosen by cross-validation (--method head)."""
    from lmstack.align.data import load_pairs
    from lmstack.align.reward import RewardConfig, split_pairs, train_reward

    if not 0 < val_fraction < 1:
        raise InputError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if lr <= 0 or batch_size < 1 or max_length < 16:
        raise InputError("--lr must be > 0, --batch-size >= 1, --max-length >= 16")
    train, report = load_pairs(pairs)
    echo_report(report)
    if val_pairs is not None:
        val, val_report = load_pairs(val_pairs)
        echo_report(val_report)
    else:
        train, val = split_pairs(train, val_fraction, seed)
    log = (lambda m: typer.echo(m, err=True)) if as_json else typer.echo
    if method == "head":
        from lmstack.align.reward_head import HeadConfig, fit_reward_head

        head_config = HeadConfig(
            max_length=max_length,
            depths=numbers(depths, int, "--depths") if depths else None,
            l2s=numbers(l2, float, "--l2"),
            folds=folds,
            bf16=native_bf16() if bf16 is None else bf16,
            seed=seed,
        )
        result = fit_reward_head(train, val, out, model, head_config, log=log)
    elif method == "trl":
        config = RewardConfig(
            epochs=epochs,
            lr=lr,
            head_lr=head_lr,
            weight_decay=weight_decay,
            batch_size=batch_size,
            max_length=max_length,
            lora=lora,
            train_layers=train_layers,
            max_steps=max_steps,
            bf16=native_bf16() if bf16 is None else bf16,
            eval_before=eval_before,
            seed=seed,
            val_fraction=val_fraction,
        )
        result = train_reward(train, val, out, model, config, log=log)
    else:
        raise InputError(f"--method must be trl or head, got {method!r}")
    if as_json:
        dump(result)
    else:
        summary = _accuracy(result["val_accuracy"], result["val_ci95"], result["val_pairs"])
        typer.echo(f"validation {summary}; {result['train_seconds']:.0f} s -> {out}")


@reward_app.command("eval")
def reward_eval_command(
    model: Path = typer.Option(..., "--model", help="Reward model directory"),
    pairs: Path = typer.Option(..., "--pairs", help="Preference pairs"),
    max_length: int | None = typer.Option(
        None, "--max-length", help="Default: the length the model was trained with"
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Pairwise accuracy: how often the chosen reply scores above the rejected one."""
    from lmstack.align.data import load_pairs
    from lmstack.align.reward import check_reward_dir, evaluate_reward

    check_reward_dir(model)
    items, report = load_pairs(pairs)
    echo_report(report)
    result = evaluate_reward(model, items, max_length)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo(_accuracy(result["accuracy"], result["ci95"], result["pairs"]))


@reward_app.command("score")
def reward_score_command(
    model: Path = typer.Option(..., "--model", help="Reward model directory"),
    prompt: str | None = typer.Option(None, "--prompt"),
    response: str | None = typer.Option(None, "--response"),
    file: Path | None = typer.Option(None, "--file", help='JSONL {"prompt", "response"}'),
) -> None:
    """Score one prompt/response, or each line of a JSONL file (prints JSON lines)."""
    from lmstack.align.data import _messages
    from lmstack.align.reward import RewardModel, check_reward_dir

    check_reward_dir(model)
    rows = []
    if file is not None:
        if not file.is_file():
            raise InputError(f"no such file: {file}")
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                rows.append((_messages(rec["prompt"], "prompt"), str(rec["response"])))
            except (ValueError, KeyError, TypeError) as exc:
                raise InputError(f"{file}:{number}: needs 'prompt' and 'response' ({exc})") from exc
    elif prompt is not None and response is not None:
        rows.append(([{"role": "user", "content": prompt}], response))
    else:
        raise InputError("give --prompt and --response, or --file")
    rm = RewardModel(model)
    scores = rm.score([m for m, _ in rows], [r for _, r in rows])
    for (messages, _reply), score in zip(rows, scores):
        typer.echo(json.dumps({"prompt": messages[-1]["content"], "score": round(score, 4)}))


def _accuracy(accuracy: float, ci95, pairs: int) -> str:
    low, high = ci95
    return f"accuracy {accuracy:.3f} (95% CI {low:.3f}-{high:.3f}) on {pairs} pairs"
