"""`lmstack align ...`: collection, reward model, PPO, DPO and evaluation commands."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lmstack.align.cli_collect import collect_app
from lmstack.align.cli_common import dump, echo_report
from lmstack.align.cli_reward import reward_app
from lmstack.errors import InputError
from lmstack.extras import require

align_app = typer.Typer(help="Alignment from human preferences.", no_args_is_help=True)
align_app.add_typer(collect_app, name="collect")
align_app.add_typer(reward_app, name="reward")


@align_app.callback()
def _needs_align(ctx: typer.Context) -> None:
    # Training and evaluation need TRL, peft and accelerate. Collecting preferences does
    # not: it runs on a serve-only install, as the /rate page it feeds does.
    if ctx.invoked_subcommand != "collect":
        require("align", "lmstack align")


# ---------------------------------------------------------------------------- PPO / DPO / eval


@align_app.command("ppo")
def ppo_command(
    policy: str = typer.Option("bundled", "--policy", help="SFT policy (HF dir or bundled)"),
    reward: Path = typer.Option(..., "--reward", help="Reward model directory"),
    prompts: Path = typer.Option(..., "--prompts", help="Training prompts"),
    out: Path = typer.Option(..., "--out", help="Directory for the trained policy"),
    eval_prompts: Path | None = typer.Option(None, "--eval-prompts", help="Held-out prompts"),
    steps: int = typer.Option(20, "--steps"),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts per rollout"),
    mini_batch_size: int = typer.Option(4, "--mini-batch-size"),
    ppo_epochs: int = typer.Option(2, "--ppo-epochs"),
    lr: float = typer.Option(1e-5, "--lr"),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens"),
    init_beta: float = typer.Option(0.05, "--beta", help="Initial KL coefficient (0.01-0.1)"),
    kl_target: float = typer.Option(2.0, "--kl-target", help="Target mean KL (nats/response)"),
    beta_min: float = typer.Option(0.01, "--beta-min", help="Floor of the adaptive KL coefficient"),
    kl_stop: float = typer.Option(
        4.0, "--kl-stop", help="Hard stop above this mean KL; the update that crossed it is undone"
    ),
    entropy_coef: float = typer.Option(0.01, "--entropy-coef"),
    length_penalty: float = typer.Option(0.0, "--length-penalty", help="Reward per token"),
    scale_scores: bool = typer.Option(
        True, "--scale-scores/--raw-scores", help="Divide scores by their running std"
    ),
    train_layers: int | None = typer.Option(None, "--train-layers", help="Top K blocks only"),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """PPO against a reward model with an adaptive per-token KL penalty to the SFT model."""
    from lmstack.align.data import load_prompts
    from lmstack.align.ppo import PPOConfig, train_ppo

    items, report = load_prompts(prompts)
    echo_report(report)
    held = None
    if eval_prompts is not None:
        held, held_report = load_prompts(eval_prompts)
        echo_report(held_report)
    config = PPOConfig(
        steps=steps,
        batch_size=batch_size,
        mini_batch_size=mini_batch_size,
        ppo_epochs=ppo_epochs,
        lr=lr,
        max_new_tokens=max_new_tokens,
        init_beta=init_beta,
        beta_min=beta_min,
        kl_target=kl_target,
        kl_stop=kl_stop,
        entropy_coef=entropy_coef,
        length_penalty=length_penalty,
        scale_scores=scale_scores,
        train_layers=train_layers,
        seed=seed,
    )
    log = (lambda m: typer.echo(m, err=True)) if as_json else typer.echo
    result = train_ppo(policy, reward, items, out, config, eval_prompts=held, log=log)
    dump(result) if as_json else typer.echo(json.dumps(result.get("heldout"), indent=2))


@align_app.command("dpo")
def dpo_command(
    pairs: Path = typer.Option(..., "--pairs", help="Preference pairs"),
    out: Path = typer.Option(..., "--out", help="Directory for the trained policy"),
    policy: str = typer.Option("bundled", "--policy", help="SFT policy"),
    beta: float = typer.Option(0.1, "--beta"),
    lr: float = typer.Option(5e-6, "--lr"),
    epochs: int = typer.Option(1, "--epochs"),
    batch_size: int = typer.Option(4, "--batch-size"),
    max_length: int = typer.Option(256, "--max-length"),
    max_steps: int = typer.Option(-1, "--max-steps"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Direct preference optimisation with TRL's DPOTrainer (no reward model, no PPO)."""
    from lmstack.align.data import load_pairs
    from lmstack.align.dpo import DPOSettings, train_dpo

    items, report = load_pairs(pairs)
    echo_report(report)
    settings = DPOSettings(
        beta=beta,
        lr=lr,
        epochs=epochs,
        batch_size=batch_size,
        max_length=max_length,
        max_steps=max_steps,
    )
    result = train_dpo(policy, items, out, settings)
    dump(result) if as_json else typer.echo(f"DPO policy -> {out} ({result['seconds']} s)")


@align_app.command("eval")
def eval_command(
    a: str = typer.Option(..., "--a", help="Model A (HF dir, or 'bundled')"),
    b: str = typer.Option(..., "--b", help="Model B"),
    prompts: Path = typer.Option(..., "--prompts", help="Held-out prompts"),
    judge: str = typer.Option("reward", "--judge", help="reward or file"),
    reward: Path | None = typer.Option(None, "--reward", help="Reward model (judge reward)"),
    sheets: Path | None = typer.Option(None, "--sheets", help="Directory for blind sheets"),
    max_tokens: int = typer.Option(128, "--max-tokens"),
    temperature: float = typer.Option(0.0, "--temperature"),
    tie_margin: float = typer.Option(0.0, "--tie-margin", help="|rA-rB| <= this is a tie"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Both models answer held-out prompts; win/loss/tie, sign test, diversity, lengths."""
    from lmstack.align.data import load_prompts
    from lmstack.align.evaluate import EvalConfig, format_result, run_eval

    if judge not in ("reward", "file"):
        raise InputError(f"--judge must be reward or file, got {judge!r}")
    if judge == "reward" and reward is None:
        raise InputError("--judge reward needs --reward DIR")
    if judge == "file" and sheets is None:
        raise InputError("--judge file needs --sheets DIR")
    items, report = load_prompts(prompts)
    echo_report(report)
    config = EvalConfig(max_tokens=max_tokens, temperature=temperature, tie_margin=tie_margin)
    result = run_eval(a, b, items, judge, reward, sheets, config)
    dump(result) if as_json else typer.echo(format_result(result))


@align_app.command("eval-score")
def eval_score_command(
    sheets: Path = typer.Option(..., "--sheets", help="Directory written by eval --judge file"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Score filled-in blind A/B sheets: unblind, then win/loss/tie and the sign test."""
    from lmstack.align.evaluate import format_result, score_sheets

    result = score_sheets(sheets)
    dump(result) if as_json else typer.echo(format_result(result))
