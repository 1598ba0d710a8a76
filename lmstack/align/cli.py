"""`lmstack align ...`: collection, reward model, PPO, DPO and evaluation commands."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lmstack.errors import InputError

align_app = typer.Typer(help="Alignment from human preferences.", no_args_is_help=True)
collect_app = typer.Typer(help="Plan comparisons, rate with AI feedback, QC, import, export.")
reward_app = typer.Typer(help="Train, evaluate and apply a reward model.")
align_app.add_typer(collect_app, name="collect")
align_app.add_typer(reward_app, name="reward")


def _echo_report(report) -> None:
    if report.skipped:
        typer.echo(report.summary(), err=True)


def _dump(data: dict) -> None:
    typer.echo(json.dumps(data, indent=2))


# ---------------------------------------------------------------------------- collect


@collect_app.command("plan")
def plan_command(
    prompts: Path = typer.Option(..., "--prompts", help="JSONL / .txt / preference file"),
    out: Path = typer.Option(..., "--out", help="New directory for the plan and ratings.db"),
    stratify_by: str | None = typer.Option(None, "--stratify-by", help="Prompt field"),
    raters: str = typer.Option("rater1,rater2,rater3", "--raters", help="Comma-separated"),
    max_tokens: int = typer.Option(192, "--max-tokens", help="Tokens per response"),
    seed: int = typer.Option(0, "--seed"),
    model: str | None = typer.Option(None, "--model", help="Policy to sample (HF dir)"),
    llm_url: str | None = typer.Option(None, "--llm-url", help="OpenAI-compatible server"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Split prompts, generate 4 responses each, plan comparisons and rater assignments."""
    from lmstack.align.collect import PlanConfig, plan
    from lmstack.align.data import load_prompts
    from lmstack.llm import make_generator

    items, report = load_prompts(prompts)
    _echo_report(report)
    names = [r.strip() for r in raters.split(",") if r.strip()]
    if len(set(names)) != len(names):
        raise InputError(f"--raters has duplicates: {raters}")
    if max_tokens < 1:
        raise InputError(f"--max-tokens must be >= 1, got {max_tokens}")
    config = PlanConfig(stratify_by=stratify_by, raters=names, max_tokens=max_tokens, seed=seed)
    generator = make_generator(llm_url=llm_url, model=model)
    try:
        summary = plan(items, out, generator, config)
    finally:
        generator.close()
    if as_json:
        _dump(summary)
    else:
        typer.echo(
            f"splits {summary['splits']}; {summary['responses']} responses; comparisons "
            f"{summary['comparisons']}; rater tokens in {summary['tokens']}"
        )


@collect_app.command("qc")
def qc_command(
    db: Path = typer.Option(..., "--db", help="ratings.db from the plan"),
    threshold: float = typer.Option(0.9, "--threshold", help="Flag raters below this"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Per-rater consistency and gold accuracy, agreement, kappa, pending tie-breaks."""
    from lmstack.align.qc import format_report, qc_report
    from lmstack.align.ratings import RatingStore

    report = qc_report(RatingStore(db), threshold)
    _dump(report) if as_json else typer.echo(format_report(report))


@collect_app.command("rate-ai")
def rate_ai_command(
    db: Path = typer.Option(..., "--db", help="ratings.db from the plan"),
    principles: Path = typer.Option(..., "--principles", help="Text file, one per line"),
    llm_url: str | None = typer.Option(None, "--llm-url", help="A stronger served model"),
    model: str | None = typer.Option(None, "--model", help="In-process model (HF dir)"),
    limit: int | None = typer.Option(None, "--limit", help="Rate at most this many"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Rate planned comparisons against written principles with a model (AI feedback)."""
    from lmstack.align.ai_feedback import load_principles, rate_ai
    from lmstack.align.ratings import RatingStore
    from lmstack.llm import make_generator

    rules = load_principles(principles)
    store = RatingStore(db)
    generator = make_generator(llm_url=llm_url, model=model)
    try:
        summary = rate_ai(store, rules, generator, limit=limit)
    finally:
        generator.close()
    _dump(summary) if as_json else typer.echo(
        f"{summary['rated']} comparisons rated by {summary['rater']}: {summary['choices']}"
    )


@collect_app.command("import")
def import_command(
    files: list[Path] = typer.Argument(..., help="ShareGPT JSON, Anthropic HH or JSONL"),
    out: Path = typer.Option(..., "--out", help="Pairs JSONL to write"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Convert existing preference data to pairs JSONL (bad records reported and skipped)."""
    from lmstack.align.data import load_pairs, write_pairs

    pairs, reports = [], []
    for file in files:
        got, report = load_pairs(file)
        _echo_report(report)
        pairs += got
        reports.append({"file": str(file), "kept": report.kept, "skipped": len(report.skipped)})
    write_pairs(pairs, out)
    _dump({"pairs": len(pairs), "files": reports}) if as_json else typer.echo(
        f"{len(pairs)} pairs -> {out}"
    )


@collect_app.command("export")
def export_command(
    db: Path = typer.Option(..., "--db", help="ratings.db from the plan"),
    out: Path = typer.Option(..., "--out", help="Directory for pairs_*.jsonl"),
    source: str = typer.Option("human", "--source", help="human, ai or all"),
) -> None:
    """Resolved ratings (majority, tie-break) as reward-train/validation pairs."""
    from lmstack.align.collect import export_pairs
    from lmstack.align.ratings import RatingStore

    _dump(export_pairs(RatingStore(db), out, source))


# ---------------------------------------------------------------------------- reward


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
    bf16: bool = typer.Option(True, "--bf16/--no-bf16", help="bf16 autocast"),
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
    _echo_report(report)
    if val_pairs is not None:
        val, val_report = load_pairs(val_pairs)
        _echo_report(val_report)
    else:
        train, val = split_pairs(train, val_fraction, seed)
    log = (lambda m: typer.echo(m, err=True)) if as_json else typer.echo
    if method == "head":
        from lmstack.align.reward_head import HeadConfig, fit_reward_head

        head_config = HeadConfig(
            max_length=max_length,
            depths=_numbers(depths, int, "--depths") if depths else None,
            l2s=_numbers(l2, float, "--l2"),
            folds=folds,
            bf16=bf16,
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
            bf16=bf16,
            eval_before=eval_before,
            seed=seed,
            val_fraction=val_fraction,
        )
        result = train_reward(train, val, out, model, config, log=log)
    else:
        raise InputError(f"--method must be trl or head, got {method!r}")
    if as_json:
        _dump(result)
    else:
        low, high = result["val_ci95"]
        typer.echo(
            f"validation accuracy {result['val_accuracy']:.3f} (95% CI {low:.3f}-{high:.3f}) "
            f"on {result['val_pairs']} pairs; {result['train_seconds']:.0f} s -> {out}"
        )


def _numbers(text: str, kind, option: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise InputError(f"{option} takes comma-separated numbers, got {text!r}") from exc


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
    _echo_report(report)
    result = evaluate_reward(model, items, max_length)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        low, high = result["ci95"]
        typer.echo(
            f"accuracy {result['accuracy']:.3f} on {result['pairs']} pairs "
            f"(95% CI {low:.3f}-{high:.3f})"
        )


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
    train_layers: int | None = typer.Option(None, "--train-layers", help="Top K blocks only"),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """PPO against a reward model with an adaptive per-token KL penalty to the SFT model."""
    from lmstack.align.data import load_prompts
    from lmstack.align.ppo import PPOConfig, train_ppo

    items, report = load_prompts(prompts)
    _echo_report(report)
    held = None
    if eval_prompts is not None:
        held, held_report = load_prompts(eval_prompts)
        _echo_report(held_report)
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
        train_layers=train_layers,
        seed=seed,
    )
    log = (lambda m: typer.echo(m, err=True)) if as_json else typer.echo
    result = train_ppo(policy, reward, items, out, config, eval_prompts=held, log=log)
    _dump(result) if as_json else typer.echo(json.dumps(result.get("heldout"), indent=2))


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
    _echo_report(report)
    settings = DPOSettings(
        beta=beta,
        lr=lr,
        epochs=epochs,
        batch_size=batch_size,
        max_length=max_length,
        max_steps=max_steps,
    )
    result = train_dpo(policy, items, out, settings)
    _dump(result) if as_json else typer.echo(f"DPO policy -> {out} ({result['seconds']} s)")


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
    _echo_report(report)
    config = EvalConfig(max_tokens=max_tokens, temperature=temperature, tie_margin=tie_margin)
    result = run_eval(a, b, items, judge, reward, sheets, config)
    _dump(result) if as_json else typer.echo(format_result(result))


@align_app.command("eval-score")
def eval_score_command(
    sheets: Path = typer.Option(..., "--sheets", help="Directory written by eval --judge file"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Score filled-in blind A/B sheets: unblind, then win/loss/tie and the sign test."""
    from lmstack.align.evaluate import format_result, score_sheets

    result = score_sheets(sheets)
    _dump(result) if as_json else typer.echo(format_result(result))
