"""What every tool-call format shares (tool_calls.py's and tool_formats.py's): the parsed call and its OpenAI
shape, the parser's interface, the registry of parsers by name (`PARSERS`), and the JSON-schema helpers that
write a call's grammar. Its own module so that tool_formats.py can build on it while tool_calls.py imports
tool_formats.py to register its parsers (no import cycle)."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

PARSERS: dict[str, "ToolParser"] = {}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's function.arguments)
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Parsed:
    content: Optional[str]
    calls: list[ToolCall]


def _call(obj: Any, args_keys: Sequence[str]) -> Optional[ToolCall]:
    """A ToolCall from a decoded JSON call object, or None when it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _content(text: str) -> Optional[str]:
    return text if text.strip() else None


class ToolParser:
    """`parse(text, tools)`: the calls in a finished output (`tools`: the request's, or None). `start(text)`: where
    calls begin in a (partial) output, or None; `may_start(text)`: whether more text could still make `start` find
    one (streaming holds that text back). `grammar(tools, parallel)`: a Lark grammar (llguidance) whose every
    sentence parses as one call (or, parallel, one or more) to one of `tools`, with arguments matching the tool's
    `parameters` schema."""

    name = ""
    marker = ""  # the text a call starts with

    def parse(self, text: str, tools: Optional[Sequence[dict]] = None) -> Parsed:
        raise NotImplementedError

    def start(self, text: str) -> Optional[int]:
        at = text.find(self.marker)
        return None if at < 0 else at

    def holdback(self, text: str) -> int:
        """How many characters at the end of `text` could be the beginning of the marker."""
        for n in range(min(len(self.marker) - 1, len(text)), 0, -1):
            if self.marker.startswith(text[-n:]):
                return n
        return 0

    def grammar(self, tools: Sequence[dict], parallel: bool) -> str:
        raise NotImplementedError


def _json_rule(schema: dict) -> str:
    """A Lark rule body embedding a JSON schema (llguidance's %json), compact like structured.py's JSON."""
    return "%json " + json.dumps({**schema, "x-guidance": {"whitespace_flexible": False}})


# keywords whose value maps names to schemas, and keywords whose value is JSON data (not a schema)
_NAMED_SCHEMAS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_DATA = ("const", "enum", "default", "examples")


def _rebased(schema: Any, at: str) -> Any:
    """`schema` (a tool's parameters) to be embedded at JSON pointer `at` of a call's schema: its local `$ref`s
    ("#/$defs/X", "#") made to point where it now is, so its `$defs` still resolve (pydantic's nested models)."""
    if isinstance(schema, list):
        return [_rebased(s, at) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = "#" + at + value[1:]
        elif key in _DATA:
            out[key] = value
        elif key in _NAMED_SCHEMAS and isinstance(value, dict):
            out[key] = {name: _rebased(s, at) for name, s in value.items()}
        else:
            out[key] = _rebased(value, at)
    return out


def _call_schema(tool: dict, args_key: str, at: str = "") -> dict:
    """The JSON schema of one call object to `tool` (embedded at pointer `at` of the grammar's schema)."""
    fn = tool["function"]
    params = _rebased(fn.get("parameters") or {"type": "object"}, f"{at}/properties/{args_key}")
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, args_key: params},
            "required": ["name", args_key], "additionalProperties": False}


def _alternatives(tools: Sequence[dict], args_key: str) -> str:
    """Lark rules `call: call_0 | call_1 ...`, one per tool."""
    rules = [f"call: {' | '.join(f'call_{i}' for i in range(len(tools)))}"]
    rules += [f"call_{i}: {_json_rule(_call_schema(t, args_key))}" for i, t in enumerate(tools)]
    return "\n".join(rules)


def _json_value(value: Any) -> bool:
    """Whether `value` is writable as strict JSON (no NaN / Infinity, no sets or bytes)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return False
    return True
