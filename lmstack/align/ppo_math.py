"""PPO's arithmetic, testable without a model: the adaptive KL coefficient, generalised
advantage estimates, masked means and whitening, and the statistics logged every step."""

from __future__ import annotations

import math


def adapt_beta(beta: float, kl: float, target: float, floor: float = 0.0) -> float:
    """x1.5 above 1.5 x target, /1.5 below target / 1.5, unchanged in between; never below
    `floor`. Without a floor a long run of quiet steps (the policy starts as the reference,
    so early KL is about 0) decays beta to nothing, and when the KL does climb the penalty
    needs many x1.5 steps to matter again: measured here, 0.05 -> 0.0001 in 13 steps."""
    if kl > 1.5 * target:
        beta = beta * 1.5
    elif kl < target / 1.5:
        beta = beta / 1.5
    return max(beta, floor)


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


def sample_std(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    mean = sum(xs) / len(xs)
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


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


def kl_estimates(logp, ref_logp, mask) -> tuple[list[float], list[float]]:
    """Per-reply KL to the reference: the summed log-ratio, and k3 = (r - 1) - log r with
    r = pi_ref / pi, unbiased like the log-ratio but never negative per token."""
    log_ratio = (logp - ref_logp) * mask
    k3 = ((-log_ratio).exp() - 1 + log_ratio) * mask
    return log_ratio.sum(1).tolist(), k3.sum(1).tolist()
