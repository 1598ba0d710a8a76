"""Structured output: JSON schema, any JSON object, regex, a fixed choice or a Lark grammar,
via llguidance.

`GrammarCompiler` turns a request's `StructuredOutput` into an llguidance grammar (validated
up front, so a bad schema is the user's InputError, not a failed request mid-stream) and
hands out one `GrammarMatcher` per request. Each decode step the engine asks
`allowed_mask` for a bool [B, V] mask that the sampler applies, then feeds the chosen token
back through `GrammarMatcher.accept`. Greedy rows skip the mask while the model's own
choice is one the grammar takes (`GrammarMatcher.allows`; see `sample_constrained`).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lmstack.engine.sampling_params import StructuredOutput
from lmstack.errors import InputError

if TYPE_CHECKING:
    import llguidance

# No free whitespace and compact separators: small models given the freedom to emit
# whitespace tend to ramble in it until max_tokens. `defaults` (not overrides) so a schema's
# own "x-guidance" options still win.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
_CACHE_SIZE = 256  # compiled grammars kept; the same few schemas serve many requests
# Chat models end a turn with these; the first one in the vocabulary is the grammar's EOS.
_EOS_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>")


def _one_line(message: str, limit: int = 400) -> str:
    text = re.sub(r"\s+", " ", message).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


class GrammarMatcher:
    """One request's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self._m = matcher
        self.vocab_size = vocab_size  # the grammar tokenizer's; the bitmask row is this wide

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed-token bits for the next step into int32 `bitmask[row]`."""
        if bitmask.dtype != torch.int32 or not bitmask.is_cpu or bitmask.dim() != 2:
            raise ValueError("bitmask must be a 2-D int32 CPU tensor")
        target = bitmask[row]
        if not target.is_contiguous() or target.numel() != (self.vocab_size + 31) // 32:
            raise ValueError(
                f"bitmask rows must be contiguous and {(self.vocab_size + 31) // 32} words wide"
            )
        # Raw pointer call rather than llguidance.torch, whose import pulls in torch.compile.
        self._m.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * 4)

    def allows(self, token_id: int) -> bool:
        """Whether this token is one the next mask would allow, without computing it or
        advancing (EOS included). Where the grammar forces bytes (a JSON key, a call's
        head), the mask allows only their canonical tokens while any token spelling the
        bytes would validate: there the answer is False, and the mask decides."""
        if self._m.compute_ff_tokens():
            return False
        return self._m.validate_tokens([int(token_id)]) == 1

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False when the grammar rejects it (error state)."""
        return bool(self._m.consume_token(int(token_id)))

    def is_finished(self) -> bool:
        """The grammar is complete and can take nothing but EOS: stop the request."""
        return bool(self._m.is_stopped()) and not self._m.is_error()

    @property
    def error(self) -> str | None:
        message = self._m.get_error()
        # llguidance appends a multi-line parser state dump; the first line says what failed.
        return message.splitlines()[0] if message else None


class GrammarCompiler:
    """Compiles StructuredOutput constraints against one model's tokenizer."""

    def __init__(self, model_dir: Path, vocab_size: int):
        self.model_dir = Path(model_dir)
        self.vocab_size = vocab_size
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[tuple[str, str], str] = OrderedDict()
        # Requests may be validated on a server thread while the step loop builds matchers.
        self._lock = threading.RLock()

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        # Built on first use (~1 s with the transformers import), so engines that never see
        # a structured request don't pay for it at start-up.
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = self._build_tokenizer()
            return self._ll_tokenizer

    def _build_tokenizer(self) -> llguidance.LLTokenizer:
        import llguidance.hf
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(tokenizer_file=str(self.model_dir / "tokenizer.json"))
        eos = None
        for marker in _EOS_MARKERS:
            tid = hf.convert_tokens_to_ids(marker)
            if isinstance(tid, int) and tid != hf.unk_token_id:
                eos = tid
                break
        if eos is None:
            eos = self._config_eos(hf)
        # The bitmask must span the model's logits, which may be padded past the tokenizer.
        n_vocab = max(self.vocab_size, len(hf))
        return llguidance.hf.from_tokenizer(hf, n_vocab=n_vocab, eos_token=eos)

    def _config_eos(self, hf) -> int | None:
        cfg_path = self.model_dir / "tokenizer_config.json"
        if not cfg_path.is_file():
            return None
        token = json.loads(cfg_path.read_text()).get("eos_token")
        if isinstance(token, dict):
            token = token.get("content")
        return hf.convert_tokens_to_ids(token) if isinstance(token, str) else None

    def compile(self, structured: StructuredOutput) -> str:
        """The llguidance grammar for `structured`; InputError when it does not compile."""
        kind = structured.kind()
        source = self._source(kind, structured)
        key = (kind, source)
        with self._lock:
            grammar = self._cache.get(key)
            if grammar is not None:
                self._cache.move_to_end(key)
                return grammar
        grammar = self._build_grammar(kind, source, structured.name)
        import llguidance

        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, self.tokenizer
        )
        if is_error:
            raise InputError(f"{structured.name} does not compile: {_one_line(messages[0])}")
        with self._lock:
            self._cache[key] = grammar
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar

    def matcher(self, structured: StructuredOutput) -> GrammarMatcher:
        import llguidance

        # log_level=0: a rejected token is reported through accept()/error, not stderr.
        m = llguidance.LLMatcher(self.tokenizer, self.compile(structured), log_level=0)
        if m.is_error():
            raise InputError(
                f"{structured.name} does not compile: {_one_line(m.get_error().splitlines()[0])}"
            )
        return GrammarMatcher(m, self.tokenizer.vocab_size)

    @staticmethod
    def _source(kind: str, structured: StructuredOutput) -> str:
        """A canonical string per constraint: the cache key and the compiler's input."""
        name = structured.name
        if kind == "json_schema":
            return canonical_schema(structured.json_schema, name)
        if kind == "json_object":
            return '{"type":"object"}'
        if kind in ("regex", "grammar"):
            text = getattr(structured, kind)
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"{name} must be a non-empty string, got {text!r}")
            return text
        choice = structured.choice
        if (
            not isinstance(choice, list)
            or not choice
            or not all(isinstance(c, str) for c in choice)
        ):
            raise InputError(f"{name} must be a non-empty list of strings, got {choice!r}")
        return json.dumps(choice)

    @staticmethod
    def _build_grammar(kind: str, source: str, name: str) -> str:
        import llguidance

        matcher = llguidance.LLMatcher
        try:
            if kind in ("json_schema", "json_object"):
                return matcher.grammar_from_json_schema(source, defaults=_JSON_OPTIONS)
            if kind == "regex":
                return matcher.grammar_from_regex(source)
            if kind == "grammar":
                return matcher.grammar_from_lark(source)
        except ValueError as exc:
            raise InputError(f"{name} does not compile: {_one_line(str(exc))}") from exc
        # Lark string literals take JSON escapes, so json.dumps quotes each choice exactly
        # (quotes, backslashes, regex metacharacters and non-ASCII all stay literal).
        alternatives = " | ".join(json.dumps(c) for c in json.loads(source))
        return matcher.grammar_from_lark(f"start: {alternatives}")


def canonical_schema(schema: dict | str | None, name: str = "json_schema") -> str:
    """A JSON schema (an object, or its JSON text) as compact JSON; InputError naming `name`."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise InputError(f"{name} is not valid JSON: {exc}") from exc
    if not isinstance(schema, dict):
        raise InputError(f"{name} must be a JSON object, got {type(schema).__name__}")
    # Key order is kept: llguidance emits properties in schema order, so two schemas that
    # differ only in order constrain generation differently.
    try:
        return json.dumps(schema, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} is not JSON-serialisable: {exc}") from exc


def lark_json(schema: dict) -> str:
    """`%json {schema}`: a JSON schema inside a Lark grammar, with the same compact JSON
    options as a json_schema constraint (a schema's own "x-guidance" options still win)."""
    options = {**_JSON_OPTIONS, **(schema.get("x-guidance") or {})}
    return "%json " + json.dumps({**schema, "x-guidance": options}, separators=(",", ":"))


def allowed_mask(matchers: list[GrammarMatcher | None], vocab_size: int) -> torch.Tensor | None:
    """Bool [B, vocab_size] of tokens each row may take next (True = allowed).

    None when no row is constrained, so an unconstrained batch costs nothing. Rows without a
    matcher are all True; constrained rows are False past the grammar tokenizer's vocabulary.
    """
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return None
    # llguidance insists on a row exactly as wide as its tokenizer's vocabulary.
    grammar_vocab = matchers[rows[0]].vocab_size
    bitmask = torch.full((len(rows), (grammar_vocab + 31) // 32), -1, dtype=torch.int32)
    for slot, row in enumerate(rows):
        matchers[row].fill_bitmask(bitmask, slot)
    # Token t is bit t % 32 of word t // 32; on a little-endian host that is bit t % 8 of
    # byte t // 8, which is exactly numpy's little-endian unpackbits order.
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
    bits = bits[:, : min(vocab_size, grammar_vocab)]
    mask = torch.ones((len(matchers), vocab_size), dtype=torch.bool)
    index = torch.tensor(rows) if len(rows) < len(matchers) else slice(None)
    mask[index, : bits.shape[1]] = torch.from_numpy(bits).view(torch.bool)
    # Logits columns beyond the grammar's vocabulary are no tokens it could ever accept.
    mask[index, bits.shape[1] :] = False
    return mask


def sample_constrained(sampler, logits: torch.Tensor, seqs: list, greedy_first: bool = True):
    """One token per row under each row's grammar (seq.matcher; None: free), as
    `sampler(logits, seqs, allowed_mask(...))` would choose it; returns (results, rows under
    a grammar, rows whose mask was computed).

    With `greedy_first`, a greedy row under a grammar takes its argmax unmasked first: when
    the grammar takes that token (a check of one token, microseconds), it is exactly the
    masked argmax too, and the mask (a pass over the whole vocabulary: ~0.9 ms per row for
    tools' "text or a call" grammar) is computed only for the rows it rejects. The same idea
    as llama.cpp's sampler; sampled rows keep the mask first, so a seeded draw never changes.
    """
    from lmstack.engine.sampler import GREEDY_BELOW

    matchers = [s.matcher for s in seqs]
    lazy = [
        m is not None and greedy_first and s.params.temperature < GREEDY_BELOW
        for s, m in zip(seqs, matchers)
    ]
    eager = [None if lz else m for m, lz in zip(matchers, lazy)]
    results = sampler(logits, seqs, allowed_mask(eager, logits.shape[1]))
    rejected = [i for i, r in enumerate(results) if lazy[i] and not matchers[i].allows(r.token_id)]
    if rejected:
        redo = sampler(
            logits[rejected],
            [seqs[i] for i in rejected],
            allowed_mask([matchers[i] for i in rejected], logits.shape[1]),
        )
        for i, result in zip(rejected, redo):
            results[i] = result
    rows = sum(m is not None for m in matchers)
    return results, rows, sum(m is not None for m in eager) + len(rejected)
