"""Structured output with llguidance: compile errors, masks, driving a matcher, end to end."""

from __future__ import annotations

import json
import time

import pytest
import torch

from lmstack.engine.grammar import GrammarCompiler, GrammarMatcher, allowed_mask, lark_json
from lmstack.engine.sampling_params import StructuredOutput
from lmstack.errors import InputError
from lmstack.model.tokenizer import Tokenizer
from lmstack.model.weights import resolve_model

VOCAB = 49152
EOS = 2  # <|im_end|> in SmolLM2's vocabulary

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age"],
}


@pytest.fixture(scope="module")
def model_dir():
    return resolve_model("bundled")


@pytest.fixture(scope="module")
def compiler(model_dir):
    return GrammarCompiler(model_dir, VOCAB)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return Tokenizer(model_dir)


def allowed_ids(matcher: GrammarMatcher) -> set[int]:
    return set(allowed_mask([matcher], VOCAB)[0].nonzero().flatten().tolist())


def drive(matcher: GrammarMatcher, ids: list[int]) -> None:
    """Feed `ids`, checking each one is allowed by the mask before it is accepted."""
    for t in ids:
        mask = allowed_mask([matcher], VOCAB)
        assert mask[0, t], f"token {t} not allowed"
        assert matcher.accept(t), matcher.error


def test_bad_schema_raises_input_error(compiler):
    with pytest.raises(InputError, match="json_schema does not compile"):
        compiler.compile(StructuredOutput(json_schema={"type": "nonsense"}))
    with pytest.raises(InputError, match="json_schema is not valid JSON"):
        compiler.compile(StructuredOutput(json_schema="{not json"))


def test_bad_regex_raises_input_error(compiler):
    with pytest.raises(InputError, match="regex does not compile"):
        compiler.matcher(StructuredOutput(regex="[a-"))


def test_bad_choice_and_ambiguous_constraint(compiler):
    with pytest.raises(InputError, match="choice"):
        compiler.compile(StructuredOutput(choice=[]))
    with pytest.raises(InputError, match="exactly one"):
        compiler.compile(StructuredOutput(regex="a", choice=["a"]))


def test_choice_lets_only_the_choices_through(compiler, tokenizer):
    choices = ["yes", "no", 'say "maybe" | (x)']
    matcher = compiler.matcher(StructuredOutput(choice=choices))
    ids = allowed_ids(matcher)
    assert ids and EOS not in ids
    for t in ids:
        text = tokenizer.decode([t])
        assert text and any(c.startswith(text) for c in choices), repr(text)
    for c in choices:
        assert tokenizer.encode(c)[0] in ids
    # A choice's metacharacters are literal: the whole string is accepted and then finishes.
    drive(matcher, tokenizer.encode(choices[2]))
    assert matcher.is_finished()


def test_json_matcher_follows_a_valid_document(compiler, tokenizer):
    text = '{"name":"Ann \\"A\\" Lee","age":42,"tags":["x","y z"]}'
    assert json.loads(text)["age"] == 42
    matcher = compiler.matcher(StructuredOutput(json_schema=PERSON))
    ids = tokenizer.encode(text)
    drive(matcher, ids[:-1])
    assert not matcher.is_finished()
    drive(matcher, ids[-1:])
    assert matcher.is_finished() and matcher.error is None
    assert allowed_ids(matcher) == {EOS}  # only EOS after a complete document


def test_json_grammar_has_no_free_whitespace(compiler, tokenizer):
    matcher = compiler.matcher(StructuredOutput(json_object=True))
    drive(matcher, tokenizer.encode('{"a":'))
    space = tokenizer.encode(" 1")[0]
    assert space not in allowed_ids(matcher)
    assert not matcher.accept(space)
    assert matcher.error and "\n" not in matcher.error
    assert not matcher.is_finished()


def test_regex_accepts_then_finishes_on_eos(compiler, tokenizer):
    matcher = compiler.matcher(StructuredOutput(regex=r"[0-9]{2,3}"))
    drive(matcher, tokenizer.encode("12"))
    assert not matcher.is_finished()  # a third digit may still come
    assert EOS in allowed_ids(matcher)
    assert matcher.accept(EOS) and matcher.is_finished()


def test_grammars_are_cached_by_canonical_form(compiler):
    a = compiler.compile(StructuredOutput(json_schema={"type": "object", "required": []}))
    b = compiler.compile(StructuredOutput(json_schema='{ "type" : "object",\n "required": [] }'))
    assert a is b
    # Property order is part of the grammar (it is the order properties are generated in).
    swapped = {"type": "object", "properties": dict(reversed(PERSON["properties"].items()))}
    assert compiler.compile(StructuredOutput(json_schema=swapped)) != compiler.compile(
        StructuredOutput(json_schema={"type": "object", "properties": PERSON["properties"]})
    )


def test_matcher_compiles_quickly(compiler):
    assert compiler.tokenizer is not None  # built once per compiler; not measured here
    schema = {
        "type": "object",
        "properties": {
            **{f"field_{i}": {"enum": [f"a{i}", f"b{i}", f"c{i}"]} for i in range(15)},
            "when": {"type": "string", "format": "date-time"},
            "items": {"type": "array", "items": PERSON},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["field_0", "when"],
    }
    start = time.perf_counter()
    matcher = compiler.matcher(StructuredOutput(json_schema=schema))
    allowed_mask([matcher], VOCAB)
    # Generous for a loaded CI machine; it takes a few milliseconds.
    assert time.perf_counter() - start < 2.0


def test_allowed_mask_rows():
    assert allowed_mask([None, None], VOCAB) is None


def test_allowed_mask_mixes_constrained_and_free_rows(compiler, tokenizer):
    matcher = compiler.matcher(StructuredOutput(choice=["red", "green"]))
    mask = allowed_mask([None, matcher, None], VOCAB + 64)  # logits padded past the vocab
    assert mask.shape == (3, VOCAB + 64) and mask.dtype == torch.bool
    assert mask[0].all() and mask[2].all()
    assert not mask[1, VOCAB:].any()
    assert set(mask[1].nonzero().flatten().tolist()) == allowed_ids(matcher)


@pytest.mark.slow
def test_end_to_end_json_with_the_real_model(model, compiler):
    jsonschema = pytest.importorskip("jsonschema")
    from lmstack.model.cache import DenseKVCache

    net, tok = model
    schema = {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 1000},
        },
        "required": ["color", "count"],
        "additionalProperties": False,
    }
    messages = [{"role": "user", "content": "Give a color and a count of apples as JSON."}]
    prompt = tok.encode(tok.apply_chat_template(messages))
    matcher = compiler.matcher(StructuredOutput(json_schema=json.dumps(schema)))
    cache = DenseKVCache(net.config, len(prompt) + 64, net.dtype)
    out: list[int] = []
    with torch.inference_mode():
        hidden = net(torch.tensor(prompt), torch.arange(len(prompt)), cache)
        for step in range(60):
            logits = net.compute_logits(hidden[-1:])
            mask = allowed_mask([matcher], logits.shape[-1])
            token = int(logits.masked_fill(~mask, float("-inf")).argmax(dim=-1))
            assert matcher.accept(token), matcher.error
            if token in tok.stop_token_ids:
                break
            out.append(token)
            if matcher.is_finished():  # the closing brace completes the document
                break
            position = torch.tensor([len(prompt) + step])
            hidden = net(torch.tensor([token]), position, cache)
    assert matcher.is_finished()
    document = json.loads(tok.decode(out))
    jsonschema.validate(document, schema)


def test_lark_grammar_constrains_and_bad_ones_name_their_field(compiler, tokenizer):
    grammar = 'start: "n=" NUM\nNUM: /[0-9]{1,3}/'
    matcher = compiler.matcher(StructuredOutput(grammar=grammar))
    drive(matcher, tokenizer.encode("n=42"))
    assert not matcher.accept(tokenizer.encode("x")[0])
    for bad in ("start: (", "start: undefined_rule"):
        with pytest.raises(InputError, match=r"^structured_outputs.grammar does not compile"):
            compiler.compile(StructuredOutput(grammar=bad, label="structured_outputs.grammar"))
    with pytest.raises(InputError, match="grammar must be a non-empty string"):
        compiler.compile(StructuredOutput(grammar=" "))


def test_lark_json_embeds_a_schema_with_compact_json(compiler, tokenizer):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    grammar = f'start: "<" args ">"\nargs: {lark_json(schema)}'
    matcher = compiler.matcher(StructuredOutput(grammar=grammar))
    drive(matcher, tokenizer.encode('<{"a":7}>'))
    spaced = compiler.matcher(StructuredOutput(grammar=grammar))
    drive(spaced, tokenizer.encode('<{"a"'))
    assert not allowed_mask([spaced], VOCAB)[0, tokenizer.encode(" :")[0]]


def test_allows_never_admits_a_token_the_mask_refuses(compiler, tokenizer):
    """The engine's greedy rows skip the mask when `allows` says the argmax is fine, so
    `allows` must imply the mask's bit, in every state: inside forced bytes (a key of a
    strict schema) any token spelling them validates, but the mask takes only the
    canonical one."""
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    matcher = compiler.matcher(StructuredOutput(json_schema=json.dumps(schema)))
    document = tokenizer.encode('{"name":"Anna","age":34}')
    checked = 0
    for t in document + [EOS]:
        mask = allowed_mask([matcher], VOCAB)[0]
        admitted = [c for c in range(VOCAB) if matcher.allows(c)]
        assert all(mask[c] for c in admitted), [c for c in admitted if not mask[c]][:5]
        checked += len(admitted)
        assert matcher.accept(t), matcher.error
    assert checked > 0 and matcher.is_finished()
