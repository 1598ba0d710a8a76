"""Budgeted context assembly, citations and the four answer strategies, on the real model."""

from __future__ import annotations

import json

import pytest
from helpers import live_server, run_cli

from lmstack.config import data_dir
from lmstack.docqa.answer import DONT_KNOW, Answerer, attach_citations, is_abstention
from lmstack.docqa.assemble import assemble
from lmstack.docqa.ingest import Ingestor
from lmstack.docqa.records import Hit
from lmstack.docqa.retrieve import Retriever
from lmstack.docqa.store import DocStore
from lmstack.embed import Embedder
from lmstack.errors import ContextLengthError, InputError

NIST = data_dir() / "nist-sp800-63-3"
QUESTION = "What does AAL3 require beyond AAL2?"


@pytest.fixture(scope="module")
def generator():
    from lmstack.llm import make_generator

    gen = make_generator()
    yield gen
    gen.close()


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("answers") / "nist.db"
    Ingestor(DocStore(path), Embedder.shared(), model[1]).ingest([NIST])
    return path


@pytest.fixture(scope="module")
def retriever(store_path):
    return Retriever(DocStore(store_path), Embedder.shared())


def _hit(n: int, text: str, page=None) -> Hit:
    return Hit(f"doc{n}.md", n, f"Doc {n}", page, ["Section"], text, 0, 1.0)


def test_assembly_fits_the_window_exactly(generator, retriever):
    hits = retriever.search(QUESTION, 20)
    context = assemble(QUESTION, hits, generator, window=1500, reserve=300)
    budget = context.budget
    assert budget.prompt == generator.prompt_tokens(context.messages)  # counted as sent
    assert budget.total == budget.prompt + 300 <= 1500
    assert 0 < budget.num_chunks < len(hits) and context.skipped
    assert budget.num_chunks == len(context.sources)
    # Sources go in rank order (a skipped chunk only makes room for a smaller later one).
    ranks = [h.rank for h in context.sources]
    assert ranks == sorted(ranks) and ranks[0] == 1
    assert "[1] " in context.messages[1]["content"]
    rows = dict(budget.rows())
    assert rows["window"] == 1500 and rows["answer reserve"] == 300
    with pytest.raises(ContextLengthError, match="longer than the model's context window"):
        assemble("word " * 400, hits, generator, window=400, reserve=100)
    with pytest.raises(InputError, match="--reserve"):
        assemble(QUESTION, hits, generator, reserve=0)


def test_citations_are_checked_and_attributed():
    sources = [
        _hit(1, "Passwords must be at least eight characters long."),
        _hit(2, "Hardware tokens provide verifier impersonation resistance.", page=4),
    ]
    text, cited = attach_citations("Use hardware tokens [2] or magic [7].", sources)
    assert cited == [2] and "[7]" not in text and "[2]" in text
    text, cited = attach_citations(
        "Passwords need eight characters at least. Hardware tokens resist impersonation.",
        sources,
    )
    assert cited == [1, 2] and text.index("[1]") < text.index("[2]")
    assert attach_citations("Bananas are yellow.", sources) == ("Bananas are yellow.", [])
    assert is_abstention("I don't know.") and is_abstention("NONE")
    assert not is_abstention("AAL3 requires a hardware authenticator [1].")


def test_rag_answer_is_cited_and_within_budget(generator, retriever):
    answerer = Answerer(retriever, generator, top_k=3, max_tokens=64)
    streamed = []
    answer = answerer.ask(QUESTION, "rag", on_text=streamed.append)
    assert "".join(streamed).strip()
    assert not answer.abstained and answer.calls == 1
    assert answer.citations, answer.answer
    for citation in answer.citations:
        source = answer.sources[citation.n - 1]
        assert (citation.doc_id, citation.chunk_id) == (source.doc_id, source.chunk_id)
        assert f"[{citation.n}" in answer.answer or f", {citation.n}" in answer.answer
    assert answer.budget.total <= answer.budget.window == generator.context_window
    data = answer.as_json()
    assert {"answer", "citations", "strategy", "budget"} <= set(data)


def test_off_topic_question_is_declined_without_a_model_call(generator, retriever):
    answer = Answerer(retriever, generator).ask("Who won the 2018 FIFA World Cup?")
    assert answer.abstained and answer.answer == DONT_KNOW
    assert answer.calls == 0 and answer.citations == []


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["map-reduce", "refine", "sliding"])
def test_multi_call_strategies(generator, retriever, strategy):
    answerer = Answerer(retriever, generator, window=2048, top_k=3, max_tokens=48)
    answer = answerer.ask("Which assurance level requires in-person identity proofing?",
                          strategy)  # fmt: skip
    assert answer.strategy == strategy and answer.calls >= 2
    assert answer.budget.total <= 2048
    if not answer.abstained:
        assert all(1 <= c.n <= len(answer.sources) for c in answer.citations)
    if strategy == "sliding":  # the whole top document, in windows that each fit
        doc = answer.sources[0].doc_id
        assert len(answer.sources) == len(retriever.store.chunks_of(doc))


@pytest.mark.slow
def test_ask_cli_json_and_verbose(store_path, capsys):
    code, out, err = run_cli(
        ["ask", QUESTION, "--store", str(store_path), "--json", "--max-tokens", "48",
         "--top-k", "2"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(out)
    assert data["strategy"] == "rag" and data["budget"]["total"] <= data["budget"]["window"]
    code, out, err = run_cli(
        ["ask", QUESTION, "--store", str(store_path), "--verbose", "--max-tokens", "32",
         "--top-k", "2", "--window", "2048"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "Context budget" in out and "answer reserve" in out and "2,048" in out
    code, _, err = run_cli(["ask", QUESTION, "--store", str(store_path), "--top-k", "0"], capsys)
    assert code == 2 and "--top-k" in err
    code, _, err = run_cli(
        ["ask", QUESTION, "--store", str(store_path), "--strategy", "guess"], capsys
    )
    assert code == 2 and "--strategy" in err


@pytest.mark.slow
def test_answers_through_an_openai_compatible_url(generator, retriever):
    """--llm-url: the same answer path against a live `lmstack serve` (same engine)."""
    from lmstack.llm import OpenAIGenerator
    from lmstack.server.app import create_app

    with live_server(create_app(generator.async_engine, "smollm2")) as url:
        remote = OpenAIGenerator(url)
        answer = Answerer(retriever, remote, top_k=2, max_tokens=48).ask(QUESTION)
        assert answer.calls == 1 and answer.answer and not answer.abstained
        assert answer.budget.total <= remote.context_window
        with pytest.raises(Exception, match="not served"):
            OpenAIGenerator(url, model="gpt-17")
