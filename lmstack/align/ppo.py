"""PPO against a reward model, with an adaptive per-token KL penalty to the frozen SFT model.

Written here (TRL removed its PPOTrainer) on accelerate: `accelerate launch` runs the same
loop data-parallel on several GPUs; on one CPU it is a plain loop with bf16 autocast.

One step:
1. Rollouts: the policy samples a reply to each prompt of the batch (T=1, no top-k/top-p,
   so the sampling distribution is the policy's own and the log-probs below are exact).
   Sampling uses the in-training model's `generate`, not the serving engine: the engine
   would need the new weights after every update, and the log-probs PPO needs come from a
   torch forward pass of the policy anyway. At scale the rollouts go to vLLM with a weight
   sync; nothing else changes.
2. Scores: the reward model scores each (prompt, reply); an optional length penalty
   subtracts `length_penalty` per reply token.
3. Per-token rewards: -beta * (log pi(t) - log pi_ref(t)) at every reply token, plus the
   score at the last one. Mean KL is the per-reply sum of that log-ratio, averaged.
4. Values from a linear value head on the policy's last hidden state; advantages by GAE
   (gamma, lambda), whitened; returns = advantages + values.
5. `ppo_epochs` passes over minibatches: clipped surrogate, clipped value loss, entropy bonus.
6. Adaptive beta: x1.5 when mean KL > 1.5 x target, /1.5 when below target / 1.5.
   Hard stop: when a step's mean KL exceeds `kl_stop` the update that caused it is undone
   and training ends, so the saved policy is the last one measured under the limit.

Logged every step (ppo_log.jsonl, ppo_curves.png): reward mean/std, KL, beta, entropy,
reply length and the reward-length correlation, whose climb is the usual sign that the
policy is buying reward with length rather than quality.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lmstack.align.data import PromptItem, atomic_write
from lmstack.align.reward import PAD_TOKEN, TOKENIZER_FILES, RewardModel, freeze_below
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
    kl_target: float = 2.0  # nats per reply
    kl_stop: float = 8.0
    adaptive_kl: bool = True
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.01
    length_penalty: float = 0.0
    train_layers: int | None = None
    bf16: bool = True
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
        if self.kl_target <= 0 or self.kl_stop <= self.kl_target:
            raise InputError(
                f"need 0 < --kl-target < --kl-stop, got {self.kl_target} and {self.kl_stop}"
            )
        if self.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")


def adapt_beta(beta: float, kl: float, target: float) -> float:
    """x1.5 above 1.5 x target, /1.5 below target / 1.5, unchanged in between."""
    if kl > 1.5 * target:
        return beta * 1.5
    if kl < target / 1.5:
        return beta / 1.5
    return beta


def pearson(x: list[float], y: list[float]) -> float | None:
    n = len(x)
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return None
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / math.sqrt(sxx * syy)


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimates and returns over reply tokens ([B, T] tensors)."""
    import torch

    values = values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, advantages + values


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x, mask):
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * (var + 1e-8).rsqrt() * mask


class Rollout:
    """One batch of prompts and sampled replies, as tensors ready for forward passes."""

    def __init__(self, input_ids, attention_mask, prompt_len: int, reply_mask, texts, items):
        self.input_ids = input_ids  # [B, P + T]: left-padded prompt, right-padded reply
        self.attention_mask = attention_mask
        self.prompt_len = prompt_len
        self.reply_mask = reply_mask  # [B, T] 1 for reply tokens up to and including EOS
        self.texts = texts
        self.items = items


class PolicyRunner:
    """Tokenizing, sampling and the forward pass that gives log-probs, entropy and values."""

    def __init__(self, tokenizer, config: PPOConfig, device):
        self.tokenizer = tokenizer
        self.config = config
        self.device = device
        self.pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
        self.eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def prompt_ids(self, item: PromptItem) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            item.messages, tokenize=False, add_generation_prompt=True
        )
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[-self.config.max_prompt_tokens :]

    def sample(self, model, items: list[PromptItem], seed: int, autocast) -> Rollout:
        import torch

        prompts = [self.prompt_ids(it) for it in items]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        torch.manual_seed(seed)
        with torch.no_grad(), autocast():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=self.config.temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=self.config.max_new_tokens,
                eos_token_id=self.eos_id,
                pad_token_id=self.pad_id,
            )
        reply = out[:, width:]
        is_eos = reply == self.eos_id
        # Tokens up to and including the first EOS belong to the reply.
        after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
        reply_mask = (~after_eos).long()
        reply = torch.where(reply_mask.bool(), reply, torch.full_like(reply, self.pad_id))
        texts = [
            self.tokenizer.decode(r[m.bool()].tolist(), skip_special_tokens=True).strip()
            for r, m in zip(reply, reply_mask)
        ]
        return Rollout(
            torch.cat([ids, reply], dim=1),
            torch.cat([mask, reply_mask], dim=1),
            width,
            reply_mask.float(),
            texts,
            items,
        )

    @staticmethod
    def forward(model, rollout: Rollout, rows=None, value_head=None):
        """(log-probs, entropy, values) of the reply tokens: each [B, T]."""
        import torch

        ids = rollout.input_ids if rows is None else rollout.input_ids[rows]
        mask = rollout.attention_mask if rows is None else rollout.attention_mask[rows]
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=positions)
        hidden = hidden.last_hidden_state[:, rollout.prompt_len - 1 : -1]
        logits = model.lm_head(hidden).float()
        logp_all = torch.log_softmax(logits, dim=-1)
        targets = ids[:, rollout.prompt_len :]
        logprobs = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        values = value_head(hidden.float()).squeeze(-1) if value_head is not None else None
        return logprobs, entropy, values


def load_policy(policy: str | Path, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmstack.model.weights import resolve_model

    base = resolve_model(None if str(policy) == "bundled" else policy)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    return model, tokenizer, base


def save_policy(model, base: Path, out_dir: Path) -> None:
    """A plain HF directory `lmstack serve --model DIR` serves: weights, config, tokenizer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, out_dir / name)


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
        log_ratio = (logp - ref_logp) * rollout.reply_mask
        kls += log_ratio.sum(1).tolist()
        k3s += (((-log_ratio).exp() - 1 + log_ratio) * rollout.reply_mask).sum(1).tolist()
        lengths += rollout.reply_mask.sum(1).tolist()
        scores += reward.score([it.messages for it in batch], rollout.texts)
    n = len(scores)
    return {
        "prompts": n,
        "reward_mean": round(sum(scores) / n, 4),
        "reward_std": round(statistics_std(scores), 4),
        "kl_mean": round(sum(kls) / n, 4),
        # k3 = (r - 1) - log r with r = pi_ref / pi: unbiased like the plain log-ratio but
        # never negative, so a few samples cannot report a KL below zero.
        "kl_k3_mean": round(sum(k3s) / n, 4),
        "length_mean": round(sum(lengths) / n, 2),
    }


def statistics_std(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    mean = sum(xs) / len(xs)
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


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
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    model, value_head, optimizer = accelerator.prepare(model, value_head, optimizer)
    reference.to(accelerator.device)
    reward.model.to(accelerator.device)
    runner = PolicyRunner(tokenizer, config, accelerator.device)
    autocast = accelerator.autocast
    unwrapped = accelerator.unwrap_model(model)
    held = (eval_prompts or [])[: config.eval_limit]

    timings: dict[str, float] = {}
    started = time.monotonic()
    report: dict = {"config": asdict(config), "policy": str(base), "reward": str(reward_dir)}
    if held:
        t0 = time.monotonic()
        report["heldout_before"] = heldout_report(
            runner, unwrapped, reference, reward, held, 10_000, autocast, config.batch_size
        )
        timings["heldout_eval_s"] = round(time.monotonic() - t0, 1)
        log(f"held-out before: {report['heldout_before']}")

    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "ppo_log.jsonl"
    log_path.write_text("")
    history: list[dict] = []
    beta = config.init_beta
    rng = random.Random(config.seed)
    order: list[PromptItem] = []
    stopped = None
    snapshot: dict | None = None  # trainable weights before the latest update
    for step in range(1, config.steps + 1):
        t_step = time.monotonic()
        if len(order) < config.batch_size:
            order += rng.sample(prompts, len(prompts))
        batch, order = order[: config.batch_size], order[config.batch_size :]

        unwrapped.eval()
        rollout = runner.sample(unwrapped, batch, config.seed * 100_000 + step, autocast)
        t_gen = time.monotonic() - t_step
        with torch.no_grad(), autocast():
            old_logp, _, old_values = runner.forward(model, rollout, value_head=value_head)
            ref_logp, _, _ = runner.forward(reference, rollout)
        scores = torch.tensor(
            reward.score([it.messages for it in batch], rollout.texts),
            device=accelerator.device,
        )
        mask = rollout.reply_mask
        lengths = mask.sum(1)
        penalised = scores - config.length_penalty * lengths
        kl_tokens = (old_logp - ref_logp) * mask
        kl = kl_tokens.sum(1).mean().item()
        kl_k3 = (((-kl_tokens).exp() - 1 + kl_tokens) * mask).sum(1).mean().item()
        if kl > config.kl_stop and snapshot is not None:
            stopped = f"mean KL {kl:.2f} > --kl-stop {config.kl_stop} at step {step}"
            log(f"hard KL stop: {stopped}; restoring the policy from before the last update")
            unwrapped.load_state_dict(snapshot, strict=False)
            break
        rewards = -beta * kl_tokens
        last = (lengths - 1).clamp(min=0).long()
        rewards[torch.arange(len(batch)), last] += penalised
        advantages, returns = gae(rewards, old_values, mask, config.gamma, config.lam)
        advantages = whiten(advantages, mask)

        snapshot = {
            k: v.detach().clone()
            for k, v in unwrapped.state_dict().items()
            if k in {n for n, p in unwrapped.named_parameters() if p.requires_grad}
        }
        unwrapped.train()
        stats = {"pg_loss": [], "vf_loss": [], "clipfrac": [], "approx_kl": [], "entropy": []}
        for _ in range(config.ppo_epochs):
            perm = torch.randperm(len(batch))
            for start in range(0, len(batch), config.mini_batch_size):
                rows = perm[start : start + config.mini_batch_size]
                m = mask[rows]
                with autocast():
                    logp, entropy, values = runner.forward(model, rollout, rows, value_head)
                ratio = (logp - old_logp[rows]).exp()
                adv = advantages[rows]
                pg_loss = masked_mean(
                    torch.max(
                        -adv * ratio,
                        -adv * ratio.clamp(1 - config.cliprange, 1 + config.cliprange),
                    ),
                    m,
                )
                v_old = old_values[rows]
                v_clipped = v_old + (values - v_old).clamp(
                    -config.cliprange_value, config.cliprange_value
                )
                ret = returns[rows]
                vf_loss = 0.5 * masked_mean(
                    torch.max((values - ret) ** 2, (v_clipped - ret) ** 2), m
                )
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
                        masked_mean(0.5 * (logp - old_logp[rows]) ** 2, m).item()
                    )

        score_list = scores.tolist()
        length_list = lengths.tolist()
        corr = pearson(score_list, length_list)
        record = {
            "step": step,
            "reward_mean": round(sum(score_list) / len(score_list), 4),
            "reward_std": round(statistics_std(score_list), 4),
            "kl": round(kl, 4),
            "kl_k3": round(kl_k3, 4),
            "beta": round(beta, 5),
            "entropy": round(sum(stats["entropy"]) / len(stats["entropy"]), 4),
            "response_length": round(sum(length_list) / len(length_list), 2),
            "reward_length_corr": None if corr is None else round(corr, 4),
            **{k: round(sum(v) / len(v), 5) for k, v in stats.items() if k != "entropy"},
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
            beta = adapt_beta(beta, kl, config.kl_target)

    timings["train_s"] = round(time.monotonic() - started - timings.get("heldout_eval_s", 0), 1)
    unwrapped.eval()
    if held:
        t0 = time.monotonic()
        report["heldout_after"] = heldout_report(
            runner, unwrapped, reference, reward, held, 10_000, autocast, config.batch_size
        )
        timings["heldout_eval_s"] = round(timings["heldout_eval_s"] + time.monotonic() - t0, 1)
        log(f"held-out after: {report['heldout_after']}")
        report["heldout"] = {
            "reward_before": report["heldout_before"]["reward_mean"],
            "reward_after": report["heldout_after"]["reward_mean"],
            "kl_after": report["heldout_after"]["kl_mean"],
            "kl_k3_after": report["heldout_after"]["kl_k3_mean"],
            "kl_target": config.kl_target,
            "kl_under_target": max(
                report["heldout_after"]["kl_mean"], report["heldout_after"]["kl_k3_mean"]
            )
            < config.kl_target,
        }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_policy(unwrapped, base, out_dir)
        torch.save(accelerator.unwrap_model(value_head).state_dict(), out_dir / "value_head.pt")
        plot_curves(history, out_dir / "ppo_curves.png")
    report.update(
        steps_run=len(history),
        stopped=stopped,
        beta_trajectory=[h["beta"] for h in history] + [round(beta, 5)],
        final_beta=round(beta, 5),
        timings=timings,
        log=str(log_path),
        curves=str(out_dir / "ppo_curves.png"),
    )
    atomic_write(out_dir / "ppo_report.json", json.dumps(report, indent=2) + "\n")
    return report


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("reward_mean", "reward (mean)"),
        ("kl", "KL to SFT (nats/reply)"),
        ("beta", "beta"),
        ("entropy", "entropy (nats/token)"),
        ("response_length", "reply length (tokens)"),
        ("reward_length_corr", "reward-length correlation"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    steps = [h["step"] for h in history]
    for ax, (key, title) in zip(axes.flat, panels):
        ys = [h.get(key) for h in history]
        ax.plot(steps, [float("nan") if y is None else y for y in ys], marker="o", ms=3)
        if key == "reward_mean":
            std = [h["reward_std"] for h in history]
            ax.fill_between(
                steps, [y - s for y, s in zip(ys, std)], [y + s for y, s in zip(ys, std)], alpha=0.2
            )
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
