"""Haystack answering a question over two documents with lmstack as its only backend: a
real uvicorn on 127.0.0.1 serving the bundled model and the bundled MiniLM embedder.

Haystack's OpenAI components (haystack-ai 3.4) talk to lmstack as they would to OpenAI:
OpenAIDocumentEmbedder and OpenAITextEmbedder call POST /v1/embeddings (with
`encoding_format: "float"`), OpenAIChatGenerator calls /v1/chat/completions (with `n`, and
`stream` when given a streaming callback). The retriever must rank the document holding
the fact first, which is the embeddings' quality, and the answer must copy the fact.
"""

from __future__ import annotations

import os

# Haystack starts its telemetry client when first imported unless told not to: nothing
# may reach the network from the tests.
os.environ["HAYSTACK_TELEMETRY_ENABLED"] = "False"

import httpx  # noqa: E402
import pytest  # noqa: E402
from haystack import Document, Pipeline  # noqa: E402
from haystack.components.builders import ChatPromptBuilder  # noqa: E402
from haystack.components.embedders import (  # noqa: E402
    OpenAIDocumentEmbedder,
    OpenAITextEmbedder,
)
from haystack.components.generators.chat import OpenAIChatGenerator  # noqa: E402
from haystack.components.retrievers.in_memory import InMemoryEmbeddingRetriever  # noqa: E402
from haystack.components.writers import DocumentWriter  # noqa: E402
from haystack.dataclasses import ChatMessage  # noqa: E402
from haystack.document_stores.in_memory import InMemoryDocumentStore  # noqa: E402
from haystack.telemetry import _telemetry  # noqa: E402
from haystack.utils import Secret  # noqa: E402
from helpers import live_server  # noqa: E402

from lmstack.server.app import create_app  # noqa: E402

MODEL = "smollm2-135m-instruct"
# Two documents with clearly different facts; each question is about one of them, and its
# fact is one the 135M model copies from the context.
DOCUMENTS = [
    "The door code of the Lisbon office is 4817. Visitors enter through the side gate.",
    "The Oslo warehouse is managed by Ingrid Dahl. Deliveries arrive on Mondays.",
]
QUESTIONS = [  # (question, index of the document that answers it, the fact)
    ("What is the door code of the Lisbon office?", 0, "4817"),
    ("Who manages the Oslo warehouse?", 1, "Ingrid Dahl"),
]
QUESTION, _, FACT = QUESTIONS[0]
TEMPLATE = [
    ChatMessage.from_system("Answer the question using only the context."),
    ChatMessage.from_user(
        "Context:\n{% for doc in documents %}{{ doc.content }}\n{% endfor %}\n"
        "Question: {{ question }}"
    ),
]
SECRET = Secret.from_token("unused")  # lmstack checks no key; Haystack requires one


@pytest.fixture(scope="module")
def embedder():
    from lmstack.embed import Embedder

    return Embedder.shared()


@pytest.fixture(scope="module")
def base_url(engine, embedder):
    with live_server(create_app(engine, MODEL, embedder=embedder)) as url:
        yield url


@pytest.fixture(scope="module")
def embedding_model(base_url):
    """The embedding model's id, as a client finds it: the /v1/models card that is not the
    chat model."""
    cards = httpx.get(f"{base_url}/v1/models").json()["data"]
    (model,) = [card["id"] for card in cards if card["id"] != MODEL]
    return model


@pytest.fixture(scope="module")
def store(base_url, embedding_model):
    """The two documents, embedded through lmstack and written to an in-memory store."""
    store = InMemoryDocumentStore()
    indexing = Pipeline()
    indexing.add_component(
        "embedder",
        OpenAIDocumentEmbedder(
            api_key=SECRET, model=embedding_model, api_base_url=f"{base_url}/v1",
            progress_bar=False, max_retries=0, raise_on_failure=True,
        ),
    )  # fmt: skip
    indexing.add_component("writer", DocumentWriter(document_store=store))
    indexing.connect("embedder.documents", "writer.documents")
    result = indexing.run({"embedder": {"documents": [Document(content=t) for t in DOCUMENTS]}})
    assert result["writer"]["documents_written"] == 2
    return store


def generator(base_url: str, **kwargs) -> OpenAIChatGenerator:
    return OpenAIChatGenerator(
        api_key=SECRET, model=MODEL, api_base_url=f"{base_url}/v1", max_retries=0,
        generation_kwargs={"temperature": 0, "max_completion_tokens": 32}, **kwargs,
    )  # fmt: skip


def rag(base_url: str, embedding_model: str, store, **generator_kwargs) -> Pipeline:
    pipe = Pipeline()
    pipe.add_component(
        "query",
        OpenAITextEmbedder(
            api_key=SECRET, model=embedding_model, api_base_url=f"{base_url}/v1", max_retries=0
        ),
    )
    pipe.add_component("retriever", InMemoryEmbeddingRetriever(document_store=store, top_k=2))
    pipe.add_component("prompt", ChatPromptBuilder(template=TEMPLATE, required_variables="*"))
    pipe.add_component("llm", generator(base_url, **generator_kwargs))
    pipe.connect("query.embedding", "retriever.query_embedding")
    pipe.connect("retriever.documents", "prompt.documents")
    pipe.connect("prompt.prompt", "llm.messages")
    return pipe


def ask(pipe: Pipeline, question: str = QUESTION) -> dict:
    return pipe.run(
        {"query": {"text": question}, "prompt": {"question": question}},
        include_outputs_from={"retriever", "query"},
    )


def test_telemetry_is_off():
    assert _telemetry.telemetry is None


def test_documents_are_embedded_by_lmstack(store, embedder):
    documents = store.filter_documents()
    assert sorted(d.content for d in documents) == sorted(DOCUMENTS)
    for document in documents:  # the bundled MiniLM's vectors, through the HTTP API
        (expected,) = embedder.embed([document.content])
        assert len(document.embedding) == 384
        assert max(abs(a - b) for a, b in zip(document.embedding, expected)) < 1e-5


@pytest.mark.parametrize("question, index, fact", QUESTIONS)
def test_retrieval_ranks_the_right_document_first_and_the_answer_copies_the_fact(
    base_url, embedding_model, store, question, index, fact
):
    result = ask(rag(base_url, embedding_model, store), question)
    assert len(result["query"]["embedding"]) == 384
    ranked = result["retriever"]["documents"]
    assert [d.content for d in ranked] == [DOCUMENTS[index], DOCUMENTS[1 - index]]
    assert ranked[0].score > ranked[1].score + 0.1, [d.score for d in ranked]
    (reply,) = result["llm"]["replies"]
    assert fact in reply.text, reply.text
    assert reply.meta["model"] == MODEL and reply.meta["finish_reason"] in ("stop", "length")
    assert reply.meta["usage"]["prompt_tokens"] > 0


def test_streamed_answer_is_the_same_answer(base_url, embedding_model, store):
    chunks = []
    streamed = ask(rag(base_url, embedding_model, store, streaming_callback=chunks.append))
    whole = ask(rag(base_url, embedding_model, store))
    (reply,) = streamed["llm"]["replies"]
    assert len(chunks) > 3 and "".join(c.content for c in chunks) == reply.text
    assert reply.text == whole["llm"]["replies"][0].text and FACT in reply.text
