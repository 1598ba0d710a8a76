"""`lmstack docs ...` (add, list, remove, search, eval, bench) and `lmstack ask`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from lmstack.errors import InputError
from lmstack.extras import require

docs_app = typer.Typer(
    help="Document library: ingest files, search them, evaluate retrieval.",
    no_args_is_help=True,
)


@docs_app.callback()
def _needs_docqa() -> None:
    # Every `lmstack docs` command reads the vector store or the embedder: say which extra
    # to install before a sub-command fails on its first import.
    require("docqa", "lmstack docs")


def _default_store() -> str:
    return os.environ.get("LMSTACK_DOCS_STORE", "./lmstack-docs.db")


STORE_HELP = (
    "Milvus Lite file (./x.db) or a Milvus server (milvus://host:19530); env LMSTACK_DOCS_STORE"
)


def _store(store: str):
    from lmstack.docqa.store import DocStore

    return DocStore(store)


FUSION_HELP = "How hybrid merges dense and BM25: rrf (reciprocal rank) or relative (scores)"


def _retriever(store: str, fusion: str = "rrf"):
    from lmstack.docqa.retrieve import Retriever
    from lmstack.embed import Embedder

    return Retriever(_store(store), Embedder.shared(), fusion)


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr)


@docs_app.command("add")
def add_command(
    paths: list[Path] = typer.Argument(..., help="Files or folders (recursively)"),
    store: str = typer.Option(_default_store(), "--store", help=STORE_HELP),
    text_field: str = typer.Option("text", "--text-field", help="JSONL: field with the text"),
    id_field: str = typer.Option("id", "--id-field", help="JSONL: field with the document id"),
    title_field: str | None = typer.Option(None, "--title-field", help="JSONL: title field"),
    chunk_tokens: int = typer.Option(500, "--chunk-tokens", help="Largest chunk, in tokens"),
    overlap: int = typer.Option(50, "--overlap", help="Tokens repeated between chunks"),
    model: str | None = typer.Option(None, "--model", help="Model whose tokenizer counts"),
    pdf_password: str | None = typer.Option(
        None,
        "--pdf-password",
        envvar="LMSTACK_PDF_PASSWORD",
        show_default=False,
        help="Password for PDFs that need one to open; never stored (the env var keeps it out "
        "of the shell history)",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON"),
) -> None:
    """Add or update documents: PDF, DOCX, Markdown, HTML, text, JSONL corpora."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from lmstack.docqa.ingest import Ingestor
    from lmstack.embed import Embedder
    from lmstack.models import tokenizer

    doc_store = _store(store)
    ingestor = Ingestor(doc_store, Embedder.shared(), tokenizer(model), chunk_tokens, overlap)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=_console(stderr=True), transient=True) as bar:
        files = bar.add_task("files", total=None)
        chunks = bar.add_task("chunks embedded", total=None)

        def progress(kind: str, n: int) -> None:
            if kind == "files_total":
                bar.update(files, total=n)
            elif kind == "files":
                bar.advance(files, n)
            else:
                bar.advance(chunks, n)

        report = ingestor.ingest(
            paths, text_field, id_field, title_field, progress, pdf_password=pdf_password
        )
    if as_json:
        typer.echo(json.dumps(report.as_json(), indent=2))
    else:
        console = _console()
        console.print(
            f"{len(report.added)} added, {len(report.replaced)} replaced, "
            f"{len(report.unchanged)} unchanged: {report.chunks} chunks, "
            f"{report.tokens:,} tokens in {report.seconds:.1f} s -> {doc_store.uri}"
        )
        for path, line in report.skipped_lines:
            console.print(f"[yellow]skipped[/] {path} line {line}")
    for _, warning in report.warnings:  # each names its file
        typer.echo(f"warning: {warning}", err=True)
    for path, reason in report.failed:
        typer.echo(f"error: {reason}" if path in reason else f"error: {path}: {reason}", err=True)
    if report.failed:
        raise typer.Exit(2)


@docs_app.command("list")
def list_command(
    store: str = typer.Option(_default_store(), "--store", help=STORE_HELP),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Documents in the store, with their chunks and tokens."""
    records = _store(store).documents()
    if as_json:
        fields = ("doc_id", "title", "source", "chunks", "tokens", "added_at")
        typer.echo(json.dumps([{k: getattr(r, k) for k in fields} for r in records], indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{len(records)} documents in {store}", title_justify="left")
    for column in ("doc_id", "title", "chunks", "tokens"):
        table.add_column(column, justify="right" if column in ("chunks", "tokens") else "left")
    for r in records:
        table.add_row(r.doc_id, r.title[:60], str(r.chunks), f"{r.tokens:,}")
    table.add_row("total", "", str(sum(r.chunks for r in records)),
                  f"{sum(r.tokens for r in records):,}")  # fmt: skip
    _console().print(table)


@docs_app.command("remove")
def remove_command(
    doc_ids: list[str] = typer.Argument(..., help="Document ids (see `lmstack docs list`)"),
    store: str = typer.Option(_default_store(), "--store", help=STORE_HELP),
) -> None:
    """Remove documents and their chunks."""
    doc_store = _store(store)
    for doc_id in doc_ids:
        record = doc_store.remove(doc_id)
        typer.echo(f"removed {record.doc_id} ({record.chunks} chunks)")


@docs_app.command("search")
def search_command(
    query: str = typer.Argument(..., help="What to look for"),
    top_k: int = typer.Option(5, "--top-k", help="How many chunks"),
    mode: str = typer.Option("hybrid", "--mode", help="hybrid, dense or bm25"),
    fusion: str = typer.Option("rrf", "--fusion", help=FUSION_HELP),
    store: str = typer.Option(_default_store(), "--store", help=STORE_HELP),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Retrieve the chunks that best match a query."""
    from lmstack.docqa.retrieve import check_top_k

    check_top_k(top_k)
    retriever = _retriever(store, fusion)
    hits = retriever.search(query, top_k, mode)
    if as_json:
        typer.echo(json.dumps([h.as_json() for h in hits], indent=2, ensure_ascii=False))
        return
    console = _console()
    for hit in hits:
        page = f" p.{hit.page}" if hit.page is not None else ""
        section = " > ".join(hit.headings[-2:])
        console.print(
            f"[bold]{hit.rank}. {hit.doc_id}{page}[/] chunk {hit.chunk_id} "
            f"score {hit.score:.4f}  {section}"
        )
        console.print("   " + hit.text[:300].replace("\n", " ") + "...", markup=False)
    console.print(f"[dim]{1000 * retriever.last_timing['total_s']:.1f} ms[/]")


@docs_app.command("eval")
def eval_command(
    questions: Path = typer.Option(..., "--questions", help="JSONL questions file"),
    store: str = typer.Option(_default_store(), "--store", help=STORE_HELP),
    answers: bool = typer.Option(False, "--answers", help="Also generate and score answers"),
    strategy: str = typer.Option("rag", "--strategy", help="Strategy for --answers"),
    llm_url: str | None = typer.Option(None, "--llm-url", help="OpenAI-compatible server"),
    model: str | None = typer.Option(None, "--model", help="Model for --answers (in-process)"),
    fusion: str = typer.Option("rrf", "--fusion", help=FUSION_HELP),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Retrieval metrics per mode (recall@1/5/10, MRR, nDCG@10); answers with --answers."""
    from lmstack.docqa.evaluate import evaluate_answers, evaluate_retrieval, load_questions

    qs = load_questions(questions)
    retriever = _retriever(store, fusion)
    report = evaluate_retrieval(retriever, qs)
    if answers:
        from rich.progress import Progress

        from lmstack.docqa.answer import STRATEGIES, Answerer
        from lmstack.llm import make_generator

        if strategy not in STRATEGIES:
            raise InputError(f"--strategy must be one of {', '.join(STRATEGIES)}")
        answerer = Answerer(retriever, make_generator(llm_url, model=model))
        with Progress(console=_console(stderr=True), transient=True) as bar:
            task = bar.add_task("answering", total=len(qs))
            report["answers"] = evaluate_answers(
                answerer, qs, strategy, progress=lambda n: bar.advance(task, n)
            )
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    from rich.table import Table

    metrics = ("recall@1", "recall@5", "recall@10", "mrr", "ndcg@10", "latency_p50_ms")
    table = Table(title=f"Retrieval on {report['questions']} answerable questions")
    table.add_column("metric")
    for mode in ("bm25", "dense", "hybrid"):
        table.add_column(mode, justify="right")
    for metric in metrics:
        table.add_row(metric, *(f"{report[m][metric]:.3f}" for m in ("bm25", "dense", "hybrid")))
    console = _console()
    console.print(table)
    if answers:
        a = report["answers"]
        console.print(
            f"answers ({a['strategy']}): token F1 {a['answer_f1']}, abstention accuracy "
            f"{a['abstention_accuracy']} on {a['unanswerable']} unanswerable, false "
            f"abstentions {a['false_abstention_rate']}, cited {a['cited_rate']}, {a['seconds']} s"
        )


def ask_command(
    question: str = typer.Argument(..., help="The question"),
    strategy: str = typer.Option("rag", "--strategy", help="rag, map-reduce, refine or sliding"),
    store: str = typer.Option(_default_store(), "--store", help=STORE_HELP),
    top_k: int = typer.Option(5, "--top-k", help="Chunks retrieved"),
    mode: str = typer.Option("hybrid", "--mode", help="Retrieval: hybrid, dense or bm25"),
    fusion: str = typer.Option("rrf", "--fusion", help=FUSION_HELP),
    doc: str | None = typer.Option(None, "--doc", help="Ask this document only"),
    window: int | None = typer.Option(None, "--window", help="Context window (default: model's)"),
    reserve: int = typer.Option(500, "--reserve", help="Tokens kept for the answer"),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Longest answer (<= --reserve)"),
    llm_url: str | None = typer.Option(None, "--llm-url", help="OpenAI-compatible server URL"),
    model: str | None = typer.Option(None, "--model", help="Model (in-process)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print the budget table"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Answer a question from the document store, with cited sources."""
    import sys

    require("docqa", "lmstack ask")
    from lmstack.docqa.answer import Answerer, label_of
    from lmstack.docqa.retrieve import check_top_k
    from lmstack.llm import make_generator

    check_top_k(top_k)
    if window is not None and window < 64:
        raise InputError(f"--window must be at least 64 tokens, got {window}")
    retriever = _retriever(store, fusion)
    answerer = Answerer(
        retriever, make_generator(llm_url, model=model), window, reserve, top_k, mode, max_tokens
    )

    streamed: list[str] = []

    def show(delta: str) -> None:
        streamed.append(delta)
        sys.stdout.write(delta)
        sys.stdout.flush()

    result = answerer.ask(question, strategy, None if as_json else show, doc)
    if as_json:
        typer.echo(json.dumps(result.as_json(), indent=2, ensure_ascii=False))
        return
    console = _console()
    console.print()
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)
    if result.answer.strip() != "".join(streamed).strip():
        # Citation checking changed the markers (dropped invalid ones or attributed).
        console.print("\n[bold]With checked citations:[/]")
        console.print(result.answer, markup=False)
    if result.citations:
        console.print("\n[bold]Sources[/]")
        for citation in result.citations:
            console.print("  " + label_of(citation), markup=False)
    if verbose:
        from rich.table import Table

        table = Table(title=f"Context budget ({result.strategy}, {result.calls} model calls)")
        table.add_column("part")
        table.add_column("tokens", justify="right")
        for name, tokens in result.budget.rows():
            table.add_row(name, f"{tokens:,}")
        console.print(table)


@docs_app.command("bench")
def bench_command(
    folder: Path | None = typer.Option(None, "--folder", help="Report to ingest (default NIST)"),
    questions: Path | None = typer.Option(None, "--questions", help="Queries (JSONL)"),
    chunks: int = typer.Option(10_000, "--chunks", help="Chunks in the large store"),
    words: int = typer.Option(64, "--words", help="Words per passage in the large store"),
    repeats: int = typer.Option(3, "--repeats", help="Times each query runs per mode"),
    json_out: Path | None = typer.Option(None, "--json", help="Write results as JSON"),
    png: Path | None = typer.Option(None, "--png", help="Write latency CDFs as PNG"),
    model: str | None = typer.Option(None, "--model", help="Model whose tokenizer counts"),
) -> None:
    """Ingestion time of a report, and retrieval latency on a large store vs NumPy."""
    from lmstack.config import data_dir
    from lmstack.docqa.bench import plot, run_bench
    from lmstack.models import tokenizer

    if chunks < 10 or words < 5 or repeats < 1:
        raise InputError(
            f"--chunks must be >= 10, --words >= 5, --repeats >= 1; "
            f"got {chunks}, {words}, {repeats}"
        )
    folder = folder or data_dir() / "nist-sp800-63-3"
    default_questions = data_dir() / "nist_questions.jsonl"
    questions = questions or default_questions
    console = _console()
    result = run_bench(
        folder, questions, tokenizer(model), chunks, words, repeats,
        log=lambda m: console.print(m, markup=False),
    )  # fmt: skip
    from rich.table import Table

    ingest = result["ingest"]
    console.print(
        f"ingest {ingest['folder']}: {ingest['documents']} documents, {ingest['chunks']} "
        f"chunks, {ingest['tokens']:,} tokens in {ingest['seconds']} s"
    )
    table = Table(
        title=f"Top-5 retrieval on {result['store']['chunks']:,} chunks "
        f"({result['queries']} queries per mode)"
    )
    table.add_column("retriever")
    table.add_column("P50 ms", justify="right")
    table.add_column("P99 ms", justify="right")
    for name, row in result["latency"].items():
        table.add_row(name, f"{row['p50_ms']:.1f}", f"{row['p99_ms']:.1f}")
    console.print(table)
    if json_out:
        slim = {k: v for k, v in result.items() if k != "samples"}
        json_out.write_text(json.dumps(slim, indent=2))
    if png:
        plot(result, png)
        console.print(f"wrote {png}")
