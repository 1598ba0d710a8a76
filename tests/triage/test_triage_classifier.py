"""The category classifier: the shipped head on real MiniLM embeddings, the coverage rule,
the numpy trainer, and the CLI options that switch it."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import run_cli

from lmstack.errors import InputError, ModelLoadError
from lmstack.triage.baseline import keyword_category
from lmstack.triage.classifier import (
    SHIPPED_CLASSIFIER,
    CategoryClassifier,
    ClassifierConfig,
    fit_softmax,
    shipped_classifier,
)
from lmstack.triage.dataset import heldout_sample, load_labelled
from lmstack.triage.evaluate import accuracy
from lmstack.triage.schema import CATEGORIES


@pytest.fixture(scope="module")
def classifier() -> CategoryClassifier:
    loaded = shipped_classifier()
    assert loaded is not None, "the category classifier should be shipped"
    return loaded


def test_shipped_head_is_small_and_trained_on_the_train_side_only(classifier):
    size = sum(p.stat().st_size for p in SHIPPED_CLASSIFIER.glob("classifier.*"))
    assert size < 20_000
    assert classifier.classes == CATEGORIES
    assert classifier.weight.shape == (5, 384)
    assert classifier.info["train_tickets"] == len(load_labelled("train"))
    assert sum(classifier.info["train_per_class"].values()) == classifier.info["train_tickets"]


def test_obvious_tickets(classifier):
    tickets = {
        "I was charged twice on my credit card for one purchase, please refund me": "Billing",
        "The app crashes with an error every time I open the settings screen": "Technical",
        "I forgot my password and cannot log in to my profile": "Account",
        "Where is my package? The tracking page shows no delivery date": "Shipping",
        "How do I unsubscribe from your newsletter?": "Other",
    }
    assert classifier.predict(list(tickets)) == list(tickets.values())


def test_beats_the_keyword_baseline_on_the_heldout_split(classifier):
    # The target, on the tickets `lmstack triage eval --limit 230` uses.
    tickets = heldout_sample(230)
    gold = [t.category for t in tickets]
    texts = [t.text for t in tickets]
    ours = accuracy(gold, classifier.predict(texts))
    keywords = accuracy(gold, [keyword_category(text) for text in texts])
    assert ours >= 0.8 and ours > keywords, (ours, keywords)


def test_probabilities_sum_to_one_in_categories_order(classifier):
    probs = classifier.predict_proba(["My invoice shows the wrong amount", "Hello"])
    assert probs.shape == (2, 5)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert CATEGORIES[int(probs[0].argmax())] == "Billing"
    assert classifier.predict_proba([]).shape == (0, 5)


def test_coverage_keeps_the_top_classes_until_they_hold_enough():
    probs = np.array([0.05, 0.6, 0.3, 0.04, 0.01])  # CATEGORIES order
    assert CategoryClassifier.plausible(probs, 0.0) == ("Technical",)
    assert CategoryClassifier.plausible(probs, 0.6) == ("Technical",)
    assert CategoryClassifier.plausible(probs, 0.9) == ("Technical", "Account")
    assert CategoryClassifier.plausible(probs, 0.95) == ("Technical", "Account", "Billing")
    assert len(CategoryClassifier.plausible(probs, 1.0)) == 5
    with pytest.raises(InputError, match=r"coverage must be in \[0, 1\], got 1.5"):
        CategoryClassifier.plausible(probs, 1.5)


def test_class_weighting_recalls_a_rare_class():
    rng = np.random.default_rng(0)
    centres = np.eye(3, 8) * 1.0
    y = np.array([0] * 300 + [1] * 300 + [2] * 6)
    x = centres[y] + rng.normal(0, 0.45, (len(y), 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rare = y == 2
    recall = {}
    for weighted in (False, True):
        config = ClassifierConfig(l2=1e-2, steps=400, class_weighting=weighted)
        w, b, losses = fit_softmax(x, y, 3, config)
        assert losses[-1] < losses[0]
        recall[weighted] = ((x[rare] @ w.T + b).argmax(axis=1) == 2).mean()
    assert recall[True] >= 0.8 and recall[True] > recall[False]
    again, _, _ = fit_softmax(x, y, 3, config)
    assert np.array_equal(again, w)  # same data, same head


def test_missing_or_broken_classifier_files(tmp_path):
    with pytest.raises(ModelLoadError, match="run `lmstack triage train-classifier`"):
        CategoryClassifier.load(tmp_path)
    (tmp_path / "classifier.json").write_text('{"classes": ["Billing", "Sales"]}')
    from safetensors.numpy import save_file

    save_file(
        {"weight": np.zeros((2, 384), np.float32), "bias": np.zeros(2, np.float32)},
        str(tmp_path / "classifier.safetensors"),
    )
    with pytest.raises(ModelLoadError, match=r"classes \['Sales'\] are not in"):
        CategoryClassifier.load(tmp_path)


def test_cli_rejects_bad_classifier_options_before_loading_a_model(capsys):
    code, _, err = run_cli(["triage", "eval", "--limit", "5", "--category-coverage", "1.5"], capsys)
    assert code == 2 and "--category-coverage must be in [0, 1], got 1.5" in err
    code, _, err = run_cli(["triage", "train-classifier", "--steps", "0"], capsys)
    assert code == 2 and "--steps must be >= 1, got 0" in err
