"""Load generator for any OpenAI-compatible server (lmstack serve, vLLM, llama.cpp).

Each request streams from /v1/completions and records, on the client's clock:
TTFT (request sent -> first token), ITL (gaps between tokens), TPOT ((e2e - TTFT) / (n - 1))
and end-to-end latency. With endpoint="chat" each prompt is one user message to
/v1/chat/completions, optionally with `tools` (and a `tool_choice`) in every request: the
streamed content and tool-call deltas both count as tokens, so the same workload with and
without tools shows what the tool grammar costs. With endpoint="embeddings" each request
posts its spec's `inputs` to /v1/embeddings instead and records end-to-end latency and the
prompt tokens of `usage`.
Arrivals are open-loop (Poisson, or gamma with a burstiness factor: the server cannot slow
the arrivals down, as real users do not wait for each other) or closed-loop (a fixed number
of users, each sending the next request when the last ends).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

from lmstack.errors import InputError

ENDPOINTS = ("completions", "chat", "embeddings")
TOOL_CHOICES = ("auto", "required", "none")


@dataclass
class RequestSpec:
    prompt: str
    max_tokens: int
    prompt_tokens: int | None = None
    inputs: list[str] | None = None  # /v1/embeddings: the texts of one request


def embedding_specs(specs: list[RequestSpec], batch: int) -> list[RequestSpec]:
    """Embedding requests of `batch` inputs each, from consecutive prompts of `specs`."""
    if batch < 1:
        raise InputError(f"--batch must be >= 1, got {batch}")
    groups = [specs[i : i + batch] for i in range(0, len(specs) - batch + 1, batch)]
    return [RequestSpec(g[0].prompt, 0, inputs=[s.prompt for s in g]) for g in groups]


@dataclass
class RequestResult:
    ok: bool
    start: float  # perf_counter seconds, relative to the run start
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None  # kind: http_429, http_400, timeout, connection, ...
    token_times: list[float] = field(default_factory=list)  # relative to run start

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def arrival_gaps(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Inter-arrival times: gamma(shape=burstiness, scale=1/(rate*burstiness)).

    burstiness 1 is a Poisson process; below 1 is burstier, above 1 more regular. The mean
    gap is 1/rate either way.
    """
    if rate <= 0:
        raise InputError(f"--request-rate must be > 0, got {rate}")
    if burstiness <= 0:
        raise InputError(f"--burstiness must be > 0, got {burstiness}")
    rng = random.Random(seed)
    return [rng.gammavariate(burstiness, 1.0 / (rate * burstiness)) for _ in range(n)]


@dataclass
class ChatOptions:
    """What endpoint="chat" adds to every request: OpenAI tool definitions and a choice."""

    tools: list[dict] | None = None
    tool_choice: str | dict | None = None


def tool_choice_option(value: str | None) -> str | dict | None:
    """`--tool-choice`: auto, required, none, or a function's name (a named choice)."""
    if value is None or value in TOOL_CHOICES:
        return value
    if not value.isidentifier():
        raise InputError(
            f"--tool-choice must be one of {', '.join(TOOL_CHOICES)} or a function name, "
            f"got {value!r}"
        )
    return {"type": "function", "function": {"name": value}}


def load_tools(path) -> list[dict]:
    """`--tools FILE`: a JSON list of OpenAI tool definitions ({"type": "function", ...})."""
    from pathlib import Path

    try:
        tools = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"--tools {path}: not a readable JSON file ({exc})") from exc
    if (
        not isinstance(tools, list)
        or not tools
        or not all(
            isinstance(t, dict)
            and isinstance(t.get("function"), dict)
            and t["function"].get("name")
            for t in tools
        )
    ):
        raise InputError(
            f"--tools {path}: expected a non-empty JSON list of "
            '{"type": "function", "function": {"name": ...}} objects'
        )
    return tools


def _request_body(endpoint: str, model: str, spec: RequestSpec, chat: ChatOptions | None) -> dict:
    body = {
        "model": model,
        "max_tokens": spec.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    if endpoint == "completions":
        return body | {"prompt": spec.prompt}
    body["messages"] = [{"role": "user", "content": spec.prompt}]
    if chat is not None and chat.tools:
        body["tools"] = chat.tools
        if chat.tool_choice is not None:
            body["tool_choice"] = chat.tool_choice
    return body


def _streamed_text(choice: dict) -> str:
    """The text a streamed choice carries: completions' `text`, or a chat delta's content and
    tool-call name/argument fragments."""
    if "text" in choice:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    parts = [delta.get("content") or ""]
    for call in delta.get("tool_calls") or []:
        function = call.get("function") or {}
        parts += [function.get("name") or "", function.get("arguments") or ""]
    return "".join(parts)


async def _one_request(
    client,
    url: str,
    model: str,
    spec: RequestSpec,
    run_start: float,
    headers: dict,
    timeout: float,
    endpoint: str = "completions",
    chat: ChatOptions | None = None,
) -> RequestResult:
    import httpx

    body = _request_body(endpoint, model, spec, chat)
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    start = time.perf_counter()
    result = RequestResult(ok=False, start=start - run_start)
    last = start
    try:
        async with client.stream(
            "POST", f"{url}{path}", json=body, headers=headers, timeout=timeout
        ) as response:
            if response.status_code != 200:
                await response.aread()
                result.error = f"http_{response.status_code}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[6:].strip()
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                if chunk.get("error"):
                    result.error = "stream_error"
                    return result
                usage = chunk.get("usage")
                if usage:
                    result.prompt_tokens = usage.get("prompt_tokens", 0)
                    result.output_tokens = usage.get("completion_tokens", result.output_tokens)
                choices = chunk.get("choices") or []
                if choices and _streamed_text(choices[0]):
                    now = time.perf_counter()
                    if result.ttft is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    result.token_times.append(now - run_start)
                    last = now
                    if not usage:
                        result.output_tokens += 1
                if choices and choices[0].get("finish_reason") == "timeout":
                    result.error = "timeout"
        result.e2e = time.perf_counter() - start
        result.ok = result.error is None and result.ttft is not None
        if result.ttft is None and result.error is None:
            result.error = "no_tokens"
    except httpx.TimeoutException:
        result.error = "client_timeout"
    except httpx.HTTPError as exc:
        result.error = f"connection:{type(exc).__name__}"
    return result


async def _embedding_request(
    client,
    url: str,
    model: str | None,
    spec: RequestSpec,
    run_start: float,
    headers: dict,
    timeout: float,
) -> RequestResult:
    import httpx

    body = {"input": spec.inputs if spec.inputs is not None else [spec.prompt]}
    if model is not None:  # else the server's embedding model
        body["model"] = model
    start = time.perf_counter()
    result = RequestResult(ok=False, start=start - run_start)
    try:
        response = await client.post(
            f"{url}/v1/embeddings", json=body, headers=headers, timeout=timeout
        )
        if response.status_code != 200:
            result.error = f"http_{response.status_code}"
            return result
        reply = response.json()
        result.e2e = time.perf_counter() - start
        result.prompt_tokens = (reply.get("usage") or {}).get("prompt_tokens", 0)
        result.ok = len(reply.get("data") or []) == len(body["input"])
        result.error = None if result.ok else "wrong_count"
    except httpx.TimeoutException:
        result.error = "client_timeout"
    except httpx.HTTPError as exc:
        result.error = f"connection:{type(exc).__name__}"
    return result


async def run_load(
    url: str,
    specs: list[RequestSpec],
    *,
    endpoint: str = "completions",
    model: str | None = None,
    concurrency: int | None = None,
    request_rate: float | None = None,
    burstiness: float = 1.0,
    seed: int = 0,
    api_key: str | None = None,
    timeout: float = 600.0,
    chat: ChatOptions | None = None,
) -> tuple[list[RequestResult], float]:
    """Send every spec; return per-request results (in spec order) and the wall time."""
    import httpx

    if endpoint not in ENDPOINTS:
        raise InputError(f"--endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max(concurrency or 0, 256))
    if chat is not None and chat.tools and endpoint != "chat":
        raise InputError(f"--tools needs --endpoint chat, got --endpoint {endpoint}")
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        if model is None and endpoint != "embeddings":
            models = (await client.get(f"{url}/v1/models", headers=headers)).json()
            model = models["data"][0]["id"]
        results: list[RequestResult | None] = [None] * len(specs)
        run_start = time.perf_counter()

        async def fire(i: int) -> None:
            if endpoint == "embeddings":
                results[i] = await _embedding_request(
                    client, url, model, specs[i], run_start, headers, timeout
                )
            else:
                results[i] = await _one_request(
                    client, url, model, specs[i], run_start, headers, timeout, endpoint, chat
                )

        if request_rate is not None:  # open loop
            tasks = []
            for i, gap in enumerate(arrival_gaps(len(specs), request_rate, burstiness, seed)):
                tasks.append(asyncio.create_task(fire(i)))
                await asyncio.sleep(gap)
            await asyncio.gather(*tasks)
        else:  # closed loop: `concurrency` users
            users = concurrency or 1
            if users < 1:
                raise InputError(f"--concurrency must be >= 1, got {users}")
            queue = list(range(len(specs)))[::-1]

            async def user() -> None:
                while queue:
                    await fire(queue.pop())

            await asyncio.gather(*(user() for _ in range(users)))
        wall = time.perf_counter() - run_start
    return [r for r in results if r is not None], wall
