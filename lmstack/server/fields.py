"""The base models of the OpenAI server's JSON bodies: null means "not set", and request
fields lmstack does not implement are refused.

A client that sends a field the server would silently ignore (`tools` to a server without
tool calling, `logit_bias` to one that does not bias) gets a plausible answer that is
quietly wrong. So every request model refuses unknown fields: pydantic's `extra="forbid"`,
which lmstack.httpapi.describe turns into "unsupported field 'foo'" (a 400 naming it). The
`--lenient` serve flag restores ignoring them: lmstack.httpapi.parse_body validates with
the context {"lenient": True}, and the validator below drops the unknown keys first.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationInfo, model_validator


class OpenAIModel(BaseModel):
    """Responses, and the base of requests: unknown fields ignored, null means default."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data):
        # Many clients send null for "not set", as OpenAI's API allows: the default applies.
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


class RequestModel(OpenAIModel):
    """A request body or part of one: unknown fields are a 400 unless the server is lenient.

    inf and nan pass every range check written as `low <= x` or `x > 0`: refused in every
    float field, naming the field.
    """

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _lenient_drops_unknown(cls, data, info: ValidationInfo):
        if isinstance(data, dict) and (info.context or {}).get("lenient"):
            known = cls.known_fields()
            return {key: value for key, value in data.items() if key in known}
        return data

    @classmethod
    def known_fields(cls) -> frozenset[str]:
        """Every key this model accepts: field names and their aliases."""
        names = set(cls.model_fields)
        names |= {f.alias for f in cls.model_fields.values() if f.alias}
        return frozenset(names)
