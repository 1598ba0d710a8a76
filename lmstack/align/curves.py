"""PPO training curves as one PNG: reward, KL, beta, entropy, reply length and the
reward-length correlation, whose climb is the usual sign of length hacking."""

from __future__ import annotations

from pathlib import Path

PANELS = [
    ("reward_mean", "reward (mean)"),
    ("kl", "KL to SFT (nats/reply)"),
    ("beta", "beta"),
    ("entropy", "entropy (nats/token)"),
    ("response_length", "reply length (tokens)"),
    ("reward_length_corr", "reward-length correlation"),
]


def plot_curves(history: list[dict], path: Path, kl_target: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    steps = [h["step"] for h in history]
    for ax, (key, title) in zip(axes.flat, PANELS):
        ys = [h.get(key) for h in history]
        ax.plot(steps, [float("nan") if y is None else y for y in ys], marker="o", ms=3)
        if key == "reward_mean":
            std = [h["reward_std"] for h in history]
            ax.fill_between(
                steps, [y - s for y, s in zip(ys, std)], [y + s for y, s in zip(ys, std)], alpha=0.2
            )
        if key == "kl" and kl_target is not None:
            ax.axhline(kl_target, color="red", ls="--", lw=1, label="target")
            ax.legend(loc="upper left")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
