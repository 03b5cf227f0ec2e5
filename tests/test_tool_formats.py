"""The tool-call formats of inferneo_runtime/tool_formats.py (phi4_mini_json, granite, pythonic): the parsers on
realistic model outputs, streamed and not, and their detection from real chat templates. Their forced-call grammars,
token by token, and forced calls through a real `inferneo serve` are in test_tool_calls.py (which has the artifact
and the server helpers)."""
from __future__ import annotations

import json

import pytest

from inferneo_runtime.tool_calls import ToolStream, detect, get_parser
from test_chat_templates import GRANITE31, LLAMA32, PHI4_MINI, QWEN3, SMOLLM3, TOOLS, _render
from test_chat_templates import make  # noqa: F401  (the fixture: transformers' tokenizer and ours for a template)


def _calls(parsed):
    return [(c.name, json.loads(c.arguments)) for c in parsed.calls]


NESTED = {"filters": {"lang": ["en", "fr"], "range": {"from": 1, "to": None}}, "exact": True}
TRICKY = 'a "quoted" [bracket] ]) }, and \\ back\nslash'  # brackets, quotes, a backslash, a newline


# -- phi4_mini_json ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,content,calls", [
    ('functools[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}]', None,
     [("get_weather", {"city": "Paris", "unit": "c"})]),
    ('Let me look that up. functools[{"name": "add", "arguments": {"a": 1, "b": 2}}, '
     '{"name": "search", "arguments": ' + json.dumps(NESTED) + "}]",
     "Let me look that up. ", [("add", {"a": 1, "b": 2}), ("search", NESTED)]),
    ("functools" + json.dumps([{"name": "note", "arguments": {"text": TRICKY}}]), None,
     [("note", {"text": TRICKY})]),
    # "parameters" (as vLLM's parser reads too), arguments as JSON text, whitespace / a closing tag after the list
    ('\nfunctools[{"name": "add", "parameters": {"a": 3}}, {"name": "now", "arguments": "{}"}]\n<|/tool_call|>', None,
     [("add", {"a": 3}), ("now", {})]),
    ('functools[{"name": "add", "arguments": {"a": 1}}] functools[{"name": "now", "arguments": {}}]', None,
     [("add", {"a": 1}), ("now", {})]),
])
def test_phi4_mini_json_parses_calls(text, content, calls):
    parsed = get_parser("phi4_mini_json").parse(text)
    assert parsed.content == content and _calls(parsed) == calls
    assert all(c.id.startswith("call_") for c in parsed.calls) and len({c.id for c in parsed.calls}) == len(calls)


@pytest.mark.parametrize("text", [
    'functools[{"name": "add", "arguments": {"a": 1}}',  # unterminated
    'functools[{"name": "add", "arguments": {"a": 1}}] functools[{"name": "add"',  # the second unterminated
    'functools[{"name": add}]', 'functools[{"arguments": {}}]', 'functools[{"name": "add", "arguments": [1]}]',
    "functools[]", "functools []", "import functools; functools.partial(f)", "just text", "",
])
def test_phi4_mini_json_malformed_output_stays_content(text):
    parsed = get_parser("phi4_mini_json").parse(text)
    assert parsed.calls == [] and parsed.content == text


# -- granite -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,content,calls", [
    # Granite 3 writes the arguments first (IBM's examples), one list of calls after <|tool_call|>
    ('<|tool_call|>[{"arguments": {"city": "Zürich"}, "name": "get_weather"}]', None,
     [("get_weather", {"city": "Zürich"})]),
    ('<|tool_call|>[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "search", "arguments": '
     + json.dumps(NESTED) + "}]", None, [("add", {"a": 1, "b": 2}), ("search", NESTED)]),
    # the special token dropped from the text (skip_special_tokens): the list at the start is the calls
    (" [" + json.dumps({"name": "note", "arguments": {"text": TRICKY}}) + "]\n", None, [("note", {"text": TRICKY})]),
    ('I will check. <|tool_call|>[{"name": "add", "arguments": {"a": 5}}]', "I will check. ", [("add", {"a": 5})]),
    ('<tool_call>[{"name": "now", "parameters": {}}]', None, [("now", {})]),  # vLLM's parser reads this too
])
def test_granite_parses_calls(text, content, calls):
    parsed = get_parser("granite").parse(text)
    assert parsed.content == content and _calls(parsed) == calls


@pytest.mark.parametrize("text", [
    "[1] First, preheat the oven.",  # a list-like answer is text
    '[{"name": "Ada", "born": 1815}, {"name": "Alan"}]',  # JSON data, not calls: no arguments without the marker
    '[{"name": "add", "arguments": {"a": 1}}] and then more words',
    'Maybe [{"name": "add", "arguments": {}}]',  # a list not at the start, without the marker
    '<|tool_call|>[{"name": "add", "arguments": {"a": 1}}', '<|tool_call|>{"name": "add", "arguments": {}}',
    '<|tool_call|>[{"name": "add", "arguments": "not json"}]', "<|tool_call|>[]", "<|tool_call|>", "text", "",
])
def test_granite_malformed_output_stays_content(text):
    parsed = get_parser("granite").parse(text)
    assert parsed.calls == [] and parsed.content == text


# -- pythonic ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,calls", [
    ('[get_weather(city="Paris", unit="c")]', [("get_weather", {"city": "Paris", "unit": "c"})]),
    ("[add(a=1, b=-2.5), now(), search(filters={'lang': ['en', 'fr'], 'range': {'from': 1, 'to': None}}, "
     "exact=True)]", [("add", {"a": 1, "b": -2.5}), ("now", {}), ("search", NESTED)]),
    ("[note(text=" + repr(TRICKY) + ")]", [("note", {"text": TRICKY})]),
    # what the forced-call grammar writes: each value as JSON (true / null / "\/" and "\u00e9" escapes)
    ('[search(filters={"lang":["en","fr"],"range":{"from":1,"to":null}}, exact=true), note(text="a\\/b \\u00e9")]',
     [("search", NESTED), ("note", {"text": "a/b é"})]),
    ('  <|python_start|>[add(a=1, b=(2, 3))]<|python_end|>\n', [("add", {"a": 1, "b": [2, 3]})]),  # Llama 4
    ('[f(text="""two\nlines""")]', [("f", {"text": "two\nlines"})]),
])
def test_pythonic_parses_calls(text, calls):
    parsed = get_parser("pythonic").parse(text)
    assert parsed.content is None and _calls(parsed) == calls


@pytest.mark.parametrize("text", [
    "[add(a=1, b=2)",  # unterminated
    "[add(1, 2)]",  # positional arguments: no names
    "[add(a=x)]", "[add(a=1 + 2)]", "[add(a=__import__('os').getcwd())]",  # not literals: never evaluated
    "[add(**{'a': 1})]", "[os.system(cmd='ls')]", "[add(a={1, 2})]", "[add(a=float('nan'))]", "[1, 2]", "[]",
    "add(a=1)",  # not a list
    "[add(a=1)] and some words", "Sure: [add(a=1)]", "[citation needed]", "plain text", "",
])
def test_pythonic_malformed_output_stays_content(text):
    parsed = get_parser("pythonic").parse(text)
    assert parsed.calls == [] and parsed.content == text


def test_pythonic_grammar_leaves_out_what_no_keyword_argument_can_name():
    from inferneo_runtime.structured import ConstraintError

    parser = get_parser("pythonic")
    params = {"type": "object", "properties": {"from": {"type": "string"}, "x-y": {"type": "string"},
                                               "n": {"type": "integer"}}, "required": ["n"]}
    grammar = parser.grammar([{"type": "function", "function": {"name": "count", "parameters": params}}], False)
    assert '"n="' in grammar and '"from="' not in grammar and '"x-y="' not in grammar
    for name, required in (("count", ["x-y"]), ("count", ["from"]), ("get-weather", []), ("class", [])):
        tool = {"type": "function", "function": {"name": name, "parameters": {**params, "required": required}}}
        with pytest.raises(ConstraintError, match="pythonic") as e:
            parser.grammar([tool], True)
        assert e.value.param == "tools"


# -- streaming: the same as parse, and no call text ever streamed as content --------------------------------------
@pytest.mark.parametrize("name,text", [
    ("phi4_mini_json", 'Let me look. functools[{"name": "add", "arguments": {"a": 1, "b": 2}}, '
                       '{"name": "note", "arguments": ' + json.dumps({"text": TRICKY}) + "}]"),
    ("phi4_mini_json", "no call here, just func and tools"),
    ("phi4_mini_json", "text that ends in functo"),
    ("granite", '<|tool_call|>[{"name": "add", "arguments": {"a": 1, "b": 2}}]'),
    ("granite", '  [{"name": "add", "arguments": {"a": 1, "b": 2}}]'),
    ("granite", 'Checking. <|tool_call|>[{"name": "add", "arguments": {"a": 1}}]'),
    ("granite", "[1] not a call"),
    ("granite", "text that ends in <|tool_ca"),
    ("pythonic", '[get_weather(city="Paris", unit="c"), add(a=1, b=2)]'),
    ("pythonic", '<|python_start|>[add(a=1, b=2)]<|python_end|>'),
    ("pythonic", "Paris is sunny [citation needed]"),
    ("pythonic", "  \n[broken(call"),
])
@pytest.mark.parametrize("step", [1, 4, 9])
def test_streaming_reassembles_to_the_parse(name, text, step):
    parser = get_parser(name)
    parsed = parser.parse(text)
    stream, content = ToolStream(parser), ""
    for i in range(0, len(text), step):
        content += stream.feed(text[i:i + step])
        assert (parsed.content or "").startswith(content)
    rest, calls = stream.finish()
    content += rest
    assert (content or None) == parsed.content
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in parsed.calls]


# -- detection on the real templates -------------------------------------------------------------------------------
# vLLM's examples/tool_chat_template_phi4_mini.jinja asks for the format in these words (an excerpt)
PHI4_MINI_VLLM = """{%- if tools %}
  * prefix function calls with functools marker (no closing marker required)
  * all function calls should be generated in a single JSON list formatted as functools[{"name": [function name], \
"arguments": [function arguments as JSON]}, ...]
{%- for t in tools %}{{- t | tojson(indent=4) }}{%- endfor %}{%- endif %}<|end|>"""
# vLLM's examples/tool_chat_template_llama3.2_pythonic.jinja and llama4_pythonic spell the format out (an excerpt)
PYTHONIC_LLAMA = """{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}{%- if tools is not none %}\
{{- "Environment: ipython\\n" }}{%- endif %}
{{- 'Respond in the format [func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)] ' }}
{{- "<|python_tag|>" if builtin_tools is defined }}"""
# Granite 4 writes hermes blocks; its tokenizer still has <|tool_call|>, which a template may mention
GRANITE4 = """{%- if tools %}For each tool call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n\
</tool_call>{%- endif %}{# <|tool_call|> is Granite 3's #}"""


@pytest.mark.parametrize("template,name", [
    (PHI4_MINI, "phi4_mini_json"),  # microsoft/Phi-4-mini-instruct: <|tool|> ... <|/tool|>
    (PHI4_MINI_VLLM, "phi4_mini_json"),
    (GRANITE31, "granite"),  # ibm-granite/granite-3.1-8b-instruct: "respond with <|tool_call|> followed by ..."
    (GRANITE4, "hermes"), (SMOLLM3, "hermes"), (QWEN3, "hermes"),  # not stolen by granite
    (PYTHONIC_LLAMA, "pythonic"),  # spelled out: pythonic, not llama3_json
    (LLAMA32, "llama3_json"),  # Meta's own Llama 3.2 template asks for JSON
    ("[{{ name }}({{ args }})]", None),  # no marker: pythonic only with --tool-call-parser
])
def test_detection_on_real_templates(template, name):
    parser = detect(template)
    assert (parser.name if parser else None) == name


def test_the_real_templates_offer_the_tools_the_parser_reads(request):
    """Granite 3.1's template renders the request's tools and asks for `<|tool_call|>` + a JSON list, which granite
    reads back; Phi-4-mini's published template takes the tools as a system message's `tools` text, not the
    request's `tools` (vLLM ships its own template for that). Rendered by transformers and by ours, alike."""
    render = request.getfixturevalue("make")
    user = [{"role": "user", "content": "Weather in Zürich?"}]
    ref, prompt = _render(render, GRANITE31, user, tools=TOOLS)
    assert prompt == ref and '"name": "get_weather"' in prompt
    assert "respond with <|tool_call|> followed by a JSON list" in prompt
    output = "<|tool_call|>" + json.dumps([{"arguments": {"city": "Zürich", "days": 2}, "name": "get_weather"}])
    assert _calls(detect(GRANITE31).parse(output, TOOLS)) == [("get_weather", {"city": "Zürich", "days": 2})]
    system = [{"role": "system", "content": "Be brief.", "tools": json.dumps(TOOLS)}]
    ref, prompt = _render(render, PHI4_MINI, system + user)
    assert prompt == ref and prompt.startswith("<|system|>Be brief.<|tool|>[") and '"get_weather"' in prompt
