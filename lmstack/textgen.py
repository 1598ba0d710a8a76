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


def _load(model: str | None, dtype: str | None):
    from lmstack.model.llama import shared_model

    return shared_model(model or default_model(), dtype or default_dtype())


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
    from lmstack.model.generate import GenerationStats, check_sampling, generate_stream

    check_sampling(temperature, top_p, max_tokens)  # fail before loading the model
    net, tok = _load(model, dtype)
    if chat:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    ids = tok.encode(prompt)
    result = GenerationStats()
    decoder = tok.stream_decoder()
    for token in generate_stream(net, tok, ids, max_tokens, temperature, top_p, seed, stats=result):
        sys.stdout.write(decoder.push(token))
        sys.stdout.flush()
    sys.stdout.write(decoder.flush() + "\n")
    if stats:
        typer.echo(
            f"prompt {result.prompt_tokens} tokens, output {result.output_tokens} tokens, "
            f"TTFT {result.ttft_s * 1000:.0f} ms, decode {result.decode_tokens_per_s:.1f} "
            f"tokens/s, finish {result.finish_reason}",
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
    from lmstack.model.generate import check_sampling, generate_stream

    check_sampling(temperature, top_p, max_tokens)
    net, tok = _load(model, dtype)
    window = net.config.max_position_embeddings
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    typer.echo(f"lmstack chat ({net.source.name}, {net.dtype}); /reset clears, /quit exits")
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
        decoder = tok.stream_decoder()
        try:
            for token in generate_stream(net, tok, ids, max_tokens, temperature, top_p, seed):
                sys.stdout.write(decoder.push(token))
                sys.stdout.flush()
        except InputError as exc:
            typer.echo(f"\nerror: {exc}", err=True)
            messages.pop()
            continue
        sys.stdout.write(decoder.flush() + "\n")
        messages.append({"role": "assistant", "content": tok.decode(decoder.ids)})
