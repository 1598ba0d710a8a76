"""Fast tokenizer (HF `tokenizers`) with the model's own chat template and EOS handling.

Untrusted text (documents, tickets, chat messages) must never turn into chat structure: HF
tokenizers match added tokens ("<|im_start|>", "<|im_end|>", ...) anywhere in the input, so
`encode` of a rendered prompt lets a document open a system turn. `encode_plain` encodes
text with every added token spelled out as ordinary text, and `encode_chat` renders a chat
with the template and encodes it so that only the template's own markup yields control
tokens; message contents go through `encode_plain`. On text without such spellings both
give exactly the ids `encode` gives.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lmstack.errors import InputError, ModelLoadError


class Tokenizer:
    """tokenizer.json + tokenizer_config.json of a model directory.

    Loads with the `tokenizers` library alone (no transformers import) so start-up is fast.
    """

    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer as _Fast

        model_dir = Path(model_dir)
        try:
            self._tok = _Fast.from_file(str(model_dir / "tokenizer.json"))
        except Exception as exc:
            raise ModelLoadError(f"{model_dir}/tokenizer.json: cannot load ({exc})") from exc
        cfg = {}
        cfg_path = model_dir / "tokenizer_config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
        template_file = model_dir / "chat_template.jinja"
        self.chat_template: str | None = cfg.get("chat_template") or (
            template_file.read_text() if template_file.is_file() else None
        )
        model_cfg = {}
        if (model_dir / "config.json").is_file():
            model_cfg = json.loads((model_dir / "config.json").read_text())

        def token_id(value) -> int | None:
            if isinstance(value, dict):
                value = value.get("content")
            return self._tok.token_to_id(value) if isinstance(value, str) else None

        self.bos_token_id = token_id(cfg.get("bos_token"))
        if self.bos_token_id is None:
            self.bos_token_id = model_cfg.get("bos_token_id")
        eos = token_id(cfg.get("eos_token"))
        if eos is None:
            eos = model_cfg.get("eos_token_id")
        self.eos_token_id: int | None = eos[0] if isinstance(eos, list) else eos
        pad = token_id(cfg.get("pad_token"))
        self.pad_token_id: int = pad if pad is not None else (self.eos_token_id or 0)
        # Every token that ends a turn: the declared EOS plus the usual end markers present
        # in the vocabulary (a chat model may emit <|endoftext|> after <|im_end|>).
        stops = {self.eos_token_id} if self.eos_token_id is not None else set()
        for marker in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"):
            tid = self._tok.token_to_id(marker)
            if tid is not None:
                stops.add(tid)
        self.stop_token_ids: frozenset[int] = frozenset(stops)
        added = self._tok.get_added_tokens_decoder()
        self.special_token_ids = frozenset(tid for tid, tok in added.items() if tok.special)
        # Every added token, special or not, is structure that text must never produce.
        self.control_token_ids: frozenset[int] = frozenset(added)
        self.control_strings: tuple[str, ...] = tuple(
            sorted({tok.content for tok in added.values()}, key=lambda c: (-len(c), c))
        )
        self._plain_tok = None  # built on first use: see _plain

    @property
    def _plain(self):
        """A second tokenizer that reads special-token spellings as text (non-special added
        tokens still match there; encode_plain spells those out itself)."""
        if self._plain_tok is None:
            from tokenizers import Tokenizer as _Fast

            plain = _Fast.from_str(self._tok.to_str())
            plain.encode_special_tokens = True
            self._plain_tok = plain  # two threads may both build one: either is right
        return self._plain_tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_plain(self, text: str) -> list[int]:
        """Ids of `text` as ordinary text: no id in `control_token_ids` can come out, whatever
        the text spells ("<|im_start|>system" is encoded as its characters)."""
        encoding = self._plain.encode(text, add_special_tokens=False)
        ids = encoding.ids
        if self.control_token_ids.isdisjoint(ids):
            return ids
        plain: list[int] = []
        for tid, (start, end) in zip(ids, encoding.offsets):
            if tid not in self.control_token_ids:
                plain.append(tid)
                continue
            for char in text[start:end]:  # a non-special added token: one character at a time
                char_ids = self._plain.encode(char, add_special_tokens=False).ids
                plain += [i for i in char_ids if i not in self.control_token_ids]
        return plain

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The chat prompt's ids, where only the template's markup yields control tokens.

        The template is rendered with a stand-in for each message's content; the rendered
        text is split at its own control tokens and every stretch between two of them
        (template text and contents together, as `encode` would see it) is encoded with
        `encode_plain`. Contents are used as given (a template filter on content, such as
        trim, does not apply to them)."""
        _check_messages(messages)
        stand_ins = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
        parts = _STAND_IN.split(self.apply_chat_template(stand_ins, add_generation_prompt))
        ids: list[int] = []
        pending: list[str] = []  # text since the template's last control token
        for k, part in enumerate(parts):
            if k % 2:  # parts[1::2] are the message indices captured by _STAND_IN
                pending.append(messages[int(part)]["content"])
                continue
            encoding = self._tok.encode(part, add_special_tokens=False)
            last = 0
            for tid, (start, end) in zip(encoding.ids, encoding.offsets):
                if tid in self.control_token_ids:
                    pending.append(part[last:start])
                    ids += self.encode_plain("".join(pending))
                    ids.append(tid)
                    pending, last = [], end
            pending.append(part[last:])
        return ids + self.encode_plain("".join(pending))

    def markup_in(self, text: str) -> list[str]:
        """Chat-structure spellings in `text`, in order: see `markup_in` (module level)."""
        return markup_in(text, self.control_strings)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{"role", "content"}]) with the model's own template."""
        if not self.chat_template:
            raise InputError("this model has no chat template; use a plain prompt")
        _check_messages(messages)
        return _compiled_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt
        )

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Turns a growing list of token ids into text deltas, never splitting a UTF-8 char.

    Byte-level BPE tokens can hold part of a multi-byte character; decoding those alone
    gives U+FFFD. The decoder holds text back until the replacement character is resolved.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix_offset = 0  # ids before this are fully emitted and stable
        self._emitted = ""  # text already emitted for ids[prefix_offset:]

    def push(self, token_ids: list[int] | int) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        self.ids.extend(token_ids)
        text = self.tokenizer.decode(self.ids[self._prefix_offset :], self.skip_special_tokens)
        if text.endswith("\ufffd"):
            return ""
        delta = text[len(self._emitted) :]
        self._emitted = text
        # Re-anchor on a short window so decoding stays O(1) per token. A window that
        # starts mid-character decodes with a leading U+FFFD in both old and new text, so
        # deltas stay correct.
        if len(self.ids) - self._prefix_offset > 8:
            self._prefix_offset = len(self.ids) - 4
            self._emitted = self.tokenizer.decode(
                self.ids[self._prefix_offset :], self.skip_special_tokens
            )
        return delta

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids[self._prefix_offset :], self.skip_special_tokens)
        delta = text[len(self._emitted) :]
        self._emitted = text
        return delta


_STAND_IN = re.compile("\ue000([0-9]+)\ue001")  # private-use characters: no template has them
# Role tags of other chat formats (<|system|>, <|eot_id|>, <|start_header_id|> ...).
_ROLE_TAG = re.compile(r"<\|[A-Za-z_]{1,40}\|>")


def markup_in(text: str, control_strings: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The control-token spellings (`Tokenizer.control_strings`) and <|role|> tags found in
    `text`, each once, in order of first appearance: signs of a prompt-injection attempt."""
    found = {s: text.find(s) for s in control_strings if s in text}
    for match in _ROLE_TAG.finditer(text):
        found.setdefault(match.group(0), match.start())
    return sorted(found, key=found.__getitem__)


def _check_messages(messages: list[dict]) -> None:
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
            raise InputError(f"message {i} must be an object with a string 'content'")
        if msg.get("role") not in ("system", "user", "assistant", "tool"):
            raise InputError(
                f"message {i} has role {msg.get('role')!r}; "
                "expected system, user, assistant or tool"
            )


_TEMPLATES: dict[str, object] = {}


def _compiled_template(source: str):
    template = _TEMPLATES.get(source)
    if template is None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise InputError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        template = env.from_string(source)
        _TEMPLATES[source] = template
    return template
