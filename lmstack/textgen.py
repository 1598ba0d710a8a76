"""`lmstack generate` and `lmstack chat`: the bundled model from the terminal, streamed."""

from __future__ import annotations

import sys

import typer

from lmstack.config import default_dtype, default_model

ModelOpt = typer.Option(None, "--model", help="'bundled', a .gguf file or a HF model directory")
DtypeOpt = typer.Option(
    None,
    "--dtype",
    help="auto (chosen for this CPU), float32, bfloat16, int8, gguf, q4_1, q4_0 or q8_0",
)


def _engine(model: str | None, dtype: str | None):
    """One engine for this terminal session: the serving path's kernels, prefix cache and
    sampler (a chat turn reuses the conversation's cached prefix)."""
    from lmstack.engine.config import EngineConfig
    from lmstack.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(model=model or default_model(), dtype=dtype or default_dtype()))


def _params(max_tokens: int, temperature: float, top_p: float, seed: int | None):
    """Sampling parameters, validated before any model is loaded."""
    from lmstack.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    params.validate()
    return params


def _stream(engine, prompt_ids: list[int], params):
    """Run one request to its end, writing its text as it comes; returns the last output."""
    from lmstack.errors import InputError

    request_id = engine.add_request(prompt_ids, params)
    last = None
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id != request_id:
                    continue
                sys.stdout.write(out.new_text)
                sys.stdout.flush()
                if out.finished:
                    last = out
    except KeyboardInterrupt:
        engine.abort(request_id)
        engine.step_aborted_cleanup()
        raise
    if last is None or last.error:
        raise InputError(last.error if last else "the request ended without an output")
    return last


def generate_command(
    prompt: str = typer.Argument(..., help="Text to continue (or a user message with --chat)"),
    max_tokens: int = typer.Option(128, "--max-tokens", help="Most tokens to generate"),
    temperature: float = typer.Option(0.7, "--temperature", help="0 is greedy"),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass, in (0, 1]"),
    seed: int | None = typer.Option(None, "--seed", help="Seed for reproducible sampling"),
    chat: bool = typer.Option(False, "--chat", help="Apply the model's chat template"),
    system: str | None = typer.Option(None, "--system", help="System prompt (with --chat)"),
    stats: bool = typer.Option(False, "--stats", help="Print TTFT and tokens/s on stderr"),
    model: str | None = ModelOpt,
    dtype: str | None = DtypeOpt,
) -> None:
    """Generate a continuation of PROMPT, streaming tokens to stdout."""
    params = _params(max_tokens, temperature, top_p, seed)  # fail before loading the model
    engine = _engine(model, dtype)
    tok = engine.tokenizer
    if chat:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    out = _stream(engine, tok.encode(prompt), params)
    sys.stdout.write("\n")
    if stats:
        n = len(out.token_ids)
        decode_s = (out.finish_time or 0) - (out.first_token_time or 0)
        rate = (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0
        typer.echo(
            f"prompt {out.prompt_tokens} tokens, output {n} tokens, "
            f"TTFT {(out.ttft or 0) * 1000:.0f} ms, decode {rate:.1f} tokens/s, "
            f"finish {out.finish_reason}, dtype {engine.precision['dtype']}",
            err=True,
        )


def chat_command(
    system: str | None = typer.Option(None, "--system", help="System prompt"),
    max_tokens: int = typer.Option(512, "--max-tokens"),
    temperature: float = typer.Option(0.7, "--temperature"),
    top_p: float = typer.Option(0.9, "--top-p"),
    seed: int | None = typer.Option(None, "--seed"),
    model: str | None = ModelOpt,
    dtype: str | None = DtypeOpt,
) -> None:
    """Chat with the model in the terminal (streams replies; /reset clears, /quit exits)."""
    from lmstack.errors import InputError

    params = _params(max_tokens, temperature, top_p, seed)
    engine = _engine(model, dtype)
    tok = engine.tokenizer
    window = engine.max_model_len
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    name = engine.model.source.name
    typer.echo(f"lmstack chat ({name}, {engine.precision['dtype']}); /reset clears, /quit exits")
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            typer.echo()
            return
        text = line.strip()
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            messages = list(base)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
        # Drop the oldest turns when the conversation outgrows the window.
        while len(ids) + max_tokens > window and len(messages) > len(base) + 1:
            del messages[len(base) : len(base) + 2]
            ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
        sys.stdout.write("assistant> ")
        try:
            out = _stream(engine, ids, params)
        except InputError as exc:
            typer.echo(f"\nerror: {exc}", err=True)
            messages.pop()
            continue
        except KeyboardInterrupt:  # Ctrl-C stops the reply, not the chat
            typer.echo()
            messages.pop()
            continue
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": out.text})
