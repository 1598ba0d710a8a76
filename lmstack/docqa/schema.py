"""The store's two collections (see store.py): created when missing, checked when present."""

from __future__ import annotations

from lmstack.docqa.records import MAX_META_BYTES
from lmstack.errors import InputError

CHUNKS = "lmstack_chunks"
DOCUMENTS = "lmstack_documents"
MAX_TEXT_BYTES = 65535
_ANALYZER = {
    "tokenizer": "standard",
    "filter": [
        "lowercase",
        {"type": "stop", "stop_words": ["_english_"]},
        {"type": "stemmer", "language": "english"},
    ],
}


def ensure_collections(client, uri: str, dimension: int) -> None:
    from pymilvus import DataType, Function, FunctionType

    c = client
    if not c.has_collection(CHUNKS):
        schema = c.create_schema(auto_id=False, description="lmstack document chunks")
        schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("doc_id", DataType.VARCHAR, max_length=MAX_META_BYTES)
        schema.add_field("chunk_id", DataType.INT64)
        schema.add_field("version", DataType.VARCHAR, max_length=64)
        schema.add_field("title", DataType.VARCHAR, max_length=MAX_META_BYTES)
        schema.add_field("page", DataType.INT64)  # -1: no page
        schema.add_field("headings", DataType.VARCHAR, max_length=MAX_META_BYTES * 2)
        schema.add_field("tokens", DataType.INT64)
        schema.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
        # What BM25 indexes: the chunk with its title and heading path, so a question
        # naming a section finds its chunks even when the body never repeats the name.
        schema.add_field(
            "search_text",
            DataType.VARCHAR,
            max_length=MAX_TEXT_BYTES,
            enable_analyzer=True,
            analyzer_params=_ANALYZER,
        )
        schema.add_field("dense", DataType.FLOAT_VECTOR, dim=dimension)
        schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        schema.add_function(
            Function(
                name="text_bm25",
                function_type=FunctionType.BM25,
                input_field_names=["search_text"],
                output_field_names=["sparse"],
            )
        )
        index = c.prepare_index_params()
        index.add_index("dense", index_type="AUTOINDEX", metric_type="COSINE")
        index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
        c.create_collection(CHUNKS, schema=schema, index_params=index)
    else:
        dense = next(
            (f for f in c.describe_collection(CHUNKS)["fields"] if f["name"] == "dense"), None
        )
        dim = (dense or {}).get("params", {}).get("dim")
        if dim is not None and int(dim) != dimension:
            raise InputError(
                f"the store {uri} holds {dim}-d vectors; this embedder makes {dimension}-d ones"
            )
    if not c.has_collection(DOCUMENTS):
        schema = c.create_schema(auto_id=False, description="lmstack document registry")
        schema.add_field("doc_id", DataType.VARCHAR, is_primary=True, max_length=MAX_META_BYTES)
        schema.add_field("title", DataType.VARCHAR, max_length=MAX_META_BYTES)
        schema.add_field("source", DataType.VARCHAR, max_length=MAX_META_BYTES * 4)
        schema.add_field("content_hash", DataType.VARCHAR, max_length=512)
        schema.add_field("version", DataType.VARCHAR, max_length=64)
        schema.add_field("chunks", DataType.INT64)
        schema.add_field("tokens", DataType.INT64)
        schema.add_field("added_at", DataType.DOUBLE)
        # Milvus needs a vector field in every collection; the registry's is unused.
        schema.add_field("unused", DataType.FLOAT_VECTOR, dim=2)
        index = c.prepare_index_params()
        index.add_index("unused", index_type="FLAT", metric_type="L2")
        c.create_collection(DOCUMENTS, schema=schema, index_params=index)
    for name in (CHUNKS, DOCUMENTS):
        c.load_collection(name)
