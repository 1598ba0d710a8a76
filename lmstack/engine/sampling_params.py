"""SamplingParams: how one request is decoded. Validated before it reaches the step loop."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lmstack.errors import InputError


@dataclass
class StructuredOutput:
    """One constraint: a JSON schema, any JSON object, a regex, a fixed choice, or a Lark
    grammar (llguidance's dialect). `label` is what error messages call it (the request
    field it came from, e.g. "structured_outputs.grammar"); it is not part of the grammar."""

    json_schema: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    label: str | None = field(default=None, compare=False)

    def kind(self) -> str:
        given = [
            name
            for name, value in (
                ("json_schema", self.json_schema),
                ("json_object", self.json_object or None),
                ("regex", self.regex),
                ("choice", self.choice),
                ("grammar", self.grammar),
            )
            if value is not None
        ]
        if len(given) != 1:
            raise InputError(
                f"structured output needs exactly one of json_schema, json_object, regex, "
                f"choice, grammar; got {given or 'none'}"
            )
        return given[0]

    @property
    def name(self) -> str:
        """The constraint as error messages name it."""
        return self.label or self.kind()


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # >1 discourages tokens already in prompt or output
    frequency_penalty: float = 0.0  # subtracts count * penalty from output tokens' logits
    presence_penalty: float = 0.0  # subtracts penalty once from every output token seen
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; N >= 0: chosen token's logprob + top-N
    structured: StructuredOutput | None = None
    # token id -> value added to its logit before sampling (OpenAI's logit_bias): -100
    # bans a token in effect, +100 forces it.
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    extra: dict = field(default_factory=dict)

    MAX_LOGPROBS = 20
    LOGIT_BIAS_RANGE = (-100.0, 100.0)  # OpenAI's

    def validate(self, max_model_len: int | None = None, vocab_size: int | None = None) -> None:
        """Raise InputError naming the value and the limit for anything out of range."""

        def number(name, value, kind=(int, float)):
            if isinstance(value, bool) or not isinstance(value, kind):
                raise InputError(f"{name} must be a number, got {value!r}")
            # inf and nan slip through every range check below (nan compares False).
            if isinstance(value, float) and not math.isfinite(value):
                raise InputError(f"{name} must be a finite number, got {value!r}")

        number("temperature", self.temperature)
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        number("top_k", self.top_k, int)
        if self.top_k < -1:
            raise InputError(f"top_k must be -1, 0 (disabled) or >= 1, got {self.top_k}")
        number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise InputError(f"min_p must be in [0, 1], got {self.min_p}")
        number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            number(name, value)
            if not -2 <= value <= 2:
                raise InputError(f"{name} must be in [-2, 2], got {value}")
        number("max_tokens", self.max_tokens, int)
        if self.max_tokens < 1:
            raise InputError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if max_model_len is not None and self.max_tokens > max_model_len:
            raise InputError(
                f"max_tokens {self.max_tokens} exceeds the context window of {max_model_len}"
            )
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise InputError(f"seed must be an integer, got {self.seed!r}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise InputError(f"seed {self.seed} is outside the 64-bit range [-2^63, 2^64)")
        if self.stop is not None:
            if isinstance(self.stop, str):
                self.stop = [self.stop]
            if not isinstance(self.stop, list) or not all(
                isinstance(s, str) and s for s in self.stop
            ):
                raise InputError(
                    f"stop must be a string or a list of non-empty strings, got {self.stop!r}"
                )
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids
            ):
                raise InputError(
                    f"stop_token_ids must be a list of integers, got {self.stop_token_ids!r}"
                )
            if vocab_size is not None:
                bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
                if bad:
                    raise InputError(
                        f"stop_token_ids {bad} outside the vocabulary [0, {vocab_size})"
                    )
        if self.logprobs is not None:
            number("logprobs", self.logprobs, int)
            if not 0 <= self.logprobs <= self.MAX_LOGPROBS:
                raise InputError(
                    f"logprobs must be in [0, {self.MAX_LOGPROBS}], got {self.logprobs}"
                )
        if self.logit_bias is not None:
            self._validate_logit_bias(vocab_size)
        if self.structured is not None:
            self.structured.kind()

    def _validate_logit_bias(self, vocab_size: int | None) -> None:
        if not isinstance(self.logit_bias, dict):
            raise InputError(
                f"logit_bias must be a map of token id to bias, got {self.logit_bias!r}"
            )
        low, high = self.LOGIT_BIAS_RANGE
        for token, bias in self.logit_bias.items():
            if isinstance(token, bool) or not isinstance(token, int):
                raise InputError(f"logit_bias keys must be token ids, got {token!r}")
            if vocab_size is not None and not 0 <= token < vocab_size:
                raise InputError(
                    f"logit_bias token id {token} is outside the vocabulary [0, {vocab_size})"
                )
            if isinstance(bias, bool) or not isinstance(bias, (int, float)):
                raise InputError(f"logit_bias[{token}] must be a number, got {bias!r}")
            if not (math.isfinite(bias) and low <= bias <= high):
                raise InputError(f"logit_bias[{token}] must be in [{low:g}, {high:g}], got {bias}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
