"""`lmstack bench serve` and `bench ladder` against real servers at tiny sizes."""

from __future__ import annotations

import asyncio
import json

import pytest
from helpers import live_server

from lmstack.bench.ladder import RUNGS, agreement, first_token_agreement, run_ladder, to_markdown
from lmstack.bench.loadgen import (
    ChatOptions,
    RequestResult,
    arrival_gaps,
    load_tools,
    run_load,
    tool_choice_option,
)
from lmstack.bench.serve import random_dataset, summarize
from lmstack.cli import main
from lmstack.errors import InputError


@pytest.fixture(scope="module")
def server_url(model):
    from lmstack.engine.async_engine import AsyncLLMEngine
    from lmstack.server.app import create_app

    engine = AsyncLLMEngine(num_kv_tokens=4096, max_waiting=4)
    with live_server(create_app(engine, "smollm2-135m-instruct")) as url:
        yield url
    engine.shutdown()


def test_arrivals_have_the_requested_rate_and_burstiness():
    poisson = arrival_gaps(4000, rate=10, burstiness=1.0, seed=1)
    bursty = arrival_gaps(4000, rate=10, burstiness=0.2, seed=1)
    assert abs(sum(poisson) / 4000 - 0.1) < 0.01 and abs(sum(bursty) / 4000 - 0.1) < 0.015
    spread = lambda xs: sum((x - 0.1) ** 2 for x in xs) / len(xs)  # noqa: E731
    assert spread(bursty) > 3 * spread(poisson)
    with pytest.raises(InputError, match="request-rate"):
        arrival_gaps(1, 0, 1.0, 0)


def test_summary_statistics_and_goodput():
    results = [
        RequestResult(ok=True, start=0, ttft=t, e2e=t + 1.0, output_tokens=11, itl=[0.1] * 10)
        for t in (0.1, 0.2, 0.3, 0.4)
    ] + [RequestResult(ok=False, start=0, error="http_429")]
    s = summarize(results, wall=2.0, slo_ttft=0.25)
    assert s["completed"] == 4 and s["errors"] == {"http_429": 1}
    assert s["ttft_s"]["p50"] == pytest.approx(0.25) and s["tpot_s"]["mean"] == pytest.approx(0.1)
    assert s["output_tokens_per_s"] == pytest.approx(22.0)
    assert s["goodput"]["requests_per_s"] == pytest.approx(1.0)  # 2 of 5 meet TTFT <= 0.25
    assert s["goodput"]["fraction"] == pytest.approx(0.4)


VLLM_KEYS = {
    "duration",
    "completed",
    "failed",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "request_goodput",
    "output_throughput",
    "total_token_throughput",
} | {
    f"{stat}_{name}_ms"
    for stat in ("mean", "median", "std", "p50", "p90", "p99")
    for name in ("ttft", "tpot", "itl", "e2el")
}


def test_summary_has_vllm_bench_serve_keys():
    # The flat names `vllm bench serve --save-result` writes, in ms, beside lmstack's own.
    results = [
        RequestResult(
            ok=True, start=0, ttft=t, e2e=t + 1.0, output_tokens=11, prompt_tokens=5, itl=[0.1] * 10
        )
        for t in (0.1, 0.2, 0.3, 0.4)
    ] + [RequestResult(ok=False, start=0, error="http_429")]
    s = summarize(results, wall=2.0, slo_ttft=0.25)
    assert set(s) >= VLLM_KEYS
    assert s["duration"] == 2.0 and s["completed"] == 4 and s["failed"] == 1
    assert s["total_input_tokens"] == 20 and s["total_output_tokens"] == 44
    assert s["output_throughput"] == pytest.approx(22.0)
    assert s["total_token_throughput"] == pytest.approx(32.0)
    assert s["request_throughput"] == pytest.approx(2.0)
    assert s["request_goodput"] == pytest.approx(1.0)
    assert s["mean_ttft_ms"] == pytest.approx(250) and s["median_ttft_ms"] == pytest.approx(250)
    assert s["std_ttft_ms"] == pytest.approx(111.803, abs=1e-3)  # population, as numpy's
    assert s["p99_ttft_ms"] == pytest.approx(397, abs=1e-6)
    assert s["mean_tpot_ms"] == pytest.approx(100) and s["mean_itl_ms"] == pytest.approx(100)
    assert s["std_itl_ms"] == pytest.approx(0, abs=1e-9)
    assert s["mean_e2el_ms"] == pytest.approx(1250)
    # Without an SLO vLLM writes no goodput either.
    assert summarize(results, wall=2.0)["request_goodput"] is None


def test_closed_and_open_loop_against_a_live_server(server_url, model):
    _, tok = model
    specs = random_dataset(tok, 6, input_len=16, output_len=8, seed=0)
    results, wall = asyncio.run(run_load(server_url, specs, concurrency=3))
    s = summarize(results, wall)
    assert s["completed"] == 6 and not s["errors"]
    assert all(r.output_tokens == 8 and len(r.itl) == 7 for r in results)
    assert s["ttft_s"]["p99"] >= s["ttft_s"]["p50"] > 0
    # Open loop at a rate this server sustains; its small waiting queue (4, for the overflow
    # test below) may still refuse a burst, which must then show up as a 429, nothing else.
    results, wall = asyncio.run(run_load(server_url, specs, request_rate=5.0, burstiness=0.5))
    s = summarize(results, wall)
    assert s["completed"] >= 4 and set(s["errors"]) <= {"http_429"}
    assert s["completed"] + s["errors"].get("http_429", 0) == 6


def test_queue_overflow_is_counted_by_kind(server_url, model):
    _, tok = model
    specs = random_dataset(tok, 40, input_len=16, output_len=64, seed=1)
    results, wall = asyncio.run(run_load(server_url, specs, request_rate=1000.0))
    s = summarize(results, wall)
    # Every request is either served in full or refused up front with 429: none is accepted
    # and then dropped.
    assert set(s["errors"]) == {"http_429"}
    assert s["completed"] + s["errors"]["http_429"] == 40


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def test_chat_endpoint_counts_content_and_tool_call_tokens(server_url, model):
    _, tok = model
    specs = random_dataset(tok, 4, input_len=16, output_len=12, seed=2)
    plain, _ = asyncio.run(run_load(server_url, specs, endpoint="chat", concurrency=2))
    # ignore_eos: every chat request runs to max_tokens, as completions do.
    assert all(r.ok and r.output_tokens == 12 and r.ttft > 0 for r in plain)
    # The same workload with a tool in every request and a call required: the tokens come as
    # tool-call deltas (names and argument fragments), and each one is timed and counted.
    chat = ChatOptions([WEATHER], tool_choice_option("required"))
    calls, _ = asyncio.run(run_load(server_url, specs, endpoint="chat", concurrency=2, chat=chat))
    # (The parser holds a call back until its name is complete, so one delta may carry
    # several tokens: token_times has one entry per delta, output_tokens is usage's count.)
    assert all(r.ok and r.output_tokens == 12 and r.token_times for r in calls)
    assert all(len(r.token_times) == len(r.itl) + 1 for r in calls)
    with pytest.raises(InputError, match="--tools needs --endpoint chat"):
        asyncio.run(run_load(server_url, specs, chat=chat))


def test_tools_file_and_tool_choice_are_checked(tmp_path):
    good = tmp_path / "tools.json"
    good.write_text(json.dumps([WEATHER]))
    assert load_tools(good) == [WEATHER]
    for text in ("{", "[]", '[{"type": "function"}]', '{"function": {"name": "x"}}'):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(InputError, match="--tools .*bad.json"):
            load_tools(tmp_path / "bad.json")
    with pytest.raises(InputError, match="--tools .*missing.json"):
        load_tools(tmp_path / "missing.json")
    assert tool_choice_option("auto") == "auto" and tool_choice_option(None) is None
    assert tool_choice_option("get_weather")["function"]["name"] == "get_weather"
    with pytest.raises(InputError, match="--tool-choice .*'a b'"):
        tool_choice_option("a b")


@pytest.mark.slow
def test_bench_serve_cli_chat_with_tools(server_url, tmp_path, capsys):
    tools, out = tmp_path / "tools.json", tmp_path / "run.json"
    tools.write_text(json.dumps([WEATHER]))
    args = ["bench", "serve", "--url", server_url, "--num-prompts", "2", "--input-len", "16"]
    args += ["--output-len", "8", "--endpoint", "chat", "--tools", str(tools)]
    with pytest.raises(SystemExit) as exc:
        main(args + ["--tool-choice", "get_weather", "--json", str(out)])
    assert exc.value.code == 0
    summary = json.loads(out.read_text())
    assert summary["endpoint"] == "chat" and summary["tools"] == 1
    assert summary["completed"] == 2 and summary["total_output_tokens"] > 0
    # --tools with the completions endpoint is refused before anything is sent.
    with pytest.raises(SystemExit) as exc:
        main(["bench", "serve", "--url", server_url, "--tools", str(tools)])
    assert exc.value.code == 2
    assert "--endpoint chat" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_serve_cli_writes_json_and_plots(server_url, tmp_path, capsys):
    out, prefix = tmp_path / "run.json", tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "bench",
                "serve",
                "--url",
                server_url,
                "--num-prompts",
                "4",
                "--concurrency",
                "2",
                "--input-len",
                "16",
                "--output-len",
                "6",
                "--slo-ttft",
                "30",
                "--json",
                str(out),
                "--plot",
                str(prefix),
            ]
        )
    assert exc.value.code == 0
    summary = json.loads(out.read_text())
    assert summary["completed"] == 4 and summary["goodput"]["fraction"] == 1.0
    assert set(summary) >= VLLM_KEYS and summary["request_goodput"] > 0
    assert summary["total_output_tokens"] == 24 and summary["median_ttft_ms"] > 0
    assert summary["endpoint"] == "completions" and summary["max_concurrency"] == 2
    records = summary["per_request"]
    assert len(records) == 4 and all(r["ok"] and r["output_tokens"] > 0 for r in records)
    e2e = sorted(r["e2e_s"] for r in records)
    assert e2e[1] - 1e-4 <= summary["e2e_s"]["p50"] <= e2e[2] + 1e-4  # P50 of four lies between
    for name in ("run-latency-cdf.png", "run-throughput.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "TTFT" in capsys.readouterr().out


def test_agreement_counts_tokens_until_divergence():
    assert agreement([["a", "b", "c"], ["x"]], [["a", "b", "z"], ["x"]]) == pytest.approx(0.75)
    # First tokens: one position per prompt, a later divergence does not count.
    assert first_token_agreement([["a", "b"], ["x", "y"], ["p"]], [["a", "z"], ["q"], []]) == (
        pytest.approx(1 / 3)
    )


@pytest.mark.slow
def test_ladder_rows_run_real_servers(model):
    _, tok = model
    specs = random_dataset(tok, 2, input_len=16, output_len=6, seed=2)
    rows = run_ladder(specs, users=2, rungs=[RUNGS[0], RUNGS[3]], quality_tokens=8)
    assert [r["completed"] for r in rows] == [2, 2] and all(r["errors"] == 0 for r in rows)
    assert rows[0]["greedy_agreement_vs_row1"] == 1.0
    assert rows[1]["greedy_agreement_vs_row1"] > 0.5  # bf16 vs fp32 greedy
    assert rows[1]["first_token_agreement_vs_row1"] >= 0.75
    assert all(r["peak_rss_gb"] and r["peak_rss_gb"] < 4 for r in rows)
    assert to_markdown(rows).count("\n") == 4
