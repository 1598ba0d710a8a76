"""Preference pairs and prompt sets: reading ShareGPT, Anthropic HH and plain JSONL files.

A `Pair` is a prompt (chat messages, so multi-turn contexts survive) with a chosen and a
rejected reply. Files are read record by record: a malformed record is reported with its
line number (JSONL) or record number (a JSON array), skipped and counted, never fatal, so
one bad line does not throw away a day of ratings. A pair whose chosen and rejected replies
are identical carries no preference and is refused the same way.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from lmstack.errors import InputError

ROLE_NAMES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "bot": "assistant",
}


@dataclass
class Pair:
    prompt: list[dict]  # chat messages ending with the user's turn
    chosen: str
    rejected: str
    source: str = ""  # "file:line" where it came from

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}


@dataclass
class ReadReport:
    """What reading a file kept and what it skipped, with where and why."""

    path: str
    kept: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (where, why)

    def summary(self) -> str:
        text = f"{self.path}: {self.kept} kept, {len(self.skipped)} skipped"
        for where, why in self.skipped[:20]:
            text += f"\n  {where}: {why}"
        if len(self.skipped) > 20:
            text += f"\n  ... and {len(self.skipped) - 20} more"
        return text


def _records(path: Path) -> list[tuple[str, object]]:
    """(where, parsed-or-error) for each record of a .json array or a JSON Lines file."""
    if not path.is_file():
        raise InputError(f"no such file: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON ({exc})") from exc
        return [(f"{path.name} record {i + 1}", rec) for i, rec in enumerate(data)]
    out: list[tuple[str, object]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{path.name}:{number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            out.append((f"{path.name}:{number}", ValueError(f"not valid JSON ({exc.msg})")))
    return out


def _text(value, what: str) -> str:
    if isinstance(value, dict):  # ShareGPT turn {"from": "gpt", "value": "..."}
        value = value.get("value", value.get("content"))
    if isinstance(value, list) and value and isinstance(value[-1], dict):  # [messages]
        value = value[-1].get("content", value[-1].get("value"))
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{what} is empty")
    return value


def _messages(turns, what: str) -> list[dict]:
    if isinstance(turns, str):
        if not turns.strip():
            raise ValueError(f"{what} is empty")
        return [{"role": "user", "content": turns}]
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{what} must be a non-empty list of turns or a string")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"{what}[{i}] must be an object")
        role = ROLE_NAMES.get(str(turn.get("from", turn.get("role", ""))).lower())
        content = turn.get("value", turn.get("content"))
        if role is None or not isinstance(content, str):
            raise ValueError(f"{what}[{i}] needs a known role (human/gpt/user/assistant/system)")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise ValueError(f"{what} must end with the user's turn")
    return messages


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh(transcript: str) -> tuple[list[dict], str]:
    """Anthropic HH: the prompt is everything before the last "Assistant:", the reply after."""
    cut = transcript.rfind("\n\nAssistant:")
    if cut < 0:
        cut = transcript.rfind("Assistant:")
        if cut < 0:
            raise ValueError('transcript has no "Assistant:" turn')
    head = transcript[:cut]
    reply = transcript[cut:].split("Assistant:", 1)[1].strip()
    parts = _HH_TURN.split("\n\n" + head.lstrip("\n"))
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        messages.append({"role": role, "content": content.strip()})
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("transcript has no Human turn before the last Assistant turn")
    return messages, reply


def parse_pair(record, where: str) -> Pair:
    """One record in any supported format; raises ValueError saying what is wrong."""
    if isinstance(record, Exception):
        raise record
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "chosen" not in record or "rejected" not in record:
        raise ValueError("needs 'chosen' and 'rejected'")
    if "conversations" in record:  # ShareGPT / LLaMA-Factory
        prompt = _messages(record["conversations"], "conversations")
        chosen, rejected = _text(record["chosen"], "chosen"), _text(record["rejected"], "rejected")
    elif "prompt" in record:  # plain JSONL
        prompt = _messages(record["prompt"], "prompt")
        chosen, rejected = _text(record["chosen"], "chosen"), _text(record["rejected"], "rejected")
    else:  # Anthropic HH: two full transcripts that share everything but the last reply
        if not isinstance(record["chosen"], str) or not isinstance(record["rejected"], str):
            raise ValueError("HH records need 'chosen' and 'rejected' transcripts as strings")
        prompt, chosen = parse_hh(record["chosen"])
        prompt_r, rejected = parse_hh(record["rejected"])
        if prompt_r != prompt:
            raise ValueError("chosen and rejected transcripts have different prompts")
        if not chosen or not rejected:
            raise ValueError("a final Assistant reply is empty")
    if chosen.strip() == rejected.strip():
        raise ValueError("chosen and rejected are identical (no preference)")
    return Pair(prompt=prompt, chosen=chosen, rejected=rejected, source=where)


def load_pairs(path: str | Path) -> tuple[list[Pair], ReadReport]:
    """Every valid pair in `path` and a report of what was skipped (line numbers, reasons)."""
    path = Path(path)
    report = ReadReport(str(path))
    pairs = []
    for where, record in _records(path):
        try:
            pairs.append(parse_pair(record, where))
        except ValueError as exc:
            report.skipped.append((where, str(exc)))
    report.kept = len(pairs)
    if not pairs:
        raise InputError(f"{path}: no valid preference pairs\n{report.summary()}")
    return pairs, report


def write_pairs(pairs: list[Pair], path: str | Path) -> None:
    """Pairs as plain JSONL ({"prompt": messages, "chosen", "rejected"}), written atomically."""
    lines = [json.dumps(p.to_json(), ensure_ascii=False) for p in pairs]
    atomic_write(Path(path), "\n".join(lines) + "\n")


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


@dataclass
class PromptItem:
    id: str
    messages: list[dict]
    fields: dict = field(default_factory=dict)  # other columns (for stratified splits)

    @property
    def text(self) -> str:
        return self.messages[-1]["content"]


def load_prompts(path: str | Path) -> tuple[list[PromptItem], ReadReport]:
    """Prompts from JSONL ({"prompt": str|messages, "id"?, ...}), a .txt file (one per line)
    or a preference file (its prompts). An empty set is an error."""
    path = Path(path)
    report = ReadReport(str(path))
    items: list[PromptItem] = []
    if path.suffix == ".txt":
        if not path.is_file():
            raise InputError(f"no such file: {path}")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                items.append(PromptItem(f"p{number}", [{"role": "user", "content": line.strip()}]))
    else:
        for i, (where, record) in enumerate(_records(path)):
            try:
                if isinstance(record, Exception):
                    raise record
                if not isinstance(record, dict):
                    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
                if "conversations" in record:
                    messages = _messages(record["conversations"], "conversations")
                elif "prompt" in record:
                    messages = _messages(record["prompt"], "prompt")
                elif "chosen" in record and isinstance(record["chosen"], str):
                    messages, _ = parse_hh(record["chosen"])
                else:
                    raise ValueError("needs 'prompt' (or 'conversations')")
                extra = {
                    k: v
                    for k, v in record.items()
                    if k not in ("prompt", "conversations", "chosen", "rejected", "id")
                    and isinstance(v, str | int | float | bool)
                }
                items.append(PromptItem(str(record.get("id", f"p{i + 1}")), messages, extra))
            except ValueError as exc:
                report.skipped.append((where, str(exc)))
    report.kept = len(items)
    if not items:
        raise InputError(f"{path}: the prompt set is empty (no usable prompts)")
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise InputError(f"{path}: prompt ids are not unique")
    return items, report
