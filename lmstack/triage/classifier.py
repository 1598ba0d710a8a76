"""Category classifier: all-MiniLM-L6-v2 sentence embeddings + a softmax-regression head.

    clf = CategoryClassifier.load()                  # the shipped head in data/classifier.*
    probs = clf.predict_proba(["Subject: ...\\n..."])  # [n, 5] over CATEGORIES
    clf.plausible(probs[0], coverage=0.9)            # ("Billing", "Shipping"): the enum

The 135M model picks a category poorly (0.46 held-out accuracy, below the keyword
baseline's 0.86); a linear head on MiniLM vectors (the embedder docqa already ships) does it
well and costs one embedding per ticket. Triage uses it to narrow the JSON schema's
`category` enum to the classes that cover `coverage` of its probability: with coverage 0
(the default, see DEFAULT_COVERAGE) the head's top class is the only one left; above 0 the
language model chooses among the plausible classes when the head is unsure.

The head is trained here (`lmstack triage train-classifier`), in numpy, on the *train* side
of the split only: Bitext mapped to our categories plus our own training tickets. The loss
is class-weighted (each class counts as much as the others in total), because Technical
has 21 training tickets against a thousand Billing ones; L2 regularisation keeps the
probabilities soft enough for the coverage rule to mean something. Full-batch gradient
descent from zeros, so the same data gives the same head, bit for bit, on any machine.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lmstack.errors import InputError, ModelLoadError
from lmstack.triage.schema import CATEGORIES

SHIPPED_CLASSIFIER = Path(__file__).parent / "data"  # classifier.json + .safetensors
# Measured on the held-out split (`triage eval --limit 230`): with coverage 0.9, 49 of 230
# tickets left the model a choice and it chose right in 27, where the head's top class was
# right in 38 (category accuracy 0.904 against 0.952). So by default the head decides;
# --category-coverage hands the ambiguous cases to the model.
DEFAULT_COVERAGE = 0.0


@dataclass
class ClassifierConfig:
    # l2/2 * |W|^2 on top of the mean loss; 1e-4 had the best 5-fold accuracy on the train
    # side (0.995, against 0.991 at 1e-3 and 0.979 at 1e-2), and Technical 19/21 either way.
    l2: float = 1e-4
    lr: float = 2.0  # full-batch gradient descent on unit-length embeddings
    steps: int = 1500
    class_weighting: bool = True


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def fit_softmax(
    x: np.ndarray, y: np.ndarray, n_classes: int, config: ClassifierConfig
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """(W [classes, dim], b [classes], loss every 100 steps) minimising weighted
    cross-entropy + l2/2 * |W|^2 by full-batch gradient descent."""
    n, dim = x.shape
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    if config.class_weighting:
        # Each present class weighs n / classes in total; absent classes get no weight.
        per_class = np.where(counts > 0, n / (np.count_nonzero(counts) * np.maximum(counts, 1)), 0)
    else:
        per_class = np.ones(n_classes)
    sample_w = per_class[y] / per_class[y].sum()
    onehot = np.eye(n_classes)[y]
    w = np.zeros((n_classes, dim))
    b = np.zeros(n_classes)
    x64 = x.astype(np.float64)
    losses = []
    for step in range(config.steps):
        probs = softmax(x64 @ w.T + b)
        if step % 100 == 0 or step == config.steps - 1:
            nll = -(sample_w * np.log(probs[np.arange(n), y] + 1e-12)).sum()
            losses.append(round(float(nll + 0.5 * config.l2 * (w * w).sum()), 5))
        grad_logits = (probs - onehot) * sample_w[:, None]
        w -= config.lr * (grad_logits.T @ x64 + config.l2 * w)
        b -= config.lr * grad_logits.sum(axis=0)
    return w.astype(np.float32), b.astype(np.float32), losses


class CategoryClassifier:
    """A linear head over sentence embeddings; `classes` are a subset of CATEGORIES."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, classes: tuple[str, ...], info: dict):
        if weight.ndim != 2 or weight.shape[0] != len(classes) or bias.shape != (len(classes),):
            raise ModelLoadError(f"classifier head shape {weight.shape} does not fit {classes}")
        self.weight, self.bias, self.classes, self.info = weight, bias, classes, info
        self._embedder = None

    @property
    def embedder(self):
        if self._embedder is None:
            from lmstack.embed import Embedder

            self._embedder = Embedder.shared()
            if self._embedder.dimension != self.weight.shape[1]:
                raise ModelLoadError(
                    f"classifier expects {self.weight.shape[1]}-d embeddings, the embedder "
                    f"gives {self._embedder.dimension}"
                )
        return self._embedder

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """[len(texts), len(CATEGORIES)] probabilities, columns in CATEGORIES order."""
        if not texts:
            return np.zeros((0, len(CATEGORIES)), dtype=np.float32)
        probs = softmax(self.embedder.embed(texts) @ self.weight.T + self.bias)
        full = np.zeros((len(texts), len(CATEGORIES)), dtype=np.float32)
        for j, name in enumerate(self.classes):
            full[:, CATEGORIES.index(name)] = probs[:, j]
        return full

    def predict(self, texts: list[str]) -> list[str]:
        return [CATEGORIES[i] for i in self.predict_proba(texts).argmax(axis=1)]

    @staticmethod
    def plausible(probs: np.ndarray, coverage: float = DEFAULT_COVERAGE) -> tuple[str, ...]:
        """The most probable categories, best first, until they hold `coverage` of the
        probability (always at least one; coverage 0 is the top class alone)."""
        if not 0.0 <= coverage <= 1.0:
            raise InputError(f"category coverage must be in [0, 1], got {coverage}")
        order = np.argsort(-probs, kind="stable")
        chosen, total = [], 0.0
        for i in order:
            chosen.append(CATEGORIES[i])
            total += float(probs[i])
            if total >= coverage - 1e-6:
                break
        return tuple(chosen)

    # ------------------------------------------------------------------ files

    def save(self, out_dir: Path) -> None:
        from safetensors.numpy import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(
            {"weight": self.weight.astype(np.float32), "bias": self.bias.astype(np.float32)},
            str(out_dir / "classifier.safetensors"),
        )
        info = {**self.info, "classes": list(self.classes)}
        (out_dir / "classifier.json").write_text(json.dumps(info, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path = SHIPPED_CLASSIFIER) -> CategoryClassifier:
        from safetensors.numpy import load_file

        directory = Path(directory)
        manifest, head = directory / "classifier.json", directory / "classifier.safetensors"
        if not manifest.is_file() or not head.is_file():
            raise ModelLoadError(
                f"{directory}: no category classifier (classifier.json + classifier.safetensors); "
                "run `lmstack triage train-classifier`"
            )
        info = json.loads(manifest.read_text())
        tensors = load_file(str(head))
        classes = tuple(info["classes"])
        unknown = [c for c in classes if c not in CATEGORIES]
        if unknown:
            raise ModelLoadError(f"{manifest}: classes {unknown} are not in {CATEGORIES}")
        return cls(tensors["weight"], tensors["bias"], classes, info)


def shipped_classifier() -> CategoryClassifier | None:
    """The committed head, or None when the package ships none."""
    if not (SHIPPED_CLASSIFIER / "classifier.json").is_file():
        return None
    return CategoryClassifier.load(SHIPPED_CLASSIFIER)


def train_classifier(out_dir: Path, config: ClassifierConfig | None = None, progress=None) -> dict:
    """Embed the train side of the split, fit the head, write it to `out_dir`."""
    from lmstack.embed import Embedder
    from lmstack.triage.dataset import load_labelled

    config = config or ClassifierConfig()
    if config.steps < 1 or config.lr <= 0 or config.l2 < 0:
        raise InputError(f"classifier config out of range: {config}")
    started = time.monotonic()
    tickets = load_labelled("train")
    classes = tuple(c for c in CATEGORIES if any(t.category == c for t in tickets))
    embedder = Embedder.shared()
    x = embedder.embed([t.text for t in tickets], progress=progress)
    y = np.array([classes.index(t.category) for t in tickets])
    embed_s = time.monotonic() - started
    weight, bias, losses = fit_softmax(x, y, len(classes), config)
    train_pred = (x @ weight.T + bias).argmax(axis=1)
    info = {
        "embedder": embedder.name,
        "dimension": int(x.shape[1]),
        "config": asdict(config),
        "train_tickets": len(tickets),
        "train_per_class": {c: int((y == i).sum()) for i, c in enumerate(classes)},
        "train_accuracy": round(float((train_pred == y).mean()), 4),
        "loss_every_100_steps": losses,
        "embed_s": round(embed_s, 1),
        "train_s": round(time.monotonic() - started, 1),
    }
    classifier = CategoryClassifier(weight, bias, classes, info)
    classifier.save(out_dir)
    return classifier.info | {"classes": list(classes), "out": str(out_dir)}
