"""The one way apps (docqa, triage, align) talk to a model: in-process engine or any URL.

`make_generator(llm_url=None)` gives an `EngineGenerator` (the bundled model, or `--model
DIR`, in this process, with continuous batching across concurrent calls) or, with a URL,
an `OpenAIGenerator` for any OpenAI-compatible server (`lmstack serve`, vLLM, llama.cpp).
Both take the same `ChatRequest` and return the same `Completion`:

    gen = make_generator()
    gen.complete(ChatRequest(messages=[{"role": "user", "content": "Hi"}], max_tokens=32))
    gen.complete_many([...])          # all in flight together; results in input order
    for delta in gen.stream(request): # text as it is generated
        ...

Apps never import `lmstack.engine` or `lmstack.server`; they only see this module.
Token counting (for budgets) uses the serving model's tokenizer in-process; against a URL it
uses the bundled tokenizer unless `tokenizer_model` names the server's model directory, so
budgets against a different remote model are estimates and say so (`exact_tokens`).
In-process, prompts reach the engine as ids from `Tokenizer.encode_chat`: message contents
are plain text there, so no document or ticket can spell a control token into a prompt.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from lmstack.errors import InputError, LmstackError

DEFAULT_REMOTE_WINDOW = 8192


@dataclass
class ChatRequest:
    messages: list[dict]
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    frequency_penalty: float = 0.0  # OpenAI's: counts only output tokens, not the prompt's
    seed: int | None = None
    stop: list[str] | None = None
    json_schema: dict | None = None  # constrain the reply to this schema (always parses)
    priority: int = 0
    timeout: float | None = None


@dataclass
class Completion:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    latency_s: float = 0.0
    ttft_s: float | None = None
    error: str | None = None  # set when the request failed; text is then ""
    extra: dict = field(default_factory=dict)


class Generator(Protocol):
    name: str
    context_window: int
    exact_tokens: bool

    def count_tokens(self, text: str) -> int: ...

    def prompt_tokens(self, messages: list[dict]) -> int: ...

    def complete(self, request: ChatRequest) -> Completion: ...

    def complete_many(
        self, requests: list[ChatRequest], on_done: Callable[[int, Completion], None] | None = None
    ) -> list[Completion]: ...

    def stream(self, request: ChatRequest) -> Iterator[str]: ...


def chat_markup(generator: Generator, text: str) -> list[str]:
    """Chat-structure spellings in untrusted `text` (the model's added tokens, <|role|> tags).
    The in-process engine encodes them as plain text; callers report them as warnings."""
    from lmstack.model.tokenizer import markup_in

    return markup_in(text, getattr(getattr(generator, "tokenizer", None), "control_strings", ()))


def make_generator(
    llm_url: str | None = None,
    model: str | None = None,
    dtype: str | None = None,
    api_key: str | None = None,
    concurrency: int = 16,
    **engine_options,
) -> Generator:
    """A generator for `llm_url` when given, else the in-process engine on `model`."""
    if llm_url:
        return OpenAIGenerator(llm_url, model=model, api_key=api_key, concurrency=concurrency)
    return EngineGenerator.create(model=model, dtype=dtype, **engine_options)


# --------------------------------------------------------------------------- in-process


class EngineGenerator:
    """The in-process engine behind a synchronous, thread-safe API.

    Requests go to an AsyncLLMEngine (its own step thread); a private event loop on another
    thread collects outputs, so any thread, including a web server's worker, can call
    `complete`/`stream` and every call in flight shares one continuous batch.
    """

    exact_tokens = True

    def __init__(self, async_engine):
        self.async_engine = async_engine
        engine = async_engine.engine
        self.tokenizer = engine.tokenizer
        self.context_window = engine.max_request_tokens
        self.name = str(engine.config.model or "bundled")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="lmstack-llm", daemon=True
        )
        self._thread.start()

    @classmethod
    def create(cls, model: str | None = None, dtype: str | None = None, **engine_options):
        from lmstack.engine.async_engine import AsyncLLMEngine
        from lmstack.engine.config import EngineConfig

        config = EngineConfig(**engine_options)
        if model:
            config.model = model
        if dtype:
            config.dtype = dtype
        return cls(AsyncLLMEngine(config))

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode_plain(text))  # as message content is encoded

    def prompt_tokens(self, messages: list[dict]) -> int:
        return len(self.tokenizer.encode_chat(messages))

    def _params(self, request: ChatRequest):
        from lmstack.engine.sampling_params import SamplingParams, StructuredOutput

        return SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            frequency_penalty=request.frequency_penalty,
            seed=request.seed,
            stop=request.stop,
            structured=(
                StructuredOutput(json_schema=request.json_schema)
                if request.json_schema is not None
                else None
            ),
        )

    async def _run(self, request: ChatRequest, deltas: queue.Queue | None = None) -> Completion:
        # Token ids, not text: message contents cannot become control tokens (encode_chat).
        prompt = self.tokenizer.encode_chat(request.messages)
        params = self._params(request)
        start = time.monotonic()
        last = None
        async for out in self.async_engine.generate(
            prompt, params, priority=request.priority, timeout=request.timeout
        ):
            last = out
            if deltas is not None and out.new_text:
                deltas.put(out.new_text)
        assert last is not None
        return Completion(
            text=last.text if last.error is None else "",
            prompt_tokens=last.prompt_tokens,
            completion_tokens=len(last.token_ids),
            finish_reason=last.finish_reason,
            latency_s=time.monotonic() - start,
            ttft_s=last.ttft,
            error=last.error,
        )

    def complete(self, request: ChatRequest) -> Completion:
        """The completion; a request the engine refuses comes back with `error` set."""
        return _result_or_error(asyncio.run_coroutine_threadsafe(self._run(request), self._loop))

    def complete_many(self, requests, on_done=None) -> list[Completion]:
        futures = [asyncio.run_coroutine_threadsafe(self._run(r), self._loop) for r in requests]
        results: list[Completion | None] = [None] * len(futures)
        pending = dict(enumerate(futures))
        while pending:
            for i, fut in list(pending.items()):
                if fut.done():
                    results[i] = _result_or_error(fut)
                    del pending[i]
                    if on_done:
                        on_done(i, results[i])
            if pending:
                time.sleep(0.01)
        return results  # type: ignore[return-value]

    def stream(self, request: ChatRequest) -> Iterator[str]:
        deltas: queue.Queue = queue.Queue()
        fut = asyncio.run_coroutine_threadsafe(self._run(request, deltas), self._loop)
        while True:
            try:
                yield deltas.get(timeout=0.05)
            except queue.Empty:
                if fut.done():
                    break
        while not deltas.empty():
            yield deltas.get_nowait()
        completion = fut.result()
        if completion.error:
            raise LmstackError(f"generation failed: {completion.error}")

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self.async_engine.shutdown()


def _result_or_error(fut) -> Completion:
    try:
        return fut.result()
    except LmstackError as exc:  # bad input for this one request: the others still run
        return Completion(text="", error=str(exc), finish_reason="error")


# --------------------------------------------------------------------------- remote


class OpenAIGenerator:
    """Any OpenAI-compatible chat endpoint, with the same interface as the engine."""

    def __init__(
        self,
        url: str,
        model: str | None = None,
        api_key: str | None = None,
        concurrency: int = 16,
        timeout: float = 600.0,
        context_window: int | None = None,
        tokenizer_model: str | None = None,
    ):
        import httpx

        if not url.startswith(("http://", "https://")):
            raise InputError(f"--llm-url must start with http:// or https://, got {url!r}")
        self.base = url.rstrip("/")
        if self.base.endswith("/v1"):
            self.base = self.base[:-3]
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.base, headers=headers, timeout=timeout)
        self.concurrency = max(1, concurrency)
        self.model = model
        info = self._model_info()
        if self.model is None:
            self.model = info.get("id", "default")
        self.name = f"{self.model} at {self.base}"
        self.context_window = context_window or served_window(info) or DEFAULT_REMOTE_WINDOW
        from lmstack.model.tokenizer import Tokenizer
        from lmstack.model.weights import resolve_model

        self.tokenizer = Tokenizer(resolve_model(tokenizer_model))
        self.exact_tokens = tokenizer_model is not None

    def _model_info(self) -> dict:
        import httpx

        try:
            response = self.client.get("/v1/models")
        except httpx.HTTPError as exc:
            raise LmstackError(f"cannot reach {self.base}/v1/models: {exc}") from exc
        if response.status_code != 200:
            raise LmstackError(
                f"{self.base}/v1/models answered {response.status_code}: {response.text[:200]}"
            )
        models = response.json().get("data") or []
        if self.model is not None:
            for entry in models:
                if entry.get("id") == self.model:
                    return entry
            raise LmstackError(
                f"model {self.model!r} is not served at {self.base} "
                f"(it serves {[m.get('id') for m in models]})"
            )
        return models[0] if models else {}

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode_plain(text))  # as message content is encoded

    def prompt_tokens(self, messages: list[dict]) -> int:
        return len(self.tokenizer.encode_chat(messages))

    def _body(self, request: ChatRequest, stream: bool) -> dict:
        body = {
            "model": self.model,
            "messages": request.messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stream": stream,
        }
        if request.frequency_penalty:
            body["frequency_penalty"] = request.frequency_penalty
        if request.seed is not None:
            body["seed"] = request.seed
        if request.stop:
            body["stop"] = request.stop
        if request.json_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": request.json_schema, "strict": True},
            }
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def _error(self, response) -> str:
        try:
            return response.json()["error"]["message"]
        except Exception:
            return response.text[:300]

    def complete(self, request: ChatRequest) -> Completion:
        import httpx

        start = time.monotonic()
        try:
            response = self.client.post("/v1/chat/completions", json=self._body(request, False))
        except httpx.HTTPError as exc:
            return Completion(text="", error=f"{type(exc).__name__}: {exc}", finish_reason="error")
        if response.status_code != 200:
            return Completion(
                text="",
                error=f"HTTP {response.status_code}: {self._error(response)}",
                finish_reason="error",
            )
        data = response.json()
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        return Completion(
            text=choice["message"].get("content") or "",
            prompt_tokens=usage.get("prompt_tokens", 0),
            completion_tokens=usage.get("completion_tokens", 0),
            finish_reason=choice.get("finish_reason"),
            latency_s=time.monotonic() - start,
        )

    def complete_many(self, requests, on_done=None) -> list[Completion]:
        results: list[Completion | None] = [None] * len(requests)
        with ThreadPoolExecutor(self.concurrency) as pool:
            futures = {pool.submit(self.complete, r): i for i, r in enumerate(requests)}
            for fut in _as_completed(futures):
                i = futures[fut]
                results[i] = fut.result()
                if on_done:
                    on_done(i, results[i])
        return results  # type: ignore[return-value]

    def stream(self, request: ChatRequest) -> Iterator[str]:
        with self.client.stream(
            "POST", "/v1/chat/completions", json=self._body(request, True)
        ) as response:
            if response.status_code != 200:
                response.read()
                raise LmstackError(
                    f"{self.base} answered HTTP {response.status_code}: {self._error(response)}"
                )
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                event = json.loads(payload)
                if "error" in event:
                    raise LmstackError(f"generation failed: {event['error'].get('message')}")
                for choice in event.get("choices") or []:
                    delta = (choice.get("delta") or {}).get("content")
                    if delta:
                        yield delta

    def close(self) -> None:
        self.client.close()


def served_window(model_card: dict) -> int | None:
    """The context one request may use, from a /v1/models entry: vLLM and lmstack say
    `max_model_len`; llama.cpp's llama-server says `meta.n_ctx` (its context per slot, which
    `-c` / `-np` set, often below the model's trained length)."""
    meta = model_card.get("meta")
    llama_cpp = meta.get("n_ctx") if isinstance(meta, dict) else None
    return model_card.get("max_model_len") or llama_cpp


def _as_completed(futures):
    from concurrent.futures import as_completed

    return as_completed(futures)
