"""`lmstack attention`: scaled dot-product attention worked step by step in the terminal.

The practice example by default, your own matrices with --input, or the bundled model's real
attention with --text. Every number comes from `reference_attention`, the reference the
model's fast path is tested against, so what is printed is what the model computes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich import box
from rich.columns import Columns
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from lmstack.errors import ContextLengthError, InputError

if TYPE_CHECKING:  # torch loads inside the functions so `lmstack --help` stays fast
    import torch

    from lmstack.model.attention import AttentionSteps

PRACTICE_TOKENS = ["The", "cat", "sat"]
PRACTICE_EMBEDDINGS = [[1, 0, 1, 0], [0, 1, 0, 1], [1, 1, 0, 0]]
MATRIX_KEYS = ("W_Q", "W_K", "W_V")
TABLE_STYLE = {"title_style": "bold cyan", "header_style": "bold", "box": box.SIMPLE_HEAD}
TABLE_STYLE |= {"show_edge": False, "pad_edge": False}  # compact: three fit in 80 columns


@dataclass
class Example:
    """Tokens, their embeddings X [T, d_model] and optional projections (None = identity)."""

    tokens: list[str]
    x: torch.Tensor
    w_q: torch.Tensor | None = None
    w_k: torch.Tensor | None = None
    w_v: torch.Tensor | None = None

    def matrices(self) -> tuple[torch.Tensor | None, ...]:
        return self.w_q, self.w_k, self.w_v

    def steps(self, causal: bool = False, heads: int = 1) -> AttentionSteps:
        from lmstack.model.attention import explain

        return explain(self.x, *self.matrices(), causal=causal, num_heads=heads)


def practice_example() -> Example:
    import torch

    return Example(list(PRACTICE_TOKENS), torch.tensor(PRACTICE_EMBEDDINGS, dtype=torch.float64))


def _matrix(value: object, name: str, where: str) -> torch.Tensor:
    """A JSON list of equal-length rows of finite numbers, or an InputError naming the spot."""
    if not isinstance(value, list) or not value or not all(isinstance(r, list) for r in value):
        raise InputError(f"{where}: {name} must be a non-empty list of rows (lists of numbers)")
    import torch

    width = len(value[0])
    for i, row in enumerate(value, 1):
        if len(row) != width or not row:
            raise InputError(f"{where}: {name} row {i} has {len(row)} numbers, row 1 has {width}")
        for j, num in enumerate(row, 1):
            # bool is an int subclass, but true/false in a matrix is a mistake, not 1/0.
            if isinstance(num, bool) or not isinstance(num, (int, float)) or not math.isfinite(num):
                raise InputError(f"{where}: {name} row {i}, column {j} is {num!r}, not a number")
    return torch.tensor(value, dtype=torch.float64)


def load_input(path: Path) -> Example:
    """Read an --input file: {"tokens": [...], "embeddings": [[...]], "W_Q"?, "W_K"?, "W_V"?}."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object with 'tokens' and 'embeddings'")
    # A misspelt key (w_q) would otherwise silently fall back to the identity.
    unknown = sorted(set(data) - {"tokens", "embeddings", *MATRIX_KEYS})
    if unknown:
        raise InputError(
            f"{path}: unknown key {unknown[0]!r} (expected tokens, embeddings, W_Q, W_K, W_V)"
        )
    for key in ("tokens", "embeddings"):
        if key not in data:
            raise InputError(f"{path}: missing key {key!r} (need 'tokens' and 'embeddings')")
    tokens = data["tokens"]
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise InputError(f"{path}: 'tokens' must be a non-empty list of strings")
    x = _matrix(data["embeddings"], "embeddings", str(path))
    if len(tokens) != x.shape[0]:
        raise InputError(f"{path}: {len(tokens)} tokens but {x.shape[0]} embedding rows")
    w = {k: _matrix(data[k], k, str(path)) if k in data else None for k in MATRIX_KEYS}
    return Example(tokens, x, w["W_Q"], w["W_K"], w["W_V"])


class RecordingContext:
    """A `NoCache`-style attention context that records q [H,T,d], k/v [H_kv,T,d] and the
    model's own output [H,T,d] for chosen layers, while the model runs its fast path."""

    def __init__(self, layers: int | set[int] | list[int]) -> None:
        self.layers = {layers} if isinstance(layers, int) else set(layers)
        self.records: dict[int, dict[str, torch.Tensor]] = {}
        from lmstack.model.cache import NoCache

        self._inner = NoCache()

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        out = self._inner.attend(layer, q, k, v)
        if layer in self.layers:
            named = {"q": q, "k": k, "v": v, "output": out}
            self.records[layer] = {n: t.transpose(0, 1) for n, t in named.items()}
        return out

    def finish_step(self, num_tokens: int) -> None:
        self._inner.finish_step(num_tokens)


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """Readable per-token labels: the leading space dropped, blank tokens quoted."""
    raw = [tokenizer.decode([tid], skip_special_tokens=False) for tid in ids]
    return [r.strip() or repr(r) for r in raw]


def model_attention(
    model, tokenizer, text: str, layer: int, head: int
) -> tuple[list[str], AttentionSteps]:
    """The model's causal attention on `text` at one layer and query head (one-head steps)."""
    import torch

    from lmstack.model.attention import reference_attention

    cfg = model.config
    for name, value, limit, what in (
        ("--layer", layer, cfg.num_hidden_layers, "layers"),
        ("--head", head, cfg.num_attention_heads, "heads"),
    ):
        if not 0 <= value < limit:
            raise InputError(
                f"{name} {value} is out of range: the model has {limit} {what} (0 to {limit - 1})"
            )
    ids = tokenizer.encode(text)
    if not ids:
        raise InputError("--text is empty: give a sentence to run through the model")
    if len(ids) > cfg.max_position_embeddings:
        raise ContextLengthError(len(ids), cfg.max_position_embeddings, "--text")
    ctx = RecordingContext(layer)
    model(torch.tensor(ids), torch.arange(len(ids)), ctx)
    rec = ctx.records[layer]
    # With GQA query head h reads key/value head h // group: give the reference exactly
    # the pair the model's kernel used.
    kv = head // (cfg.num_attention_heads // cfg.num_key_value_heads)
    steps = reference_attention(
        rec["q"][head : head + 1], rec["k"][kv : kv + 1], rec["v"][kv : kv + 1], causal=True
    )
    return token_labels(tokenizer, ids), steps


def _rows(t: torch.Tensor) -> list:
    """Tensor -> nested lists; -inf (masked) becomes null so the JSON stays valid."""
    if t.dim() > 1:
        return [_rows(r) for r in t]
    return [round(v, 6) if math.isfinite(v) else None for v in t.tolist()]


def steps_to_json(steps: AttentionSteps, tokens: list[str]) -> dict:
    """scores/scaled/weights/output as lists of rows; one such list per head when heads > 1."""
    heads = steps.weights.shape[0]
    out: dict = {"tokens": tokens, "heads": heads, "d_k": steps.d_k, "causal": steps.causal}
    for key in ("scores", "scaled", "weights", "output"):
        t = getattr(steps, key)
        out[key] = _rows(t[0] if heads == 1 else t)
    return out


def readings(weights: torch.Tensor, tokens: list[str]) -> list[str]:
    """One line per token naming what it attends to most (every one of them, when tied)."""
    lines = []
    for tok, row in zip(tokens, weights.tolist(), strict=True):
        top = max(row)
        best = [f'"{tokens[j]}"' for j, w in enumerate(row) if math.isclose(w, top, abs_tol=5e-4)]
        names = " and ".join([", ".join(best[:-1]), best[-1]] if len(best) > 1 else best)
        each = " each" if len(best) > 1 else ""
        lines.append(f'"{tok}" attends most to {names} ({top:.3f}{each})')
    return lines


def matrix_table(
    title: str,
    m: torch.Tensor,
    rows: list[str],
    cols: list[str],
    masked: torch.Tensor | None = None,
    highlight_max: bool = False,
) -> Table:
    """A labelled matrix; masked cells dimmed, optionally each row's largest value in green."""
    values = m.tolist()
    hidden = masked.tolist() if masked is not None else None  # per-cell tensor indexing is slow
    # Integer matrices (the practice scores) read better without ".000" everywhere.
    integral = all(float(v).is_integer() for row in values for v in row if math.isfinite(v))
    table = Table(title=title, **TABLE_STYLE)
    table.add_column("")
    for c in cols:
        table.add_column(Text(c), justify="right")  # Text: tokens like "[/]" are not markup
    for i, (label, row) in enumerate(zip(rows, values, strict=True)):
        cells = []
        for j, v in enumerate(row):
            style = ""
            if hidden is not None and hidden[i][j]:
                style = "dim red" if not math.isfinite(v) else "dim"
            elif highlight_max and v == max(row):
                style = "bold green"
            num = "-inf" if not math.isfinite(v) else f"{v:.0f}" if integral else f"{v:.3f}"
            cells.append(Text(num, style=style))
        table.add_row(Text(label, style="bold"), *cells)
    return table


def render_steps(
    console: Console, steps: AttentionSteps, tokens: list[str], weights_only: bool = False
) -> None:
    """Print each step as labelled tables, then a one-line reading per token."""

    terminal_width = console.width

    def step(text: str | None, *tables: Table) -> None:
        wide = console.options.update(max_width=100_000)
        need = max(Measurement.get(console, wide, t).maximum for t in tables)
        # Rich would shrink numbers to "0.0…": better a wide table that the terminal wraps.
        console.width = max(console.width, need)
        if text:
            console.print(text)
        console.print(Columns(tables, padding=(0, 3)), "")  # side by side when width allows

    heads = steps.weights.shape[0]
    masked = steps.scaled.isinf()
    dims = [f"d{i}" for i in range(steps.q.shape[-1])]
    v_dims = [f"d{i}" for i in range(steps.v.shape[-1])]
    for h in range(heads):
        if heads > 1:
            console.rule(f"[bold]head {h}[/] of {heads}: dimensions split, d_k = {steps.d_k}")
        weights = matrix_table("weights", steps.weights[h], tokens, tokens, masked[h], True)
        if weights_only:
            step(None, weights)
        else:
            step(
                "[bold]1. Project[/] each embedding: Q = X W_Q, K = X W_K, V = X W_V",
                *(
                    matrix_table(name, getattr(steps, name.lower())[h], tokens, cols)
                    for name, cols in (("Q", dims), ("K", dims), ("V", v_dims))
                ),
            )
            root = f"{math.sqrt(steps.d_k):.4g}"
            note = "\n   [red]-inf[/] hides future tokens: each sees itself and earlier ones"
            step(
                "[bold]2. Score[/] each query (row) against each key (column): QK^T\n"
                f"   and divide by sqrt(d_k) = {root} so the softmax does not saturate"
                + (note if steps.causal else ""),
                matrix_table("QK^T scores", steps.scores[h], tokens, tokens),
                matrix_table(f"scaled = QK^T / {root}", steps.scaled[h], tokens, tokens, masked[h]),
            )
            step(
                "[bold]3. Softmax[/] each row: how much each token attends to each token\n"
                "   (rows sum to 1; the [bold green]largest[/] in each row is highlighted)",
                weights,
            )
            step(
                "[bold]4. Mix[/] the values: output = weights V",
                matrix_table("output", steps.output[h], tokens, v_dims),
            )
        for line in readings(steps.weights[h], tokens):
            console.print(f"  {line}", markup=False)
        console.print()
    if heads > 1 and not weights_only:
        merged = steps.merged_output()
        cols = [f"d{i}" for i in range(merged.shape[-1])]
        console.rule("[bold]all heads[/]")
        step(None, matrix_table("output, heads concatenated", merged, tokens, cols))
    if console.width > terminal_width:
        console.print("[dim]Tables are wider than the terminal; --plot draws a heatmap.[/]")


def plot_weights(steps: AttentionSteps, tokens: list[str], path: Path, title: str) -> None:
    """Heatmap of the weights, one subplot per head, token labels on both axes."""
    # Figure + the Agg canvas directly: no display needed, and pyplot's global backend and
    # figure registry stay untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    heads, n = steps.weights.shape[0], len(tokens)
    side = max(3.0, 0.45 * n + 1.5)
    fig = Figure(figsize=(side * heads + 1, side + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, heads, squeeze=False)[0]
    for h, ax in enumerate(axes):
        w = steps.weights[h].double().numpy()
        im = ax.imshow(w, cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(n), tokens, rotation=60, ha="right")
        ax.set_yticks(range(n), tokens)
        ax.set_xlabel("key (attended to)")
        ax.set_ylabel("query (attending)" if h == 0 else "")
        ax.set_title(f"head {h}" if heads > 1 else "")
        if n <= 12:  # cell values stay legible only on small grids
            for i in range(n):
                for j in range(n):
                    color = "black" if w[i, j] > 0.6 else "white"
                    ax.text(j, i, f"{w[i, j]:.2f}", ha="center", va="center", color=color)
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="attention weight")
    fig.suptitle(title)
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise InputError(f"--plot {path}: cannot write ({exc.strerror or exc})") from None
    except ValueError as exc:  # an extension matplotlib cannot write
        raise InputError(f"--plot {path}: {exc}") from None


def _load_bundled():
    from lmstack.model.llama import shared_model

    return shared_model("bundled", "float32")


def attention_command(
    causal: bool = typer.Option(False, "--causal", help="Mask future tokens (decoder style)"),
    input_file: Path | None = typer.Option(None, "--input", help="JSON: tokens, embeddings, W_*"),
    heads: int | None = typer.Option(None, "--heads", help="Split into N heads [default: 1]"),
    json_out: bool = typer.Option(False, "--json", help="Print the steps as JSON"),
    plot: Path | None = typer.Option(None, "--plot", help="Save a weights heatmap (PNG)"),
    text: str | None = typer.Option(None, "--text", help="The bundled model's attention on this"),
    layer: int | None = typer.Option(None, "--layer", help="Layer for --text [default: 0]"),
    head: int | None = typer.Option(None, "--head", help="Head for --text [default: 0]"),
) -> None:
    """Work through scaled dot-product attention step by step: Q, K, V, scores, softmax."""
    if text is not None:
        if input_file is not None:
            raise InputError("--text and --input cannot be combined; use one or the other")
        if heads not in (None, 1):
            raise InputError("--heads does not apply to --text; pick one model head with --head")
        model, tokenizer = _load_bundled()
        layer, head = layer or 0, head or 0
        tokens, steps = model_attention(model, tokenizer, text, layer, head)
        cfg = model.config
        kv = head // (cfg.num_attention_heads // cfg.num_key_value_heads)
        title = f"bundled model, layer {layer}, head {head}"
        intro = (
            f"[bold]Attention weights of the {title}[/]\n{len(tokens)} tokens; query head "
            f"{head} of {cfg.num_attention_heads} shares key/value head {kv} of "
            f"{cfg.num_key_value_heads}; causal, d_k = {steps.d_k}\n"
        )
    else:
        if layer is not None or head is not None:
            raise InputError("--layer and --head pick the model's attention: use them with --text")
        example = load_input(input_file) if input_file is not None else practice_example()
        steps = example.steps(causal=causal, heads=1 if heads is None else heads)
        tokens = example.tokens
        what = str(input_file) if input_file is not None else "practice example"
        title = what + (" (causal)" if causal else "")
        shapes = [w if w is None else "x".join(map(str, w.shape)) for w in example.matrices()]
        proj = ", ".join(f"{k} {s or 'identity'}" for k, s in zip(MATRIX_KEYS, shapes, strict=True))
        proj = proj if any(shapes) else "W_Q = W_K = W_V = identity"
        n = steps.weights.shape[0]
        intro = (
            f"[bold]Scaled dot-product attention: {escape(title)}[/]\n"
            f"tokens {escape(', '.join(tokens))}; d_model = {example.x.shape[1]}; {proj}; "
            f"{n} head{'s' if n > 1 else ''}, d_k = {steps.d_k}\n"
        )
    if plot is not None:
        plot_weights(steps, tokens, plot, title)
    if json_out:
        typer.echo(json.dumps(steps_to_json(steps, tokens)))
        return
    console = Console(highlight=False, emoji=False)
    console.print(intro)
    render_steps(console, steps, tokens, weights_only=text is not None)
    if plot is not None:
        console.print(f"heatmap saved to {escape(str(plot))}")
