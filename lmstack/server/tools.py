"""Tool calling on /v1/chat/completions: the request fields, the prompt format, and the
grammar the calls are decoded under.

The bundled model's chat template (SmolLM2's ChatML) has no tool syntax, so lmstack uses
the Hermes / Qwen2.5 convention, written into the messages before the template renders
them (so it works with any template):

- the tools are listed in the system prompt, one JSON object per line inside
  `<tools></tools>`, with an instruction to answer a call as
  `<tool_call>\\n{"name":...,"arguments":{...}}\\n</tool_call>`;
- an assistant message with `tool_calls` renders its calls the same way, after its text;
- `tool` messages (consecutive ones together) render as one user turn, each result inside
  `<tool_response>\\n...\\n</tool_response>`.

Decoding: with `tool_choice` "required" the reply is one call (or, with
`parallel_tool_calls`, one or more, newline-separated), with a named function exactly one
call; the arguments follow the function's `parameters` schema, under a Lark grammar
(llguidance `%json`); "auto" allows either free text that never spells `<tool_call>`, or
text followed by calls; "none" leaves the tools out of the prompt and decodes plain text.
lmstack.server.tool_parser reads the calls back out of the text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

from lmstack.engine.grammar import canonical_schema, lark_json
from lmstack.engine.sampling_params import StructuredOutput
from lmstack.errors import InputError
from lmstack.server.fields import RequestModel

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
# OpenAI's rule for function names; it also keeps a name a plain JSON string in the grammar.
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# A function without `parameters` takes none (OpenAI: "an empty parameter list").
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


# ---------------------------------------------------------------------------- request fields


class FunctionDefinition(RequestModel):
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None  # calls always follow the schema here, strict or not


class Tool(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: FunctionName


class CalledFunction(RequestModel):
    name: str
    arguments: str = ""  # a JSON object as text, as OpenAI returns it


class MessageToolCall(RequestModel):
    """A call in an assistant message of the history."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


# ---------------------------------------------------------------------------- the plan


@dataclass
class ToolPlan:
    """How one request uses its tools: `mode` is "auto", "required" or "named"."""

    tools: list[Tool]
    mode: str
    callable: list[int]  # indices into tools that the grammar lets the model call
    parallel: bool

    def schema(self, index: int) -> dict:
        parameters = self.tools[index].function.parameters
        return NO_PARAMETERS if parameters is None else parameters

    def schema_constraints(self) -> list[StructuredOutput]:
        """Each callable function's schema alone, so one that does not compile is a 400
        naming that tool (the combined grammar would only say "tools")."""
        return [
            StructuredOutput(json_schema=self.schema(i), label=f"tools[{i}].function.parameters")
            for i in self.callable
        ]

    def structured(self) -> StructuredOutput:
        return StructuredOutput(grammar=self.lark(), label="tools")

    def lark(self) -> str:
        """The Lark grammar of the reply (see the module doc)."""
        if self.mode == "auto":
            lines = [
                "start: TEXT | head calls",
                "head[lazy]: TEXT OPEN",
                # Any text that never spells the opening tag; text then calls goes via head.
                f"TEXT: /(.|\\n)*/ & ~/(.|\\n)*{re.escape(CALL_OPEN)}(.|\\n)*/",
            ]
        else:
            lines = ["start: OPEN calls"]
        lines += [
            'calls: call ("\\n" OPEN call)*' if self.parallel else "calls: call",
            "call: " + " | ".join(f"call_{i}" for i in self.callable),
            f"OPEN: {json.dumps(CALL_OPEN)}",
        ]
        for i in self.callable:
            name = self.tools[i].function.name
            opening = json.dumps(f'\n{{"name":"{name}","arguments":')
            closing = json.dumps("}\n" + CALL_CLOSE)
            lines.append(f"call_{i}: {opening} args_{i} {closing}")
            lines.append(f"args_{i}: {lark_json(self.schema(i))}")
        return "\n".join(lines) + "\n"

    def system_text(self) -> str:
        """The tools block of the system prompt."""
        listed = "\n".join(
            json.dumps(tool.model_dump(mode="json", exclude_none=True), ensure_ascii=False)
            for tool in self.tools
        )
        if self.mode == "named":
            rule = f"Call the function {self.tools[self.callable[0]].function.name}."
        elif self.mode == "required":
            rule = "You must call a function."
        else:
            rule = "Call a function only when it helps; otherwise answer in text."
        if not self.parallel:
            rule += " Make one call at most."
        return (
            "# Tools\n\nYou may call functions to help with the user's request. Their "
            f"signatures are inside <tools></tools> XML tags:\n<tools>\n{listed}\n</tools>\n\n"
            "To call a function, write a JSON object with its name and arguments inside "
            f"{CALL_OPEN}{CALL_CLOSE} XML tags:\n{CALL_OPEN}\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n'
            f"{CALL_CLOSE}\n{rule}"
        )


def plan_tools(
    tools: list[Tool] | None,
    tool_choice: str | NamedToolChoice | None,
    parallel_tool_calls: bool,
    constrained: bool,
) -> ToolPlan | None:
    """The request's tool plan; None when no tool can be called (no tools, or "none").

    `constrained`: the request also has response_format or structured_outputs, which
    cannot hold at the same time as a call grammar. Raises InputError naming the field.
    """
    tools = tools or []
    names: dict[str, int] = {}
    for i, tool in enumerate(tools):
        name = tool.function.name
        if not NAME.fullmatch(name):
            raise InputError(
                f"tools[{i}].function.name must be 1-64 letters, digits, _ or -, got {name!r}"
            )
        if name in names:
            raise InputError(f"tools[{i}].function.name {name!r} repeats tools[{names[name]}]")
        names[name] = i
        if tool.function.parameters is not None:
            canonical_schema(tool.function.parameters, f"tools[{i}].function.parameters")
    choice = tool_choice if tool_choice is not None else ("auto" if tools else "none")
    if choice == "none":
        return None
    if not tools:
        raise InputError(f"tool_choice {_shown(choice)} needs tools: none were given")
    if constrained:
        raise InputError(
            f"tool_choice {_shown(choice)} cannot be combined with response_format or "
            'structured_outputs: a tool call has its own grammar (use tool_choice "none")'
        )
    if isinstance(choice, NamedToolChoice):
        index = names.get(choice.function.name)
        if index is None:
            raise InputError(
                f"tool_choice.function.name {choice.function.name!r} is not one of the tools "
                f"({', '.join(names)})"
            )
        # Exactly one call, whatever parallel_tool_calls says: OpenAI's forced function
        # and vLLM's named tool_choice both return one, and clients such as instructor
        # name a function without sending parallel_tool_calls (left true, a small model
        # repeats the call until max_tokens).
        return ToolPlan(tools, "named", [index], parallel=False)
    return ToolPlan(tools, choice, list(range(len(tools))), parallel_tool_calls)


def _shown(choice) -> str:
    return repr(choice) if isinstance(choice, str) else "(a named function)"


# ---------------------------------------------------------------------------- the prompt


def render_messages(messages: list, plan: ToolPlan | None) -> list[dict]:
    """The chat as the template's {"role", "content"} messages, tools written in (see the
    module doc). `messages` are protocol.ChatMessage."""
    out: list[dict] = []
    for i, message in enumerate(messages):
        rendered = message.as_template_message(i)
        if message.role == "tool":
            if not message.tool_call_id:
                raise InputError(f"messages[{i}].tool_call_id is required for role 'tool'")
            result = f"<tool_response>\n{rendered['content']}\n</tool_response>"
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + result
            else:
                out.append({"role": "user", "content": result, "tool_results": True})
            continue
        if message.tool_calls:
            if message.role != "assistant":
                raise InputError(f"messages[{i}].tool_calls: only assistant messages make calls")
            calls = [_call_text(i, j, call) for j, call in enumerate(message.tool_calls)]
            text = rendered["content"]
            rendered["content"] = (text + "\n" if text else "") + "\n".join(calls)
        out.append(rendered)
    for message in out:
        message.pop("tool_results", None)
    if plan is not None:
        block = plan.system_text()
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{block}" if out[0]["content"] else block
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def _call_text(i: int, j: int, call: MessageToolCall) -> str:
    """A call of the history in the format the grammar generates (compact JSON)."""
    where = f"messages[{i}].tool_calls[{j}].function.arguments"
    text = call.function.arguments.strip() or "{}"
    try:
        arguments = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where} is not valid JSON: {exc}") from exc
    body = json.dumps(
        {"name": call.function.name, "arguments": arguments},
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"
