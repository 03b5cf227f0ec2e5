"""Tool calls: one parser per chat-template family, turning model output into OpenAI `tool_calls`, and the grammar
that enforces a call (tool_choice "required" or a named function) through the structured-output mask.

Formats (what the models are trained to write, and what vLLM's parsers of the same names read):
  hermes       `<tool_call>{"name": "f", "arguments": {...}}</tool_call>`, one block per call (Qwen2.5, Qwen3,
               Hermes 2/3; whitespace inside the tags is free)
  llama3_json  the whole output is `{"name": "f", "parameters": {...}}` (or "arguments"), several joined by ";",
               optionally after `<|python_tag|>` (Llama 3.1 / 3.2 / 3.3 JSON tool calling)
  mistral      `[TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]` (Mistral / Mixtral instruct v3+, Nemo), or
               `[TOOL_CALLS]f[ARGS]{...}` per call (tokenizer v11+: Mistral Small 3.2, Magistral, Devstral,
               Ministral 3; its template writes `'[TOOL_CALLS]' + name + '[ARGS]' + arguments`)
  qwen3_coder  `<tool_call>\n<function=f>\n<parameter=p>\nvalue\n</parameter>\n...</function>\n</tool_call>`, one
               block per call (Qwen3-Coder, Qwen3.5): each value is raw text (one leading and one trailing newline
               dropped), converted by the tool's schema for that parameter (`parse(text, tools)`: a string stays
               text; integer / number / boolean / null / object / array, and a $ref or anyOf without a string
               among them, are parsed, the text kept where that fails; with no tools, or a parameter the schema
               does not declare, every value is text)

Which one a server uses: `--tool-call-parser NAME`, else `detect(template)` on the chat template's text:
`<tool_call>` with `<function=` -> qwen3_coder, `<tool_call>` alone -> hermes, `[TOOL_CALLS]` -> mistral (its grammar
writing the `[ARGS]` form when the template has `[ARGS]`), `<|tool|>` or `functools[` -> phi4_mini_json,
`<|tool_call|>` -> granite, `[func_name1(` (the pythonic format spelled out) -> pythonic, `<|python_tag|>` or an
`ipython` role with a "parameters" object -> llama3_json; none of these: tool calls are refused (400) until the flag
names a parser. phi4_mini_json, granite and pythonic live in tool_formats.py (imported below: it registers them).

Parsing is all or nothing: when every call block parses (as JSON with a string `name` and an object of arguments;
qwen3_coder: a `<function=name>` with its parameters), the calls are returned and `content` is the text before the
first call (None when that is only whitespace; text after the calls is dropped, as vLLM's parsers do); otherwise (an
unterminated block, invalid JSON, a call with no name) the whole output is returned as content, unchanged, and there
are no calls. `parse(text, tools)`: the request's tools (only qwen3_coder reads them, for its values' types).
"""
from __future__ import annotations

import ast
import json
import math
import re
from typing import Any, Optional, Sequence

from .tool_base import (PARSERS, Parsed, ToolCall, ToolParser, _alternatives, _call, _call_schema,  # noqa: F401
                        _content, _json_rule, _json_value, _rebased, new_call_id)


class HermesParser(ToolParser):
    """Calls in `<tool_call>` blocks, each block a JSON call; `_block_calls` reads one block (Qwen3CoderParser reads
    XML there instead)."""

    name = "hermes"
    marker = "<tool_call>"
    _block = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)

    def _block_calls(self, block: str, tools: Optional[Sequence[dict]]) -> Optional[list[ToolCall]]:
        """The calls in one block's text, or None when it does not parse."""
        try:
            call = _call(json.loads(block.strip()), ("arguments", "parameters"))
        except ValueError:
            return None
        return None if call is None else [call]

    def parse(self, text: str, tools: Optional[Sequence[dict]] = None) -> Parsed:
        first = text.find(self.marker)
        if first < 0:
            return Parsed(text, [])
        calls = []
        rest = text[first:]
        for m in self._block.finditer(rest):
            found = self._block_calls(m.group(1), tools)
            if found is None:
                return Parsed(text, [])
            calls += found
        # an unterminated block (an opening tag after the last closed one) makes the output plain text
        tail = self._block.sub("", rest)
        if not calls or self.marker in tail:
            return Parsed(text, [])
        return Parsed(_content(text[:first]), calls)

    def grammar(self, tools, parallel):
        block = 'block: "<tool_call>\\n" call "\\n</tool_call>"'
        start = 'start: block ("\\n" block)*' if parallel else "start: block"
        return "\n".join([start, block, _alternatives(tools, "arguments")])


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    marker = "<|python_tag|>"

    def start(self, text: str) -> Optional[int]:
        stripped = text.lstrip()
        at = len(text) - len(stripped)
        return at if stripped.startswith(("{", self.marker)) else None

    def holdback(self, text: str) -> int:
        stripped = text.lstrip()
        if not stripped or self.marker.startswith(stripped):  # only whitespace so far, or the tag's beginning
            return len(text)
        return 0

    def parse(self, text: str, tools: Optional[Sequence[dict]] = None) -> Parsed:
        at = self.start(text)
        if at is None:
            return Parsed(text, [])
        body = text[at:].removeprefix(self.marker).strip()
        decoder, calls, i = json.JSONDecoder(), [], 0
        while i < len(body):
            try:
                obj, i = decoder.raw_decode(body, i)
            except ValueError:
                return Parsed(text, [])
            call = _call(obj, ("parameters", "arguments"))
            if call is None:
                return Parsed(text, [])
            calls.append(call)
            while i < len(body) and body[i] in " \t\r\n;":
                i += 1
        if not calls:
            return Parsed(text, [])
        return Parsed(_content(text[:at]), calls)

    def grammar(self, tools, parallel):
        start = 'start: call ("; " call)*' if parallel else "start: call"
        return "\n".join([start, _alternatives(tools, "parameters")])


class MistralParser(ToolParser):
    """Both of Mistral's forms parse; `args_form` (a template writing `[ARGS]`): the grammar writes that form."""

    name = "mistral"
    marker = "[TOOL_CALLS]"
    # tokenizer v11+: `name[ARGS]{...}` after each marker (Magistral may put `[CALL_ID]id` before `[ARGS]`)
    _named = re.compile(r"\s*([A-Za-z0-9_.\-]+)(?:\[CALL_ID\][A-Za-z0-9]+)?\[ARGS\]")

    def __init__(self, args_form: bool = False):
        self.args_form = args_form

    def parse(self, text: str, tools: Optional[Sequence[dict]] = None) -> Parsed:
        first = text.find(self.marker)
        if first < 0:
            return Parsed(text, [])
        decoder, calls = json.JSONDecoder(), []
        for part in text[first:].split(self.marker)[1:]:  # each marker opens a JSON list of calls (or one call)
            named = self._named.match(part)
            try:
                if named:  # `name[ARGS]{...}`: the arguments object
                    obj = {"name": named.group(1), "arguments": decoder.raw_decode(part, named.end())[0]}
                else:
                    obj, end = decoder.raw_decode(part.strip())
            except ValueError:
                return Parsed(text, [])
            for item in obj if isinstance(obj, list) else [obj]:
                call = _call(item, ("arguments", "parameters"))
                if call is None:
                    return Parsed(text, [])
                calls.append(call)
        if not calls:
            return Parsed(text, [])
        return Parsed(_content(text[:first]), calls)

    def grammar(self, tools, parallel):
        if self.args_form:  # `[TOOL_CALLS]name[ARGS]{...}`, one per call
            start = 'start: block+' if parallel else "start: block"
            rules = [start, 'block: "[TOOL_CALLS]" call', f"call: {' | '.join(f'call_{i}' for i in range(len(tools)))}"]
            for i, t in enumerate(tools):
                fn = t["function"]
                rules += [f"call_{i}: {json.dumps(fn['name'] + '[ARGS]')} args_{i}",
                          f"args_{i}: {_json_rule(fn.get('parameters') or {'type': 'object'})}"]
            return "\n".join(rules)
        # the list's items: any tool's call; one item unless parallel
        items = {"anyOf": [_call_schema(t, "arguments", f"/items/anyOf/{i}") for i, t in enumerate(tools)]}
        array = {"type": "array", "items": items, "minItems": 1, **({} if parallel else {"maxItems": 1})}
        return "\n".join(['start: "[TOOL_CALLS]" calls', f"calls: {_json_rule(array)}"])


# qwen3_coder: what a parameter's schema says its value is (vLLM's type names included: "int", "float", "dict"...)
_TEXT_TYPES = {"string", "str", "text", "varchar", "char", "enum"}


def _deref(schema: Any, root: Any) -> Any:
    """`schema` with a local `$ref` ("#/$defs/Addr") followed within `root` (the tool's parameters)."""
    for _ in range(8):  # a chain of refs, never a cycle
        ref = schema.get("$ref") if isinstance(schema, dict) else None
        if not (isinstance(ref, str) and ref.startswith("#")):
            break
        target = root
        for part in ref[1:].split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                target = target.get(part) if isinstance(target, dict) else None
        if not isinstance(target, dict):
            break
        schema = target
    return schema


def _value_kind(schema: Any, root: Any = None, depth: int = 0) -> str:
    """"text" (the value stays as written: a string, no type, or a type list with a string), "integer", "number",
    "boolean", or "json" (object, array, null, a type list without string: JSON, else a Python literal). A schema
    without a type has its `$ref` followed in `root` and its anyOf / oneOf / allOf or enum read (pydantic writes
    Optional[int] as anyOf integer / null, a nested model as a $ref): text only when a string fits."""
    schema = _deref(schema, root)
    if not isinstance(schema, dict) or depth > 8:
        return "text"
    if "type" not in schema:
        for key in ("anyOf", "oneOf", "allOf"):
            if isinstance(schema.get(key), list) and schema[key]:
                kinds = [_value_kind(b, root, depth + 1) for b in schema[key]]
                text = "text" in kinds if key != "allOf" else all(k == "text" for k in kinds)
                return "text" if text else "json"
        values = [schema["const"]] if "const" in schema else schema.get("enum")
        if isinstance(values, list) and values:
            return "text" if all(isinstance(v, str) for v in values) else "json"
        return "json" if "properties" in schema or "items" in schema else "text"
    types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    names = {str(t).strip().lower() for t in types}
    if not names or names & _TEXT_TYPES:
        return "text"
    if len(names) == 1:
        name = next(iter(names))
        if name.startswith(("int", "uint", "long", "short", "unsigned")):
            return "integer"
        if name.startswith(("num", "float")):
            return "number"
        if name in ("boolean", "bool", "binary"):
            return "boolean"
    return "json"


_INTEGER = re.compile(r"[-+]?[0-9]+")
_NUMBER = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


def _int(text: str) -> Optional[int]:
    """An integer literal's value (None: not one, or past Python's digit limit for int())."""
    try:
        return int(text) if _INTEGER.fullmatch(text) else None
    except ValueError:
        return None


def _convert(raw: str, schema: Any, root: Any = None) -> Any:
    """A parameter's value, by its schema (vLLM's qwen3_coder conversion: a value that does not parse as the type
    stays the text; unlike vLLM, a string parameter written `null` stays "null" and a boolean that is neither true
    nor false stays text rather than becoming false)."""
    kind = _value_kind(schema, root)
    if kind == "text":
        return raw
    text = raw.strip()
    if text.lower() == "null":
        return None
    if kind in ("integer", "number"):
        whole = _int(text)
        if whole is not None:
            return whole
        if kind == "integer" or not _NUMBER.fullmatch(text):
            return raw
        number = float(text)
        if not math.isfinite(number):
            return raw
        return int(number) if number.is_integer() else number  # 3.0 -> 3, as vLLM does
    if kind == "boolean":
        return text.lower() == "true" if text.lower() in ("true", "false") else raw
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        try:  # the template writes a list argument as Python does (`['a', 'b']`), True / False too
            value = ast.literal_eval(text)
        except Exception:  # noqa: BLE001 (SyntaxError, ValueError, MemoryError, RecursionError...)
            return raw
    return value if _json_value(value) else raw


def _parameters(tools: Optional[Sequence[dict]], name: str) -> tuple[dict, dict]:
    """(`parameters.properties`, `parameters`) of the tool called `name` ({} when there is none)."""
    for tool in tools or ():
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and fn.get("name") == name:
            params = fn.get("parameters") if isinstance(fn.get("parameters"), dict) else {}
            props = params.get("properties")
            return (props if isinstance(props, dict) else {}), params
    return {}, {}


_PARAM_CLOSE = "\n</parameter>\n"
# The tags the parser ends a value (or its call) at: a text value may hold any other text, `<` included
_CLOSING_TAGS = ("</parameter>", "<parameter=", "</function>", "</tool_call>")
_NO_CLOSING_TAG = "~/(?s:.*)(" + "|".join(re.escape(t).replace("/", "\\/") for t in _CLOSING_TAGS) + ")(?s:.*)/"


def _text_value_rule(schema: Any) -> str:
    """A text parameter's value and the parameter's closing tag, as one terminal's body (a value regex then a literal
    would be lexed greedily: the value would take the newline before `</parameter>`). Any text without one of the
    closing tags (`<` is fine), so the parser ends the value where the grammar does; an enum (or const) of strings as
    its choices, min/maxLength as a bound."""
    schema = schema if isinstance(schema, dict) else {}
    choices = [schema["const"]] if "const" in schema else schema.get("enum")
    if isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices):
        return " | ".join(json.dumps(c + _PARAM_CLOSE) for c in choices)
    low, high = schema.get("minLength"), schema.get("maxLength")
    low = low if isinstance(low, int) and low > 0 else 0
    if isinstance(high, int) and high >= low:
        repeat = f"{{{low},{high}}}"
    else:
        repeat = f"{{{low},}}"
    return f"(/(?s:.){repeat}/ & {_NO_CLOSING_TAG}) {json.dumps(_PARAM_CLOSE)}"


def _text_schema(schema: Any, root: dict) -> Any:
    """The string schema a text value follows: of an anyOf / oneOf (Optional[str]), its first text branch, so its
    enum and lengths still bound the value."""
    schema = _deref(schema, root)
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key) if isinstance(schema, dict) and "type" not in schema else None
        for branch in branches if isinstance(branches, list) else ():
            if _value_kind(branch, root) == "text":
                return _deref(branch, root)
    return schema


class Qwen3CoderParser(HermesParser):
    """Qwen3-Coder's XML calls, in Hermes's `<tool_call>` blocks (read by HermesParser.parse). Within a block each
    `<function=name>` (to `</function>`, or to the block's end) is a call, and each `<parameter=key>` in it (to
    `</parameter>`, the next `<parameter=`, or the function's end) one argument, as vLLM reads them."""

    name = "qwen3_coder"
    _function = re.compile(r"<function=(.*?)(?:</function>|\Z)", re.DOTALL)
    _parameter = re.compile(r"<parameter=(.*?)(?:</parameter>|(?=<parameter=)|\Z)", re.DOTALL)

    def _block_calls(self, block: str, tools: Optional[Sequence[dict]]) -> Optional[list[ToolCall]]:
        calls = []
        for function in self._function.findall(block):
            name, sep, body = function.partition(">")
            name = name.strip()
            if not sep or not name:
                return None
            (props, params), args = _parameters(tools, name), {}
            for parameter in self._parameter.findall(body):
                key, sep, value = parameter.partition(">")
                if not sep:
                    return None
                args[key] = _convert(value.removeprefix("\n").removesuffix("\n"), props.get(key), params)
            calls.append(ToolCall(name, json.dumps(args, ensure_ascii=False)))
        return calls or None

    def grammar(self, tools, parallel):
        """Each call as the template writes it: the parameters in the schema's order, the required ones always, the
        others optional; a text parameter as text without a closing tag, any other through %json with its schema
        (and the parameters' $defs, which its $refs name)."""
        start = 'start: block ("\\n" block)*' if parallel else "start: block"
        rules = [start, 'block: "<tool_call>\\n<function=" call "</function>\\n</tool_call>"',
                 f"call: {' | '.join(f'call_{i}' for i in range(len(tools)))}"]
        for i, t in enumerate(tools):
            fn = t["function"]
            params = fn.get("parameters") or {}
            props = params.get("properties") or {}
            required = set(params.get("required") or ())
            defs = {k: params[k] for k in ("$defs", "definitions") if k in params}
            body = [json.dumps(fn["name"] + ">\n")]
            for j, (key, schema) in enumerate(props.items()):
                opening = json.dumps(f"<parameter={key}>\n")
                if _value_kind(schema, params) == "text":
                    rules.append(f"param_{i}_{j}: {opening} VALUE_{i}_{j}")  # a terminal: `&` and `~` need one
                    rules.append(f"VALUE_{i}_{j}: {_text_value_rule(_text_schema(schema, params))}")
                else:
                    rules.append(f"param_{i}_{j}: {opening} value_{i}_{j} {json.dumps(_PARAM_CLOSE)}")
                    uses_defs = "$ref" in json.dumps(schema)  # the $defs only where a $ref may need them
                    rules.append(f"value_{i}_{j}: {_json_rule({**defs, **schema} if uses_defs else schema)}")
                body.append(f"param_{i}_{j}" + ("" if key in required else "?"))
            rules.append(f"call_{i}: {' '.join(body)}")
        return "\n".join(rules)


for _parser in (HermesParser(), Llama3JsonParser(), MistralParser(), Qwen3CoderParser()):
    PARSERS[_parser.name] = _parser
_MISTRAL_ARGS = MistralParser(args_form=True)  # detected from a template writing `[ARGS]`
from . import tool_formats  # noqa: E402,F401  (phi4_mini_json, granite, pythonic: registers them in PARSERS)


def get_parser(name: str) -> ToolParser:
    try:
        return PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; one of {', '.join(PARSERS)}") from None


def detect(template: Optional[str]) -> Optional[ToolParser]:
    """The parser for a chat template's tool-call format, from the template's text (None: no known format)."""
    if not template:
        return None
    if "<tool_call>" in template:  # Qwen3-Coder / Qwen3.5 write XML calls: their templates show `<function=`
        return PARSERS["qwen3_coder" if "<function=" in template else "hermes"]
    if "[TOOL_CALLS]" in template:
        return _MISTRAL_ARGS if "[ARGS]" in template else PARSERS["mistral"]
    if "<|tool|>" in template or "functools[" in template:  # Phi-4-mini: the tools between <|tool|> and <|/tool|>
        return PARSERS["phi4_mini_json"]
    if "<|tool_call|>" in template:  # Granite 3.x (Granite 4's `<tool_call>` is hermes, above)
        return PARSERS["granite"]
    if "[func_name1(" in template:  # a template spelling out the pythonic format (Llama 3.2 / 4, Gemma 3)
        return PARSERS["pythonic"]
    if "<|python_tag|>" in template or ("ipython" in template and '"parameters"' in template):
        return PARSERS["llama3_json"]
    return None


class ToolStream:
    """Streams one choice's output: text before a call streams as content; from the call's marker on, the text is
    held and parsed when the output ends (then emitted as tool calls, or as content if it does not parse).

    Whitespace-only text is held too, so the streamed content matches `parse`'s (None for whitespace)."""

    def __init__(self, parser: ToolParser, tools: Optional[Sequence[dict]] = None):
        self.parser = parser
        self.tools = tools  # the request's (parse's `tools`)
        self.text = ""
        self.sent = 0  # characters of `text` emitted as content
        self.held = False  # a call has started: the rest waits for the end

    def feed(self, delta: str) -> str:
        """The content to emit for `delta` ("" when it is held)."""
        self.text += delta
        if self.held:
            return ""
        at = self.parser.start(self.text)
        if at is not None:
            self.held = True
            safe = at
        else:
            safe = len(self.text) - self.parser.holdback(self.text)
        if safe <= self.sent or not self.text[:safe].strip():
            return ""
        out, self.sent = self.text[self.sent:safe], safe
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content not yet emitted, the calls) once the output has ended."""
        parsed = self.parser.parse(self.text, self.tools)
        if parsed.calls:
            return (parsed.content or "")[self.sent:], parsed.calls
        return self.text[self.sent:], []
