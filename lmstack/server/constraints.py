"""What a request constrains decoding with: OpenAI's `response_format`, vLLM's
`structured_outputs`, and OpenAI's `logit_bias`.

`response_format` (json_object, json_schema) and `structured_outputs` (exactly one of
`json`, `regex`, `choice`, `grammar` as Lark, or `json_object`, as vLLM's
StructuredOutputsParams names them) both become one engine StructuredOutput, labelled
with the request field it came from so a grammar that does not compile is a 400 naming
that field. Giving both is a 400: which one should win is not the server's guess.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmstack.engine.sampling_params import StructuredOutput
from lmstack.errors import InputError
from lmstack.server.fields import RequestModel


class JsonSchemaSpec(RequestModel):
    name: str | None = None
    description: str | None = None
    # `schema` shadows a BaseModel attribute, hence the alias.
    json_schema: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    def structured(self) -> StructuredOutput | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutput(json_object=True, label="response_format")
        if self.json_schema is None or self.json_schema.json_schema is None:
            raise InputError("response_format.json_schema.schema is required for type json_schema")
        return StructuredOutput(
            json_schema=self.json_schema.json_schema, label="response_format.json_schema.schema"
        )


class StructuredOutputs(RequestModel):
    """vLLM's `structured_outputs`: exactly one constraint. vLLM's tuning options
    (disable_any_whitespace, whitespace_pattern, ...) are not implemented: JSON is always
    compact here. An unknown key is a 400 naming it, like any other unknown field."""

    # `json` shadows a BaseModel method, hence the alias.
    json_schema: dict | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def structured(self) -> StructuredOutput:
        given = {
            "json": self.json_schema,
            "regex": self.regex,
            "choice": self.choice,
            "grammar": self.grammar,
            "json_object": self.json_object or None,
        }
        given = {key: value for key, value in given.items() if value is not None}
        if len(given) != 1:
            raise InputError(
                "structured_outputs needs exactly one of json, regex, choice, grammar, "
                f"json_object; got {sorted(given) or 'none'}"
            )
        ((key, value),) = given.items()
        field = "json_schema" if key == "json" else key
        return StructuredOutput(**{field: value}, label=f"structured_outputs.{key}")


def request_constraint(
    response_format: ResponseFormat | None, structured_outputs: StructuredOutputs | None
) -> StructuredOutput | None:
    """The one constraint a request asks for, or None."""
    from_format = response_format.structured() if response_format else None
    if structured_outputs is None:
        return from_format
    if from_format is not None:
        raise InputError(
            "response_format and structured_outputs both constrain the output: give one"
        )
    return structured_outputs.structured()


def parse_logit_bias(mapping: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias ({"token id": bias}) keyed by int; the engine checks the ids
    against the vocabulary and the biases against [-100, 100]."""
    if not mapping:
        return None
    bias = {}
    for key, value in mapping.items():
        text = key.strip()
        # JSON keys are strings: a token id is one spelled in decimal.
        if not (text.isascii() and text.isdigit()):
            raise InputError(f"logit_bias keys must be token ids (decimal integers), got {key!r}")
        bias[int(text)] = value
    return bias
