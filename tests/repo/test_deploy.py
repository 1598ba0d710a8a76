"""The monitoring kit: alert rules pass promtool's checks and unit tests, and the rules and
dashboard only use metrics that `lmstack serve` exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
from helpers import REPO

DEPLOY = REPO / "deploy"
EXPORTED = {
    "time_to_first_token_seconds",
    "inter_token_latency_seconds",
    "e2e_request_latency_seconds",
    "request_queue_time_seconds",
    "num_requests_running",
    "num_requests_waiting",
    "kv_cache_usage_perc",
    "memory_limit_bytes",
    "prompt_tokens_total",
    "generation_tokens_total",
    "request_success_total",
    "requests_rejected_total",
    "request_timeouts_total",
    "preemptions_total",
    "prefix_cache_queries_total",
    "prefix_cache_hits_total",
    "embedding_requests_total",
    "embedding_inputs_total",
    "embedding_prompt_tokens_total",
    "embedding_batches_total",
    "embedding_batch_inputs",
    "embedding_request_latency_seconds",
}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return path


def used_metrics(text: str) -> set[str]:
    names = set(re.findall(r"lmstack:([a-z0-9_]+)", text))
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def test_alert_rules_pass_promtool_check():
    result = subprocess.run(
        [promtool(), "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


def test_alert_rules_fire_exactly_when_targets_are_broken():
    result = subprocess.run(
        [promtool(), "test", "rules", "alerts_test.yml"],
        capture_output=True,
        text=True,
        cwd=DEPLOY / "prometheus",
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_and_dashboard_use_exported_metrics_only():
    rules = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    dashboard = json.loads((DEPLOY / "grafana" / "lmstack-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    assert used_metrics(rules) <= EXPORTED
    assert used_metrics(exprs) <= EXPORTED
    assert len(dashboard["panels"]) >= 8 and dashboard["uid"] == "lmstack-serving"


def test_dashboard_selects_series_by_model_name_as_vllm_labels_them():
    # Every lmstack series carries model_name; the generation panels filter on the chosen
    # models, the embedding panels (the embedding model has its own name) group by it.
    dashboard = json.loads((DEPLOY / "grafana" / "lmstack-dashboard.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert "model_name" in variables["model_name"]["query"]
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            if "lmstack:embedding_" in expr:
                assert "by (model_name)" in expr or "by (le, model_name)" in expr, expr
            else:
                selectors = re.findall(r"lmstack:[a-z0-9_]+\{([^}]*)\}", expr)
                assert selectors and all('model_name=~"$model_name"' in s for s in selectors), expr
