"""More tool-call formats, beside tool_calls.py's (which imports this module, so they are registered in PARSERS and
`detect` knows them); each reads what vLLM's parser of the same name reads:

  phi4_mini_json  `functools[{"name": "f", "arguments": {...}}, ...]` (Phi-4-mini(-instruct), Phi-4-multimodal: their
                  template puts the tools in the system message between `<|tool|>` and `<|/tool|>`); text before the
                  marker is content, text after the list is dropped
  granite         `<|tool_call|>[{"name": "f", "arguments": {...}}, ...]` (IBM Granite 3.x; Granite 4 writes hermes
                  `<tool_call>` blocks). `<|tool_call|>` is a special token, dropped from the text unless special
                  tokens are kept: a JSON list of calls (each with "arguments") at the very start of the output is
                  read as calls too (as vLLM's granite parser does); text before an explicit `<|tool_call|>` is
                  content
  pythonic        `[get_weather(city="Paris"), add(a=1, b=2)]`, the whole output (maybe within Llama 4's
                  `<|python_start|>` / `<|python_end|>`): Python call syntax with keyword arguments whose values are
                  literals (read with `ast`, never evaluated; `true` / `false` / `null` read as JSON's). Llama 3.2
                  1B/3B, Llama 4 and Gemma 3 with a pythonic system prompt; detected only from a template that
                  spells the format out (`[func_name1(params_name1=params_value1...`), else chosen with the flag

The forced-call grammars write `functools[...]`, `<|tool_call|>[...]` (the compact JSON list of calls) and
`[name(key=value, ...)]` (each value as compact JSON of its parameter's schema, which parses as the literal it is;
the parameters in the schema's order, the required ones always, the others optional; a parameter whose name is no
Python identifier is left out, or refused (a 400 naming `tools`) when required).
"""
from __future__ import annotations

import ast
import json
import keyword
import warnings
from typing import Any, Optional, Sequence

from .tool_base import PARSERS, Parsed, ToolCall, ToolParser, _call, _call_schema, _content, _json_rule, _json_value

_ARGS_KEYS = ("arguments", "parameters")


def _json_list_calls(text: str, at: int, need_args: bool = False) -> Optional[tuple[list[ToolCall], int]]:
    """(the calls, the end) of a JSON list of call objects starting at `text[at]`; None when it is not one (invalid
    JSON, not a list, empty, an item that is not a call; `need_args`: an item without "arguments" or "parameters")."""
    try:
        obj, end = json.JSONDecoder().raw_decode(text, at)
    except ValueError:
        return None
    if not isinstance(obj, list) or not obj:
        return None
    if need_args and not all(isinstance(item, dict) and any(k in item for k in _ARGS_KEYS) for item in obj):
        return None
    calls = [_call(item, _ARGS_KEYS) for item in obj]
    return (calls, end) if all(calls) else None


def _json_list_grammar(prefix: str, tools: Sequence[dict], parallel: bool) -> str:
    """`prefix` then a JSON list of calls to the tools (one call unless parallel)."""
    items = {"anyOf": [_call_schema(t, "arguments", f"/items/anyOf/{i}") for i, t in enumerate(tools)]}
    array = {"type": "array", "items": items, "minItems": 1, **({} if parallel else {"maxItems": 1})}
    return "\n".join([f"start: {json.dumps(prefix)} calls", f"calls: {_json_rule(array)}"])


class Phi4MiniJsonParser(ToolParser):
    name = "phi4_mini_json"
    marker = "functools["

    def parse(self, text: str, tools: Optional[Sequence[dict]] = None) -> Parsed:
        first = text.find(self.marker)
        if first < 0:
            return Parsed(text, [])
        calls, at = [], first
        while text.startswith(self.marker, at):  # lists one after another: all calls (the rest is dropped)
            found = _json_list_calls(text, at + len(self.marker) - 1)
            if found is None:
                return Parsed(text, [])
            calls += found[0]
            at = found[1]
            while at < len(text) and text[at].isspace():
                at += 1
        return Parsed(_content(text[:first]), calls)

    def grammar(self, tools, parallel):
        return _json_list_grammar("functools", tools, parallel)


class _AtStart(ToolParser):
    """A format whose calls are the whole output, opened by one of `openings` (after whitespace)."""

    openings: tuple[str, ...] = ()

    def start(self, text: str) -> Optional[int]:
        stripped = text.lstrip()
        at = len(text) - len(stripped)
        return at if stripped.startswith(self.openings) else None

    def holdback(self, text: str) -> int:
        stripped = text.lstrip()
        if not stripped or any(o.startswith(stripped) for o in self.openings):  # whitespace, or an opening's start
            return len(text)
        return 0


class GraniteParser(_AtStart):
    name = "granite"
    marker = "<|tool_call|>"
    openings = ("[", "<|tool_call|>", "<tool_call>")

    def start(self, text: str) -> Optional[int]:
        at = super().start(text)
        if at is None and self.marker in text:
            return text.find(self.marker)
        return at

    def holdback(self, text: str) -> int:
        return super().holdback(text) or ToolParser.holdback(self, text)

    def parse(self, text: str, tools: Optional[Sequence[dict]] = None) -> Parsed:
        at = self.start(text)
        if at is None:
            return Parsed(text, [])
        body = text[at:]
        for opening in self.openings[1:]:
            body = body.removeprefix(opening)
        bare = body == text[at:]  # no marker: a JSON answer such as [{"name": "Ada"}] is no call
        body = body.lstrip()
        found = _json_list_calls(body, 0, need_args=bare) if body.startswith("[") else None
        if found is None or body[found[1]:].strip():  # not a list of calls, or words after it
            return Parsed(text, [])
        return Parsed(_content(text[:at]), found[0])

    def grammar(self, tools, parallel):
        return _json_list_grammar(self.marker, tools, parallel)


_JSON_NAMES = {"true": True, "false": False, "null": None}  # JSON's literals, which models write in Python calls too


def _literal(node: ast.expr, source: str) -> Any:
    """A keyword argument's value: JSON (what the forced-call grammar writes: `\\/` and all) or a Python literal; a
    ValueError for anything else (a name, a call, an expression)."""
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    segment = ast.get_source_segment(source, node)
    try:
        value = json.loads(segment)
    except (TypeError, ValueError, RecursionError):
        try:
            value = ast.literal_eval(node)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise ValueError("not a literal") from None
    if not _json_value(value):  # a set, bytes, a complex number, NaN
        raise ValueError("not JSON")
    return value


class PythonicParser(_AtStart):
    name = "pythonic"
    marker = "["
    openings = ("[", "<|python_start|>")

    def parse(self, text: str, tools: Optional[Sequence[dict]] = None) -> Parsed:
        source = text.strip().removeprefix("<|python_start|>").removesuffix("<|python_end|>").strip()
        if not source.startswith("["):
            return Parsed(text, [])
        try:
            with warnings.catch_warnings():  # a JSON string's `\/` is an invalid escape to Python: it warns
                warnings.simplefilter("ignore")
                tree = ast.parse(source, mode="eval")
        except (SyntaxError, ValueError, MemoryError, RecursionError):
            return Parsed(text, [])
        if not isinstance(tree.body, ast.List) or not tree.body.elts:
            return Parsed(text, [])
        calls = []
        for node in tree.body.elts:
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
                return Parsed(text, [])
            args = {}
            for kw in node.keywords:
                if kw.arg is None:  # **kwargs
                    return Parsed(text, [])
                try:
                    args[kw.arg] = _literal(kw.value, source)
                except ValueError:
                    return Parsed(text, [])
            calls.append(ToolCall(node.func.id, json.dumps(args, ensure_ascii=False)))
        return Parsed(None, calls)

    def grammar(self, tools, parallel):
        start = 'start: "[" call (", " call)* "]"' if parallel else 'start: "[" call "]"'
        rules = [start, f"call: {' | '.join(f'call_{i}' for i in range(len(tools)))}"]
        for i, t in enumerate(tools):
            fn = t["function"]
            if not _identifier(fn["name"]):
                _refuse(f"the name of function {fn['name']!r}")
            params = fn.get("parameters") or {}
            props = params.get("properties") or {}
            required = set(params.get("required") or ())
            defs = {k: params[k] for k in ("$defs", "definitions") if k in params}
            names = []
            for j, (key, schema) in enumerate(props.items()):
                if not _identifier(key):  # no keyword argument can name it: left out, or a 400 when required
                    if key in required:
                        _refuse(f"parameter {key!r} of function {fn['name']!r} (required)")
                    continue
                uses_defs = "$ref" in json.dumps(schema)
                rules.append(f"param_{i}_{j}: {json.dumps(key + '=')} value_{i}_{j}")
                rules.append(f"value_{i}_{j}: {_json_rule({**defs, **schema} if uses_defs else schema)}")
                names.append((f"param_{i}_{j}", key in required))
            arguments = _arguments(names)
            rules.append(f"call_{i}: {json.dumps(fn['name'] + '(')} {arguments + ' ' if arguments else ''}\")\"")
        return "\n".join(rules)


def _identifier(name: str) -> bool:
    """Whether `name` can be a call's name or a keyword argument's (`from=` cannot)."""
    return name.isidentifier() and not keyword.iskeyword(name)


def _refuse(what: str):
    """A 400 naming `tools`: `what` (a tool's name or parameter) cannot be written in the pythonic format."""
    from .structured import ConstraintError

    raise ConstraintError(f"tools: {what} cannot be written in the pythonic format (not a Python identifier)",
                          param="tools")


def _arguments(params: list[tuple[str, bool]]) -> str:
    """A Lark expression for the keyword arguments in order, separated by ", " (those marked True required, the
    others optional); "" when there are none, wrapped in `( )?` when there may be none."""
    def rest(j: int) -> str:  # the parameters from j on, after one already written: each with its comma
        return " ".join(f'", " {p}' if req else f'(", " {p})?' for p, req in params[j:])

    alternatives = []
    for j, (p, req) in enumerate(params):  # the first parameter written is the j-th
        alternatives.append(f"{p} {rest(j + 1)}".strip())
        if req:
            break
    else:  # every parameter optional: there may be none
        return f"({' | '.join(alternatives)})?" if alternatives else ""
    return f"({' | '.join(alternatives)})"


for _parser in (Phi4MiniJsonParser(), GraniteParser(), PythonicParser()):
    PARSERS[_parser.name] = _parser
