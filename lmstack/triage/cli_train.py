"""`lmstack triage train` (LoRA SFT -> data/adapter) and `lmstack triage train-classifier`
(category head -> data/classifier.*): both on the train side of the split only."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lmstack.errors import InputError
from lmstack.triage.cli_common import progress_bar, triage_app


@triage_app.command("train")
def train_command(
    out: Path = typer.Option(
        Path(__file__).parent / "data" / "adapter", "--out", help="Adapter directory"
    ),
    train_size: int = typer.Option(320, "--train-size", help="Bitext training tickets"),
    epochs: int = typer.Option(1, "--epochs"),
    lr: float = typer.Option(8e-4, "--lr"),
    rank: int = typer.Option(16, "--rank"),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(
        None, "--threads", help="torch threads (1 is fastest on a CPU shared with other work)"
    ),
) -> None:
    """LoRA SFT on the training split (fixed seed and split); writes the adapter."""
    from lmstack.triage.train import TrainConfig, train

    for name, value in (("--train-size", train_size), ("--epochs", epochs), ("--rank", rank)):
        if value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    if lr <= 0:
        raise InputError(f"--lr must be > 0, got {lr}")
    config = TrainConfig(
        train_size=train_size,
        epochs=epochs,
        lr=lr,
        rank=rank,
        alpha=2 * rank,
        seed=seed,
        threads=threads,
    )
    with progress_bar("train") as bar:
        task = bar.add_task("train", total=None)

        def progress(step: int, steps: int, loss: float) -> None:
            bar.update(task, completed=step, total=steps, description=f"loss {loss:.3f}")

        record = train(out, config, progress)
    typer.echo(json.dumps(record, indent=2))


@triage_app.command("train-classifier")
def train_classifier_command(
    out: Path = typer.Option(
        Path(__file__).parent / "data", "--out", help="Directory for classifier.json + .safetensors"
    ),
    l2: float = typer.Option(1e-4, "--l2", help="L2 penalty on the head's weights"),
    steps: int = typer.Option(1500, "--steps", help="Full-batch gradient steps"),
    lr: float = typer.Option(2.0, "--lr"),
    class_weighting: bool = typer.Option(
        True, "--class-weighting/--no-class-weighting", help="Each class counts the same"
    ),
    threads: int | None = typer.Option(None, "--threads", help="torch threads for embedding"),
) -> None:
    """Category head on MiniLM embeddings of the training split; writes the classifier."""
    from lmstack.triage.classifier import ClassifierConfig, train_classifier

    if steps < 1:
        raise InputError(f"--steps must be >= 1, got {steps}")
    if lr <= 0 or l2 < 0:
        raise InputError(f"--lr must be > 0 and --l2 >= 0, got {lr} and {l2}")
    if threads:
        import torch

        torch.set_num_threads(threads)
    config = ClassifierConfig(l2=l2, lr=lr, steps=steps, class_weighting=class_weighting)
    with progress_bar("embed") as bar:
        task = bar.add_task("embed", total=None)
        record = train_classifier(out, config, lambda n: bar.advance(task, n))
    typer.echo(json.dumps(record, indent=2))
