"""The apps' remote path (`--llm-url`) against an engine that is not lmstack: llama.cpp's
llama-server on the bundled GGUF, started once for this module, driven through the real CLI.

The binary: env LMSTACK_LLAMA_SERVER, else the cache of deploy/llama-cpp/build.sh. Without
one the module skips, unless LMSTACK_REQUIRE_LLAMA_SERVER=1 (CI builds it and sets both),
where a missing binary fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers import free_port, run_cli, stop_process, wait_for

pytestmark = pytest.mark.slow

CACHED = Path.home() / ".cache/lmstack/llama-cpp/src/llama.cpp/build/bin/llama-server"
ALIAS = "smollm2-135m-instruct"
SLOTS = 4
SLOT_CONTEXT = 4096  # below the model's 8,192: lmstack must take the server's, not assume

DOCS = {
    "refunds.md": "# Refund policy\n\nCustomers may request a refund within 30 days of "
    "purchase. Refunds are paid back to the original card within 5 business days. Gift "
    "cards cannot be refunded.\n",
    "shipping.md": "# Shipping\n\nStandard shipping takes 3 to 7 business days. Express "
    "shipping arrives the next business day when the order is placed before noon.\n",
}
TICKET_SUBJECT = "Can't access my account after payment"
TICKET_BODY = (
    "Hi, I paid for the premium subscription yesterday (Order #ORD-2024-8891) but I still "
    "can't access premium features. My username is john.doe@email.com and customer ID is "
    "CUS-445566. I need this fixed ASAP as I have a deadline tomorrow."
)


def llama_server_binary() -> Path:
    given = os.environ.get("LMSTACK_LLAMA_SERVER")
    path = Path(given) if given else CACHED
    if path.is_file() and os.access(path, os.X_OK):
        return path
    why = (
        f"no llama-server executable at {path} "
        f"({'LMSTACK_LLAMA_SERVER' if given else 'the build cache; set LMSTACK_LLAMA_SERVER'}); "
        "deploy/llama-cpp/build.sh builds it"
    )
    if os.environ.get("LMSTACK_REQUIRE_LLAMA_SERVER") == "1":
        pytest.fail(f"{why}, and LMSTACK_REQUIRE_LLAMA_SERVER=1 requires it")
    pytest.skip(why)


@pytest.fixture(scope="module")
def llama_url(tmp_path_factory):
    import httpx

    from lmstack.model.weights import bundled_gguf_path

    binary = llama_server_binary()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        str(binary), "-m", str(bundled_gguf_path()), "--host", "127.0.0.1", "--port", str(port),
        "-np", str(SLOTS), "-c", str(SLOTS * SLOT_CONTEXT), "-t", "2", "-tb", "2",
        "--alias", ALIAS, "--no-webui",
    ]  # fmt: skip
    log_path = tmp_path_factory.mktemp("llama-server") / "llama-server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

        def healthy() -> bool:
            assert proc.poll() is None, f"llama-server exited: {log_path.read_text()[-2000:]}"
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            return False

        try:
            assert wait_for(healthy, 120, 0.3), f"llama-server never healthy: {log_path}"
            yield url
        finally:
            stop_process(proc, timeout=15)


def test_the_generator_takes_llama_servers_model_and_slot_context(llama_url):
    from lmstack.llm import ChatRequest, OpenAIGenerator

    generator = OpenAIGenerator(llama_url)
    try:
        assert generator.model == ALIAS
        # llama-server reports n_ctx per slot under `meta`, not vLLM's max_model_len.
        assert generator.context_window == SLOT_CONTEXT
        done = generator.complete(
            ChatRequest([{"role": "user", "content": "Say hello."}], max_tokens=8)
        )
        assert done.error is None and done.text and 0 < done.completion_tokens <= 8
        assert done.prompt_tokens == generator.prompt_tokens(
            [{"role": "user", "content": "Say hello."}]
        )  # the bundled tokenizer counts what llama.cpp sees: budgets are exact
    finally:
        generator.close()


def test_ask_answers_with_citations(llama_url, tmp_path, capsys):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text)
    store = str(tmp_path / "docs.db")
    code, _, err = run_cli(["docs", "add", str(folder), "--store", store], capsys)
    assert code == 0, err
    # (Asked "how many days", the 135M model answers "3" uncited, in-process too.)
    question = "What is the refund policy?"
    args = ["ask", question, "--llm-url", llama_url, "--store", store, "--top-k", "2"]
    code, out, err = run_cli([*args, "--max-tokens", "48", "--json"], capsys)
    assert code == 0, err
    answer = json.loads(out)
    assert answer["answer"].strip() and not answer["abstained"] and answer["calls"] == 1
    cited = {c["doc_id"] for c in answer["citations"]}
    assert "refunds.md" in cited and cited <= set(DOCS), answer
    assert answer["budget"]["window"] == SLOT_CONTEXT  # the server's, not a default
    assert answer["budget"]["total"] <= SLOT_CONTEXT
    # Streamed (the CLI's default): the text arrives as deltas, then the sources.
    code, out, err = run_cli([*args, "--max-tokens", "32"], capsys)
    assert code == 0, err
    assert "Sources" in out and "error" not in err


def test_triage_gives_schema_valid_grounded_json(llama_url, capsys):
    import jsonschema

    from lmstack.triage.grounding import candidates, ungrounded
    from lmstack.triage.schema import CATEGORIES, Ticket, TriageOutput, output_schema

    code, out, err = run_cli(
        ["triage", "--llm-url", llama_url, "--max-retries", "0"]
        + ["--subject", TICKET_SUBJECT, "--body", TICKET_BODY],
        capsys,
    )
    assert code == 0, err
    record = json.loads(out)
    assert record["attempts"] == 1
    assert not any("generation failed" in e or "was cut" in e for e in record["errors"]), record
    output = TriageOutput.model_validate(record)  # every field present, enums valid
    text = Ticket(subject=TICKET_SUBJECT, body=TICKET_BODY).text
    # llama.cpp decoded under the JSON schema lmstack sent (response_format): the answer
    # satisfies it, patterns included (the widest category list the classifier allows).
    fields = {k: record[k] for k in output_schema()["required"]}
    jsonschema.validate(fields, output_schema(candidates(text), categories=CATEGORIES))
    assert not ungrounded(output.entities.model_dump(), text)  # no invented entities
    assert output.entities.order_number == "ORD-2024-8891"
    assert output.entities.customer_id == "CUS-445566"


def test_align_collect_plan_and_rate_ai(llama_url, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "prompt": text}) + "\n"
            for i, text in enumerate(
                [
                    "I was charged twice for my subscription. Can you help?",
                    "How do I reset my password?",
                    "The app crashes when I open settings.",
                    "Can I switch to yearly billing?",
                ]
            )
        )
    )
    plan_dir = tmp_path / "plan"
    code, out, err = run_cli(
        ["align", "collect", "plan", "--prompts", str(prompts), "--out", str(plan_dir)]
        + ["--max-tokens", "12", "--llm-url", llama_url, "--json"],
        capsys,
    )
    assert code == 0, err
    planned = json.loads(out)
    assert planned["comparisons"]["main"] >= 3
    principles = tmp_path / "principles.txt"
    principles.write_text("- prefer concise over verbose\n- answer the question asked\n")
    code, out, err = run_cli(
        ["align", "collect", "rate-ai", "--db", str(plan_dir / "ratings.db")]
        + ["--principles", str(principles), "--llm-url", llama_url, "--limit", "2", "--json"],
        capsys,
    )
    assert code == 0, err
    rated = json.loads(out)
    # Both orders of each comparison parsed as a verdict: none failed.
    assert rated["rated"] == 2 and rated["failed"] == 0, rated
    assert rated["rater"] == f"ai:{ALIAS}" and sum(rated["choices"].values()) == 2
    from lmstack.align.ratings import CHOICES, RatingStore

    store = RatingStore(plan_dir / "ratings.db")
    stored = store.ratings_of(rated["rater"])  # the verdicts are in the store, as a rater's
    store.close()
    assert len(stored) == 2 and set(stored.values()) <= set(CHOICES)


VLLM_FLAT_KEYS = {
    "duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
    "request_throughput", "output_throughput", "total_token_throughput",
    "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
    "p99_tpot_ms", "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "mean_e2el_ms",
    "median_e2el_ms", "p99_e2el_ms", "request_goodput",
}  # fmt: skip


def test_bench_serve_closed_loop(llama_url, tmp_path, capsys):
    result = tmp_path / "bench.json"
    code, out, err = run_cli(
        ["bench", "serve", "--url", llama_url, "--num-prompts", "6", "--concurrency", "3"]
        + ["--input-len", "32", "--output-len", "16", "--json", str(result)],
        capsys,
    )
    assert code == 0, err
    assert "completed 6/6, errors 0" in " ".join(out.split())
    summary = json.loads(result.read_text())
    assert set(summary) >= VLLM_FLAT_KEYS
    assert summary["completed"] == 6 and summary["failed"] == 0 and not summary["errors"]
    assert summary["max_concurrency"] == 3
    # ignore_eos is honoured: every request generated exactly --output-len tokens.
    assert summary["total_output_tokens"] == 6 * 16
    assert all(r["output_tokens"] == 16 for r in summary["per_request"])
    assert summary["request_throughput"] > 0 and summary["mean_ttft_ms"] > 0
    assert summary["p99_e2el_ms"] >= summary["median_e2el_ms"] > 0


def test_bench_compare_runs_both_servers_and_names_the_build(tmp_path, capsys):
    """`bench compare` end to end at a tiny size: lmstack serve, then llama-server, the same
    two workloads, a ratio for each, and which llama.cpp build it was."""
    from lmstack.bench.compare import llama_cpp_build

    binary = llama_server_binary()
    out = tmp_path / "compare.json"
    args = ["bench", "compare", "--llama-server", str(binary), "--users", "2"]
    args += ["--num-prompts", "2", "--single-prompts", "1", "--input-len", "16"]
    code, stdout, _ = run_cli(args + ["--output-len", "8", "--json", str(out)], capsys)
    assert code == 0
    result = json.loads(out.read_text())
    rows = {(r["server"], r["workload"]): r for r in result["rows"]}
    assert set(rows) == {
        (s, w) for s in ("lmstack", "llama.cpp") for w in ("single stream", "2 users")
    }
    assert all(r["errors"] == 0 and r["completed"] == r["requests"] for r in rows.values())
    assert set(result["output_tokens_per_s_ratio"]) == {"single stream", "2 users"}
    assert result["llama_cpp_build"] == llama_cpp_build(binary)
    assert result["meta"]["cpu"] and "lmstack / llama.cpp" in stdout
    assert llama_cpp_build(Path("/x/llama-cpp-avx2/src/llama.cpp/build/bin/llama-server")) == "avx2"
    assert llama_cpp_build(Path("/x/llama-cpp/src/llama.cpp/build/bin/llama-server")) == "native"
