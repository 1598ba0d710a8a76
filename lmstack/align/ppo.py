"""PPO against a reward model, with an adaptive per-token KL penalty to the frozen SFT model.

Written here (TRL removed its PPOTrainer) on accelerate: `accelerate launch` runs the same
loop data-parallel on several GPUs; on one CPU it is a plain loop with bf16 autocast.

One step:
1. Rollouts: the policy samples a reply to each prompt of the batch (`policy.PolicyRunner`).
2. Scores: the reward model scores each (prompt, reply), divided by the running standard
   deviation of every score so far (`scale_scores`), so beta and the KL target mean the same
   whatever scale the reward model has; an optional length penalty subtracts
   `length_penalty` per reply token. Logged rewards are the reward model's own scores.
3. Per-token rewards: -beta * (log pi(t) - log pi_ref(t)) at every reply token, plus the
   score at the last one. Mean KL is the per-reply sum of that log-ratio, averaged.
4. Values from a linear value head on the policy's last hidden state; advantages by GAE
   (gamma, lambda), whitened; returns = advantages + values.
5. `ppo_epochs` passes over minibatches: clipped surrogate, clipped value loss, entropy bonus.
6. Adaptive beta (`ppo_math.adapt_beta`): x1.5 when mean KL > 1.5 x target, /1.5 when below
   target / 1.5, never below `beta_min`.

Hard KL stop: every update is judged by the KL of the next rollout, which the new policy
samples; after the last update one more rollout is sampled only to judge it. When a mean KL
exceeds `kl_stop`, the update that caused it is undone and training ends, so the saved
policy is always one whose KL was measured under the limit.

Logged every step (ppo_log.jsonl, ppo_curves.png): reward mean/std, KL, beta, entropy,
reply length and the reward-length correlation (a reward-hacking alarm), and where the time
went (sampling, scoring, reference/old forward passes, the update).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmstack.align.curves import plot_curves
from lmstack.align.data import PromptItem, atomic_write
from lmstack.align.policy import PolicyRunner, load_policy, save_policy
from lmstack.align.ppo_math import (
    adapt_beta,
    gae,
    kl_estimates,
    masked_mean,
    pearson,
    sample_std,
    whiten,
)
from lmstack.align.reward import RewardModel, freeze_below
from lmstack.cpu import native_bf16
from lmstack.errors import InputError


@dataclass
class PPOConfig:
    steps: int = 20
    batch_size: int = 8  # prompts per rollout
    mini_batch_size: int = 4
    ppo_epochs: int = 2
    lr: float = 1e-5
    max_new_tokens: int = 48
    max_prompt_tokens: int = 192
    temperature: float = 1.0
    init_beta: float = 0.05
    # The adaptive beta's floor: the low end of the usual 0.01-0.1 starting range.
    beta_min: float = 0.01
    kl_target: float = 2.0  # nats per reply
    kl_stop: float = 4.0  # hard stop: 2 x target, above the controller's 1.5 x band
    adaptive_kl: bool = True
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.01
    length_penalty: float = 0.0
    scale_scores: bool = True
    train_layers: int | None = None
    # bf16 autocast only where the CPU multiplies bf16 natively (AMX / AVX512-BF16: 3-9x
    # faster); on AVX2-only CPUs torch's bf16 matmul runs under 1 GFLOPS, fp32 is far faster.
    bf16: bool = field(default_factory=native_bf16)
    eval_limit: int = 32
    seed: int = 0

    def check(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.ppo_epochs < 1:
            raise InputError("--steps, --batch-size and --ppo-epochs must be >= 1")
        if not 1 <= self.mini_batch_size <= self.batch_size:
            raise InputError(
                f"--mini-batch-size must be in [1, --batch-size={self.batch_size}], "
                f"got {self.mini_batch_size}"
            )
        if not 0 < self.init_beta <= 1:
            raise InputError(f"--beta must be in (0, 1] (0.01-0.1 is usual), got {self.init_beta}")
        if not 0 <= self.beta_min <= self.init_beta:
            raise InputError(
                f"--beta-min must be in [0, --beta={self.init_beta}], got {self.beta_min}"
            )
        if self.kl_target <= 0 or self.kl_stop <= self.kl_target:
            raise InputError(
                f"need 0 < --kl-target < --kl-stop, got {self.kl_target} and {self.kl_stop}"
            )
        if self.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")


def heldout_report(runner, policy, reference, reward, items, seed, autocast, batch_size) -> dict:
    """Mean reward of sampled replies on held-out prompts, and their KL to the reference."""
    import torch

    scores, kls, k3s, lengths = [], [], [], []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        rollout = runner.sample(policy, batch, seed + start, autocast)
        with torch.no_grad(), autocast():
            logp, _, _ = runner.forward(policy, rollout)
            ref_logp, _, _ = runner.forward(reference, rollout)
        kl, k3 = kl_estimates(logp, ref_logp, rollout.reply_mask)
        kls += kl
        k3s += k3
        lengths += rollout.reply_mask.sum(1).tolist()
        scores += reward.score([it.messages for it in batch], rollout.texts)
    n = len(scores)
    return {
        "prompts": n,
        "reward_mean": round(sum(scores) / n, 4),
        "reward_std": round(sample_std(scores), 4),
        "kl_mean": round(sum(kls) / n, 4),
        "kl_k3_mean": round(sum(k3s) / n, 4),
        "length_mean": round(sum(lengths) / n, 2),
    }


class Stopwatch:
    """Seconds spent per named stage, summed over calls."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, since: float) -> float:
        now = time.monotonic()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - since
        return now

    def rounded(self) -> dict[str, float]:
        return {f"{k}_s": round(v, 1) for k, v in self.seconds.items()}


def ppo_update(model, value_head, optimizer, accelerator, trainable, runner, rollout, old, config):
    """`ppo_epochs` passes of clipped-surrogate minibatch updates; the mean of each loss."""
    import torch

    mask = rollout.reply_mask
    n = mask.shape[0]
    stats = {"pg_loss": [], "vf_loss": [], "clipfrac": [], "approx_kl": [], "entropy": []}
    for _ in range(config.ppo_epochs):
        perm = torch.randperm(n)
        for start in range(0, n, config.mini_batch_size):
            rows = perm[start : start + config.mini_batch_size]
            m = mask[rows]
            with accelerator.autocast():
                logp, entropy, values = runner.forward(model, rollout, rows, value_head)
            ratio = (logp - old["logp"][rows]).exp()
            adv = old["advantages"][rows]
            clipped = ratio.clamp(1 - config.cliprange, 1 + config.cliprange)
            pg_loss = masked_mean(torch.max(-adv * ratio, -adv * clipped), m)
            v_old = old["values"][rows]
            v_clipped = v_old + (values - v_old).clamp(
                -config.cliprange_value, config.cliprange_value
            )
            ret = old["returns"][rows]
            vf_loss = 0.5 * masked_mean(torch.max((values - ret) ** 2, (v_clipped - ret) ** 2), m)
            ent = masked_mean(entropy, m)
            loss = pg_loss + config.vf_coef * vf_loss - config.entropy_coef * ent
            optimizer.zero_grad()
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            with torch.no_grad():
                stats["pg_loss"].append(pg_loss.item())
                stats["vf_loss"].append(vf_loss.item())
                stats["entropy"].append(ent.item())
                stats["clipfrac"].append(
                    masked_mean(((ratio - 1).abs() > config.cliprange).float(), m).item()
                )
                stats["approx_kl"].append(
                    masked_mean(0.5 * (logp - old["logp"][rows]) ** 2, m).item()
                )
    return {k: sum(v) / len(v) for k, v in stats.items()}


def train_ppo(
    policy: str | Path,
    reward_dir: str | Path,
    prompts: list[PromptItem],
    out_dir: str | Path,
    config: PPOConfig | None = None,
    eval_prompts: list[PromptItem] | None = None,
    log=print,
) -> dict:
    import copy

    import torch
    from accelerate import Accelerator

    config = config or PPOConfig()
    config.check()
    if not prompts:
        raise InputError("the prompt set is empty")
    clock = Stopwatch()
    t = time.monotonic()
    out_dir = Path(out_dir)
    reward = RewardModel(reward_dir)  # fails early, with a clear error, on a bad directory
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision="bf16" if config.bf16 else "no"
    )
    model, tokenizer, base = load_policy(policy)
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad = False
    if config.train_layers is not None:
        freeze_below(model, config.train_layers)
    value_head = torch.nn.Linear(model.config.hidden_size, 1)
    torch.nn.init.zeros_(value_head.weight)
    torch.nn.init.zeros_(value_head.bias)
    trainable = [p for p in model.parameters() if p.requires_grad] + list(value_head.parameters())
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    model, value_head, optimizer = accelerator.prepare(model, value_head, optimizer)
    reference.to(accelerator.device)
    reward.model.to(accelerator.device)
    runner = PolicyRunner(
        tokenizer,
        accelerator.device,
        config.max_prompt_tokens,
        config.max_new_tokens,
        config.temperature,
    )
    autocast = accelerator.autocast
    unwrapped = accelerator.unwrap_model(model)
    held = (eval_prompts or [])[: config.eval_limit]
    t = clock.add("load", t)

    report: dict = {"config": asdict(config), "policy": str(base), "reward": str(reward_dir)}
    if held:
        report["heldout_before"] = heldout_report(
            runner, unwrapped, reference, reward, held, 10_000, autocast, config.batch_size
        )
        t = clock.add("heldout_eval", t)
        log(f"held-out before: {report['heldout_before']}")

    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "ppo_log.jsonl"
    log_path.write_text("")
    history: list[dict] = []
    beta = config.init_beta
    rng = random.Random(config.seed)
    order: list[PromptItem] = []
    stopped = None
    undone = False  # the update that crossed --kl-stop was rolled back
    final_check = None
    snapshot: dict | None = None  # trainable weights before the latest update
    seen: list[float] = []  # every training score so far, for the running scale
    # Step `steps + 1` only samples: it judges the last update against the hard KL stop.
    for step in range(1, config.steps + 2):
        t_step = t = time.monotonic()
        if len(order) < config.batch_size:
            order += rng.sample(prompts, len(prompts))
        batch, order = order[: config.batch_size], order[config.batch_size :]

        unwrapped.eval()
        rollout = runner.sample(unwrapped, batch, config.seed * 100_000 + step, autocast)
        t_gen = time.monotonic() - t
        t = clock.add("rollout", t)
        scores = torch.tensor(
            reward.score([it.messages for it in batch], rollout.texts),
            device=accelerator.device,
        )
        t = clock.add("score", t)
        with torch.no_grad(), autocast():
            old_logp, _, old_values = runner.forward(model, rollout, value_head=value_head)
            ref_logp, _, _ = runner.forward(reference, rollout)
        t = clock.add("forward", t)
        mask = rollout.reply_mask
        kl_each, k3_each = kl_estimates(old_logp, ref_logp, mask)
        kl, kl_k3 = sum(kl_each) / len(kl_each), sum(k3_each) / len(k3_each)
        if kl > config.kl_stop:
            stopped = f"mean KL {kl:.2f} > --kl-stop {config.kl_stop} after update {step - 1}"
            if snapshot is not None:
                unwrapped.load_state_dict(snapshot, strict=False)
                undone = True
                stopped += "; that update was undone"
            log(f"hard KL stop: {stopped}")
            break
        if step > config.steps:
            final_check = {"kl": round(kl, 4), "kl_k3": round(kl_k3, 4)}
            final_check["reward_mean"] = round(scores.mean().item(), 4)
            break
        lengths = mask.sum(1)
        rewards = -beta * (old_logp - ref_logp) * mask
        last = (lengths - 1).clamp(min=0).long()
        seen += scores.tolist()
        scale = sample_std(seen) if config.scale_scores else 1.0
        scale = scale if scale > 1e-6 else 1.0  # one score, or all equal: nothing to scale by
        scaled = scores / scale
        rewards[torch.arange(len(batch)), last] += scaled - config.length_penalty * lengths
        advantages, returns = gae(rewards, old_values, mask, config.gamma, config.lam)
        old = {
            "logp": old_logp,
            "values": old_values,
            "advantages": whiten(advantages, mask),
            "returns": returns,
        }
        snapshot = {
            k: v.detach().clone() for k, v in unwrapped.state_dict().items() if k in trainable_names
        }
        unwrapped.train()
        stats = ppo_update(
            model, value_head, optimizer, accelerator, trainable, runner, rollout, old, config
        )
        t = clock.add("update", t)

        score_list, length_list = scores.tolist(), lengths.tolist()
        corr = pearson(score_list, length_list)
        record = {
            "step": step,
            "reward_mean": round(sum(score_list) / len(score_list), 4),
            "reward_std": round(sample_std(score_list), 4),
            "kl": round(kl, 4),
            "kl_k3": round(kl_k3, 4),
            "beta": round(beta, 5),
            "score_scale": round(scale, 4),
            "entropy": round(stats.pop("entropy"), 4),
            "response_length": round(sum(length_list) / len(length_list), 2),
            "reward_length_corr": None if corr is None else round(corr, 4),
            **{k: round(v, 5) for k, v in stats.items()},
            "generate_s": round(t_gen, 2),
            "step_s": round(time.monotonic() - t_step, 2),
        }
        if corr is not None and corr > 0.5:
            record["alarm"] = "reward tracks length (corr > 0.5): check for length hacking"
        history.append(record)
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        log(
            f"step {step}: reward {record['reward_mean']:+.3f} kl {kl:.3f} beta {beta:.4f} "
            f"len {record['response_length']:.0f} corr {record['reward_length_corr']} "
            f"({record['step_s']:.1f} s)"
        )
        if config.adaptive_kl:
            beta = adapt_beta(beta, kl, config.kl_target, config.beta_min)

    unwrapped.eval()
    t = time.monotonic()
    if held:
        report["heldout_after"] = heldout_report(
            runner, unwrapped, reference, reward, held, 10_000, autocast, config.batch_size
        )
        t = clock.add("heldout_eval", t)
        log(f"held-out after: {report['heldout_after']}")
        after = report["heldout_after"]
        report["heldout"] = {
            "reward_before": report["heldout_before"]["reward_mean"],
            "reward_after": after["reward_mean"],
            "kl_after": after["kl_mean"],
            "kl_k3_after": after["kl_k3_mean"],
            "kl_target": config.kl_target,
            "kl_under_target": max(after["kl_mean"], after["kl_k3_mean"]) < config.kl_target,
        }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_policy(unwrapped, base, out_dir)
        torch.save(accelerator.unwrap_model(value_head).state_dict(), out_dir / "value_head.pt")
        plot_curves(history, out_dir / "ppo_curves.png", config.kl_target)
    clock.add("save", t)
    report.update(
        steps_run=len(history),
        updates_kept=len(history) - undone,
        update_undone=undone,
        stopped=stopped,
        final_check=final_check,
        beta_trajectory=[h["beta"] for h in history] + [round(beta, 5)],
        final_beta=round(beta, 5),
        timings=clock.rounded(),
        log=str(log_path),
        curves=str(out_dir / "ppo_curves.png"),
    )
    atomic_write(out_dir / "ppo_report.json", json.dumps(report, indent=2) + "\n")
    return report
