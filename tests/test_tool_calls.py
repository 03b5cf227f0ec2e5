"""Tool calls (inferneo_runtime/tool_calls.py): the parsers on literal model outputs, and `tools` / `tool_choice` /
`role: tool` messages against a real `inferneo serve` with the official openai client.

The checkpoint has random weights, so a call it makes is the grammar's doing: tool_choice "required" or a named
function is enforced with the structured-output mask, in the parser's format, so the call always parses and its
arguments always match the function's schema.
"""
from __future__ import annotations

import json
import shutil

import pytest

from inferneo_runtime.tool_calls import PARSERS, ToolStream, detect, get_parser

# -- parsers on literal outputs ------------------------------------------------------------------------------------
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "unit": {"type": "string", "enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}}]


def _calls(parsed):
    return [(c.name, json.loads(c.arguments)) for c in parsed.calls]


@pytest.mark.parametrize("text,content,calls", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>',
     None, [("get_weather", {"city": "Paris", "unit": "c"})]),
    ('Let me check. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n'
     '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "f"}}</tool_call>',
     "Let me check. ", [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Oslo", "unit": "f"})]),
    ('\n\n<tool_call>{"name": "add", "arguments": "{\\"a\\": 3}"}</tool_call>', None, [("add", {"a": 3})]),
])
def test_hermes_parses_calls(text, content, calls):
    parsed = get_parser("hermes").parse(text)
    assert parsed.content == content and _calls(parsed) == calls
    assert all(c.id.startswith("call_") and len(c.id) > 10 for c in parsed.calls)
    assert len({c.id for c in parsed.calls}) == len(parsed.calls)


@pytest.mark.parametrize("text", [
    'Sure <tool_call>{"name": "add", "arguments": {"a": 1',  # unterminated
    '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call> then <tool_call>{"name": "add"',  # 2nd open
    '<tool_call>{"name": add, "arguments": {}}</tool_call>',  # invalid JSON
    '<tool_call>{"arguments": {"a": 1}}</tool_call>',  # no name
    '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>',  # arguments not an object
    '<tool_call></tool_call>',
    "just text, no calls",
    "",
])
def test_hermes_malformed_output_stays_content(text):
    parsed = get_parser("hermes").parse(text)
    assert parsed.calls == [] and parsed.content == text


def test_llama3_json_parser():
    p = get_parser("llama3_json")
    parsed = p.parse('{"name": "get_weather", "parameters": {"city": "Rome", "unit": "c"}}')
    assert parsed.content is None and _calls(parsed) == [("get_weather", {"city": "Rome", "unit": "c"})]
    parsed = p.parse('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; '
                     '{"name": "add", "arguments": {"a": 3, "b": 4}}')
    assert _calls(parsed) == [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})]
    for text in ('The answer is {"name": "add"}', '{"name": "add", "parameters": {"a": 1}', '{"a": 1}',
                 '{"name": "add", "parameters": {}} trailing words', "plain"):
        parsed = p.parse(text)
        assert parsed.calls == [] and parsed.content == text, text


def test_mistral_parser():
    p = get_parser("mistral")
    parsed = p.parse('Checking.[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}, '
                     '{"name": "get_weather", "arguments": {"city": "Lyon", "unit": "c"}}]')
    assert parsed.content == "Checking." and _calls(parsed) == [("add", {"a": 1, "b": 2}),
                                                                ("get_weather", {"city": "Lyon", "unit": "c"})]
    for text in ('[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}', '[TOOL_CALLS]nonsense', "[TOOL_CALLS][]"):
        parsed = p.parse(text)
        assert parsed.calls == [] and parsed.content == text, text


def test_mistral_parser_reads_the_v11_args_form():
    """Mistral Small 3.2 / Magistral / Devstral / Ministral 3 (tokenizer v11+) write `[TOOL_CALLS]name[ARGS]{...}`
    per call (their templates render past calls so); it was left as content."""
    p = get_parser("mistral")
    parsed = p.parse('[TOOL_CALLS]get_weather[ARGS]{"city": "Lyon", "unit": "c"}')
    assert parsed.content is None and _calls(parsed) == [("get_weather", {"city": "Lyon", "unit": "c"})]
    parsed = p.parse('Checking.[TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e'
                     '[ARGS]{"city": "Nice", "unit": "f"}')
    assert parsed.content == "Checking." and _calls(parsed) == [("add", {"a": 1, "b": 2}),
                                                                ("get_weather", {"city": "Nice", "unit": "f"})]
    for text in ('[TOOL_CALLS]add[ARGS]{"a": 1', "[TOOL_CALLS]add[ARGS]", '[TOOL_CALLS]add[ARGS][1, 2]',
                 '[TOOL_CALLS]add[ARGS]{"a": 1}[TOOL_CALLS]broken'):
        parsed = p.parse(text)
        assert parsed.calls == [] and parsed.content == text, text


def test_mistral_v11_template_gets_the_args_form_grammar():
    pytest.importorskip("llguidance")
    from inferneo_runtime.structured import Constraint

    template = "{{- '[TOOL_CALLS]' + tool['function']['name'] + '[ARGS]' + arguments }}"
    parser = detect(template)
    assert parser.name == "mistral" and detect("{{ '[TOOL_CALLS][' }}") is PARSERS["mistral"]
    for parallel in (False, True):
        grammar = parser.grammar(TOOLS, parallel)
        assert '"get_weather[ARGS]"' in grammar and "[{" not in grammar
        Constraint("grammar", grammar, "tools").grammar()


# -- qwen3_coder: Qwen3-Coder / Qwen3.5's XML calls ----------------------------------------------------------------
SEARCH = {"type": "object", "properties": {
    "query": {"type": "string", "maxLength": 12}, "limit": {"type": "integer", "minimum": 1, "maximum": 50},
    "exact": {"type": "boolean"}, "score": {"type": "number"}, "tags": {"type": "array", "items": {"type": "string"}},
    "filters": {"type": "object", "properties": {"lang": {"type": "string"}}, "required": ["lang"]},
    "mode": {"enum": ["fast", "deep"]}}, "required": ["query", "exact"]}
XML_TOOLS = TOOLS + [{"type": "function", "function": {"name": "search", "parameters": SEARCH}}]


def _xml(name, **params):
    """A call as Qwen3-Coder's template writes it."""
    return (f"<tool_call>\n<function={name}>\n" + "".join(f"<parameter={k}>\n{v}\n</parameter>\n"
                                                          for k, v in params.items()) + "</function>\n</tool_call>")


@pytest.mark.parametrize("text,content,calls", [
    (_xml("get_weather", city="Paris", unit="c"), None, [("get_weather", {"city": "Paris", "unit": "c"})]),
    ("Let me check.\n\n" + _xml("add", a=1, b=2) + "\n" + _xml("get_weather", city="Oslo", unit="f"),
     "Let me check.\n\n", [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Oslo", "unit": "f"})]),
    # a value is the raw text, one newline dropped at each end: inner newlines, indentation, quotes, JSON-looking
    # text of a string parameter, `<` that is no tag, all kept
    (_xml("search", query="\n  def f():\n    return '{\"a\": 1}' < 2\n", exact="true"), None,
     [("search", {"query": "\n  def f():\n    return '{\"a\": 1}' < 2\n", "exact": True})]),
    # typed by the schema; a value that does not parse as its type stays text; undeclared parameters stay text
    (_xml("search", query="42", exact="False", limit="7", score="2.5", tags='["a", "b"]', filters='{"lang": "en"}',
          mode="deep", extra="3"), None,
     [("search", {"query": "42", "exact": False, "limit": 7, "score": 2.5, "tags": ["a", "b"],
                  "filters": {"lang": "en"}, "mode": "deep", "extra": "3"})]),
    (_xml("search", query="null", exact="maybe", limit="ten", score="1e3", tags="['x', True]", filters="null"), None,
     [("search", {"query": "null", "exact": "maybe", "limit": "ten", "score": 1000, "tags": ["x", True],
                  "filters": None})]),
    # a function the tools do not name: its values stay text; no parameters: {}
    (_xml("unknown", n="1") + _xml("get_time"), None, [("unknown", {"n": "1"}), ("get_time", {})]),
    # as vLLM reads them: whitespace around the tags, a missing </parameter> or </function>, two functions in a block
    ("  \n<tool_call><function=add><parameter=a>1<parameter=b>\n2\n</function></tool_call>", None,
     [("add", {"a": 1, "b": 2})]),
    ("<tool_call>\n<function=add>\n<parameter=a>\n5\n</parameter>\n<parameter=b>\n6\n</parameter>\n</tool_call>",
     None, [("add", {"a": 5, "b": 6})]),
    ("<tool_call>\n<function=get_time>\n</function>\n<function=add>\n</function>\n</tool_call>", None,
     [("get_time", {}), ("add", {})]),
])
def test_qwen3_coder_parses_calls(text, content, calls):
    parsed = get_parser("qwen3_coder").parse(text, XML_TOOLS)
    assert parsed.content == content and _calls(parsed) == calls
    assert len({c.id for c in parsed.calls}) == len(parsed.calls)


def test_qwen3_coder_values_are_text_without_the_tools():
    parsed = get_parser("qwen3_coder").parse(_xml("add", a=1, b="null"))
    assert _calls(parsed) == [("add", {"a": "1", "b": "null"})]


@pytest.mark.parametrize("text", [
    "Sure " + _xml("add", a=1, b=2)[:-len("</tool_call>")],  # unterminated
    _xml("add", a=1, b=2) + " then <tool_call>\n<function=add>",  # a second, unterminated
    "<tool_call>\n<function=>\n</function>\n</tool_call>",  # no name
    "<tool_call>\n<function=add\n</tool_call>",  # the name not closed
    "<tool_call>\n<function=add>\n<parameter=a\n1\n</function>\n</tool_call>",  # a parameter name not closed
    '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>',  # hermes JSON: no function
    "<tool_call></tool_call>",
    "<function=add>\n</function>",  # no <tool_call> block: text
    "just text, no calls",
    "",
])
def test_qwen3_coder_malformed_output_stays_content(text):
    parsed = get_parser("qwen3_coder").parse(text, XML_TOOLS)
    assert parsed.calls == [] and parsed.content == text


def test_detect_from_the_chat_template():
    assert detect("{% for t in tools %}{{ t | tojson }}{% endfor %}<tool_call>") is PARSERS["hermes"]
    assert detect("{{- '\\n<tool_call>\\n<function=' + tool_call.name + '>\\n' }}") is PARSERS["qwen3_coder"]
    assert detect("<tool_call>{\"name\": <function-name>}</tool_call>") is PARSERS["hermes"]  # Qwen3's: hermes
    assert detect("{{ '[AVAILABLE_TOOLS]' }}{{ '[TOOL_CALLS]' }}") is PARSERS["mistral"]
    assert detect("{{- '<|python_tag|>' + tool_call.name }}") is PARSERS["llama3_json"]
    assert detect("{% if message.role == 'ipython' %}...Respond in the format {\"name\": function name, "
                  "\"parameters\": dictionary}") is PARSERS["llama3_json"]
    assert detect("{% for m in messages %}{{ m.content }}{% endfor %}") is None and detect(None) is None
    with pytest.raises(ValueError, match="hermes"):
        get_parser("nope")


@pytest.mark.parametrize("name,text", [
    ("hermes", 'Let me look. <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'),
    ("hermes", '  \n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'),
    ("hermes", "a <tool_ca but not a call, <tool_call>{broken"),
    ("hermes", "text that ends in <tool_c"),
    ("hermes", "   "),
    ("llama3_json", '  {"name": "add", "parameters": {"a": 1, "b": 2}}'),
    ("llama3_json", '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}'),
    ("llama3_json", "<|python_ but plain text"),
    ("llama3_json", "Hello {not json}"),
    ("mistral", 'ok [TOOL_CALLS][{"name": "add", "arguments": {"a": 5, "b": 6}}]'),
    ("mistral", "[TOOL_CALL] almost"),
    ("mistral", 'ok [TOOL_CALLS]add[ARGS]{"a": 5, "b": 6}[TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}'),
    ("qwen3_coder", "Let me look.\n" + _xml("add", a=1, b=2) + "\n" + _xml("get_weather", city="Oslo", unit="c")),
    ("qwen3_coder", "\n\n" + _xml("search", query="a\nb <c>", exact="true", tags="[1]")),
    ("qwen3_coder", "text that ends in <tool_c"),
    ("qwen3_coder", "a <tool_ca but not a call, " + _xml("add", a=1)[:-3]),
])
@pytest.mark.parametrize("step", [1, 3, 7])
def test_streaming_reassembles_to_the_parse(name, text, step):
    """Fed in pieces, the content emitted (as it streams plus at the end) and the calls equal parse()'s; no text of
    a call is ever emitted as content."""
    parser = get_parser(name)
    parsed = parser.parse(text, XML_TOOLS)
    stream, content = ToolStream(parser, XML_TOOLS), ""
    for i in range(0, len(text), step):
        content += stream.feed(text[i:i + step])
        assert (parsed.content or "").startswith(content)  # never more than the content before the calls
    rest, calls = stream.finish()
    content += rest
    assert (content or None) == parsed.content
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in parsed.calls]


def test_grammars_compile_and_bad_schemas_are_refused():
    pytest.importorskip("llguidance")
    from inferneo_runtime.structured import Constraint, ConstraintError

    for parser in PARSERS.values():
        for parallel in (False, True):
            Constraint("grammar", parser.grammar(TOOLS, parallel), "tools").grammar()
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "no-such-type"}}}]
    with pytest.raises(ConstraintError):
        Constraint("grammar", get_parser("hermes").grammar(bad, False), "tools").grammar()


# -- the server ------------------------------------------------------------------------------------------------------
# A Hermes-style template (what Qwen2.5's does, in short): the tools in a system turn (only their names and argument
# names: the tiny tokenizer spends a token per character of JSON, and the artifact has 512 positions), assistant tool
# calls as <tool_call> blocks with `arguments | tojson` (a dict, as the server passes it), tool results in their own
# turn.
TEMPLATE = """{%- if tools %}<s>system: Tools: {% for t in tools %}{{ t.function.name }}\
({{ t.function.parameters.properties | list | join(',') }}) {% endfor %}in <tool_call></s>{% endif %}
{%- for m in messages %}
{%- if m.role == 'tool' %}<s>tool ({{ m.tool_call_id }}): {{ m.content }}</s>
{%- elif m.role == 'assistant' and m.tool_calls %}<s>assistant: {% for c in m.tool_calls %}<tool_call>\
{{ {"name": c.function.name, "arguments": c.function.arguments} | tojson }}</tool_call>{% endfor %}</s>
{%- else %}<s>{{ m.role }}: {{ m.content }}</s>{% endif %}
{%- endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}"""
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def artifact(tiny_checkpoint, tmp_path_factory):
    """The tiny llama with room for the tools' JSON plus a call (the shared tiny artifact has 128 positions)."""
    pytest.importorskip("fastapi")
    pytest.importorskip("llguidance")
    from conftest import tiny_recipe_fields
    from inferneo_build import build
    from inferneo_build.recipe import Recipe

    out = tmp_path_factory.mktemp("art-tools") / "tiny-tools"
    fields = tiny_recipe_fields(tiny_checkpoint("llama"), "tiny-tools", out, targets=("onnx",),
                                shapes={"max_batch": 4, "max_sequence": 512})
    return build(Recipe.model_validate(fields)).output


def _serve(artifact, tmp_path_factory, *flags, template: bool = True):
    from conftest import free_port, serve_subprocess

    cwd = tmp_path_factory.mktemp("serve-tools")
    shutil.copytree(artifact, cwd / "tiny-tools")
    (cwd / "template.jinja").write_text(TEMPLATE)
    port = free_port()
    if template:
        flags = ("--chat-template", str(cwd / "template.jinja"), *flags)
    return serve_subprocess([str(cwd / "tiny-tools"), "--port", str(port), "--log-level", "warning", *flags],
                            cwd, port)


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    with _serve(artifact, tmp_path_factory) as s:  # hermes: detected from the template's <tool_call>
        yield s


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _chat(client, stream: bool, messages=MESSAGES, **kwargs):
    """(content, [(name, arguments text)], finish_reason) of one chat completion, streamed (reassembled from the
    deltas) or not."""
    args = {"model": "tiny-tools", "messages": messages, "max_tokens": 200, "temperature": 0, "tools": TOOLS, **kwargs}
    if not stream:
        choice = client.chat.completions.create(**args).choices[0]
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        assert all(c.type == "function" and c.id.startswith("call_") for c in choice.message.tool_calls or [])
        return choice.message.content, calls, choice.finish_reason
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **args):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or []:
            if d.index not in calls:  # the first delta of a call carries its id, type and name
                assert d.id.startswith("call_") and d.type == "function" and d.function.name
                calls[d.index] = [d.function.name, ""]
            calls[d.index][1] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return content or None, [tuple(calls[k]) for k in sorted(calls)], finish


def test_named_tool_choice_forces_a_valid_call(client):
    jsonschema = pytest.importorskip("jsonschema")
    named = {"type": "function", "function": {"name": "get_weather"}}
    plain = _chat(client, stream=False, tool_choice=named)
    content, calls, finish = plain
    assert finish == "tool_calls" and content is None and len(calls) == 1, plain
    name, arguments = calls[0]
    assert name == "get_weather"
    jsonschema.validate(json.loads(arguments), WEATHER)
    assert _chat(client, stream=True, tool_choice=named) == plain  # greedy: the same call, streamed as deltas
    sampled = _chat(client, stream=False, tool_choice=named, temperature=1.0, seed=3)  # sampled: still valid
    assert sampled[2] == "tool_calls" and [c[0] for c in sampled[1]] == ["get_weather"]
    jsonschema.validate(json.loads(sampled[1][0][1]), WEATHER)


def test_required_calls_one_of_the_tools(client):
    jsonschema = pytest.importorskip("jsonschema")
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed, stream in ((0, False), (1, True), (2, False)):
        content, calls, finish = _chat(client, stream=stream, tool_choice="required", parallel_tool_calls=False,
                                       temperature=1.0, seed=seed)
        assert finish == "tool_calls" and len(calls) == 1 and content is None, (content, calls)
        jsonschema.validate(json.loads(calls[0][1]), schemas[calls[0][0]])
    # n=2, streamed: each choice's calls arrive as its own deltas
    calls = {}
    for chunk in client.chat.completions.create(model="tiny-tools", messages=MESSAGES, tools=TOOLS, max_tokens=200,
                                                n=2, temperature=1.0, seed=5, tool_choice="required",
                                                parallel_tool_calls=False, stream=True):
        for choice in chunk.choices:
            for d in choice.delta.tool_calls or []:
                entry = calls.setdefault((choice.index, d.index), ["", ""])
                entry[0] += d.function.name or ""
                entry[1] += d.function.arguments or ""
    assert sorted(calls) == [(0, 0), (1, 0)], calls
    for name, arguments in calls.values():
        jsonschema.validate(json.loads(arguments), schemas[name])
    # (parallel_tool_calls left on allows one or more calls: random weights go on calling until max_tokens, so the
    # parallel grammars are checked token by token in test_grammars_accept_what_the_parsers_read)


@pytest.mark.parametrize("name,one,two", [
    ("hermes", '<tool_call>\n{"name":"add","arguments":{"a":1,"b":2}}\n</tool_call>',
     '\n<tool_call>\n{"name":"get_weather","arguments":{"city":"Oslo","unit":"c"}}\n</tool_call>'),
    ("llama3_json", '{"name":"add","parameters":{"a":1,"b":2}}',
     '; {"name":"get_weather","parameters":{"city":"Oslo","unit":"c"}}'),
    ("mistral [ARGS]", '[TOOL_CALLS]add[ARGS]{"a":1,"b":2}', '[TOOL_CALLS]get_weather[ARGS]{"city":"Oslo","unit":"c"}'),
    ("qwen3_coder", _xml("add", a=1, b=2), "\n" + _xml("get_weather", city="Oslo", unit="c")),
])
def test_grammars_accept_what_the_parsers_read(artifact, name, one, two):
    """The enforcing grammar, token by token on the tiny tokenizer: a call in the parser's format is accepted and
    complete; a second call only when parallel; arguments outside the schema are refused."""
    from inferneo_runtime.tokenizer import Tokenizer

    tok = Tokenizer(artifact)
    parser = detect("'[TOOL_CALLS]' + name + '[ARGS]'") if name == "mistral [ARGS]" else get_parser(name)

    def accepts(text: str, parallel: bool) -> bool:
        return _grammar_accepts(tok, parser.grammar(TOOLS, parallel), text)

    assert _calls(parser.parse(one + two, TOOLS)) == [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Oslo",
                                                                                                    "unit": "c"})]
    assert accepts(one, False) and accepts(one, True) and accepts(one + two, True)
    assert not accepts(one + two, False)
    b, too_big = ("\n2\n", "\n200\n") if name == "qwen3_coder" else ('"b":2', '"b":200')
    assert b in one and not accepts(one.replace(b, too_big), True)  # maximum 99
    assert not accepts(one.replace("add", "sub"), True)  # not a tool


ADD_CALL, OSLO_CALL = ("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Oslo", "unit": "c"})


@pytest.mark.parametrize("name,one,two", [
    ("phi4_mini_json", 'functools[{"name":"add","arguments":{"a":1,"b":2}}]',
     'functools[{"name":"add","arguments":{"a":1,"b":2}},{"name":"get_weather","arguments":{"city":"Oslo","unit":"c"}}]'),
    ("granite", '<|tool_call|>[{"name":"add","arguments":{"a":1,"b":2}}]',
     '<|tool_call|>[{"name":"add","arguments":{"a":1,"b":2}},{"name":"get_weather","arguments":{"city":"Oslo",'
     '"unit":"c"}}]'),
    ("pythonic", "[add(a=1, b=2)]", '[add(a=1, b=2), get_weather(city="Oslo", unit="c")]'),
])
def test_tool_formats_grammars_accept_what_their_parsers_read(artifact, name, one, two):
    """tool_formats.py's grammars (phi4_mini_json, granite, pythonic), token by token on the tiny tokenizer: one call
    (both modes), two only when parallel, and nothing outside the tools' schemas."""
    from inferneo_runtime.tokenizer import Tokenizer

    tok, parser = Tokenizer(artifact), get_parser(name)
    assert _calls(parser.parse(one, TOOLS)) == [ADD_CALL] and _calls(parser.parse(two, TOOLS)) == [ADD_CALL, OSLO_CALL]
    assert _grammar_accepts(tok, parser.grammar(TOOLS, False), one)
    assert not _grammar_accepts(tok, parser.grammar(TOOLS, False), two)
    grammar = parser.grammar(TOOLS, True)
    assert _grammar_accepts(tok, grammar, one) and _grammar_accepts(tok, grammar, two)
    b = "b=2" if name == "pythonic" else '"b":2'
    for bad in (one.replace(b, b + "00"), one.replace("add", "sub"), one.replace("Oslo", "Oslo, Norway"),
                two.replace('"c"', '"k"')):
        assert not _grammar_accepts(tok, grammar, bad) or bad == one, bad


def test_pythonic_grammar_writes_keyword_arguments_in_the_schemas_order(artifact):
    """pythonic: the required keyword arguments always, the optional ones optional, in the schema's order; each value
    is JSON of its schema, which the parser reads back as the literal it is (quotes and brackets in strings too)."""
    jsonschema = pytest.importorskip("jsonschema")
    from inferneo_runtime.tokenizer import Tokenizer

    tok, parser = Tokenizer(artifact), get_parser("pythonic")
    grammar = parser.grammar(XML_TOOLS, False)
    good = ['[search(query="q", exact=true)]', '[search(query="a\\"b)], x", limit=3, exact=false, mode="deep")]',
            '[search(query="", exact=true, tags=["x"], filters={"lang":"en"})]', "[add(a=0, b=99)]"]
    for text in good:
        assert _grammar_accepts(tok, grammar, text), text
        (call,) = parser.parse(text, XML_TOOLS).calls
        jsonschema.validate(json.loads(call.arguments), {"search": SEARCH, "add": ADD}[call.name])
    assert json.loads(parser.parse(good[1]).calls[0].arguments) == {"query": 'a"b)], x', "limit": 3, "exact": False,
                                                                    "mode": "deep"}
    for text in ['[search(exact=true)]', '[search(exact=true, query="q")]', '[search(query="q", exact=True)]',
                 '[search(query="q", exact=true, extra=1)]', '[search(query="q", limit=0, exact=true)]',
                 "[add(a=1)]", "[add(1, 2)]", '[search(query="q",exact=true)]']:
        assert not _grammar_accepts(tok, grammar, text), text


def _grammar_accepts(tok, grammar: str, text: str) -> bool:
    """Whether the grammar lets the tiny tokenizer's tokens of `text` through, one by one, and may end there."""
    from inferneo_runtime.structured import Constraint, sequence_constraint

    seq = sequence_constraint(Constraint("grammar", grammar, "tools"), tok, [tok.eos_id])
    for t in tok.encode(text, add_special_tokens=False):
        if not seq.allowed(tok.vocab_size)[t]:
            return False
        seq.advance(t)
    return bool(seq.allowed(tok.vocab_size)[tok.eos_id])  # complete: the sequence may end here


def test_qwen3_coder_grammar_writes_the_schemas_parameters(artifact):
    """Parameters in the schema's order, the required ones mandatory and the optional ones optional; text values
    are any text but a closing tag (`<` in code or HTML is fine; enum / maxLength kept), the others as JSON of their
    schema; what it allows parses back to arguments the schema accepts."""
    jsonschema = pytest.importorskip("jsonschema")
    from inferneo_runtime.tokenizer import Tokenizer

    tok, parser = Tokenizer(artifact), get_parser("qwen3_coder")
    grammar = parser.grammar(XML_TOOLS, True)
    full = dict(query="two\nlines ok", limit="50", exact="false", score="-0.25", tags='["a","b"]',
                filters='{"lang":"en"}', mode="fast")
    good = [_xml("search", **full), _xml("search", query="", exact="true"),
            _xml("search", query="q", limit="3", exact="true", mode="deep"), _xml("add", a=0, b=99),
            _xml("search", query="a <b>", exact="true"), _xml("search", query="if a<b:\n</p", exact="true")]
    for text in good:
        assert _grammar_accepts(tok, grammar, text), text
        (call,) = parser.parse(text, XML_TOOLS).calls
        jsonschema.validate(json.loads(call.arguments), {"search": SEARCH, "add": ADD}[call.name])
    assert json.loads(parser.parse(good[0], XML_TOOLS).calls[0].arguments) == {
        "query": "two\nlines ok", "limit": 50, "exact": False, "score": -0.25, "tags": ["a", "b"],
        "filters": {"lang": "en"}, "mode": "fast"}
    assert [json.loads(parser.parse(t, XML_TOOLS).calls[0].arguments)["query"] for t in good[-2:]] == [
        "a <b>", "if a<b:\n</p"]
    bad = [_xml("search", query="q"),  # exact is required
           _xml("search", exact="true", query="q"),  # not in the schema's order
           _xml("search", query="a</parameter>", exact="true"),  # a closing tag in a text value
           _xml("search", query="<parameter=x", exact="true"), _xml("search", query="</function>", exact="true"),
           _xml("search", query="thirteen char", exact="true"),  # maxLength 12
           _xml("search", query="q", exact="yes"), _xml("search", query="q", limit="0", exact="true"),
           _xml("search", query="q", exact="true", mode="slow"), _xml("search", query="q", exact="true", tags="[1]"),
           _xml("search", query="q", exact="true", extra="1"), _xml("add", a=1)]
    for text in bad:
        assert not _grammar_accepts(tok, grammar, text), text


def test_auto_and_none(server, client):
    """auto: the output is parsed (random weights write no call: it stays content); none: the tools are not
    offered at all (the prompt is the one without tools) and nothing is parsed."""
    import httpx

    def prompt_tokens(**body) -> int:
        r = httpx.post(f"{server.url}/tokenize", json={"model": "tiny-tools", "messages": MESSAGES, **body})
        assert r.status_code == 200, r.text
        return r.json()["count"]

    for stream in (False, True):
        content, calls, finish = _chat(client, stream=stream, max_tokens=8)  # auto is the default with tools
        assert calls == [] and finish in ("stop", "length") and content
    auto = client.chat.completions.create(model="tiny-tools", messages=MESSAGES, max_tokens=1, tools=TOOLS)
    none = client.chat.completions.create(model="tiny-tools", messages=MESSAGES, max_tokens=1, tools=TOOLS,
                                          tool_choice="none")
    assert auto.usage.prompt_tokens == prompt_tokens(tools=TOOLS) > prompt_tokens() == none.usage.prompt_tokens


def test_tool_result_round_trip(server, client):
    """The assistant's call and a role: tool message go back in; the template renders both (the arguments as the
    dict it expects), and the model answers."""
    import httpx

    call = {"id": "call_abc123", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "c"})}}
    turns = MESSAGES + [{"role": "assistant", "content": None, "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": "call_abc123", "content": "sunny, 21 degrees"}]
    r = httpx.post(f"{server.url}/tokenize", json={"model": "tiny-tools", "messages": turns, "tools": TOOLS})
    assert r.status_code == 200, r.text
    tokens = r.json()["tokens"]
    prompt = httpx.post(f"{server.url}/detokenize", json={"model": "tiny-tools", "tokens": tokens}).json()["prompt"]
    assert 'assistant: <tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}' \
           '</tool_call>' in prompt, prompt
    assert "tool (call_abc123): sunny, 21 degrees" in prompt and prompt.endswith("assistant: ")
    answer = client.chat.completions.create(model="tiny-tools", messages=turns, tools=TOOLS, max_tokens=4,
                                            temperature=0)
    assert answer.usage.prompt_tokens == len(tokens)  # the chat request saw that same prompt
    forced = _chat(client, stream=False, messages=turns, tool_choice={"type": "function", "function": {"name": "add"}})
    assert forced[2] == "tool_calls" and forced[1][0][0] == "add"


@pytest.mark.parametrize("kwargs,param", [
    (dict(tool_choice={"type": "function", "function": {"name": "no_such_tool"}}), "tool_choice"),
    (dict(tool_choice="sometimes"), "tool_choice"),
    (dict(tool_choice={"type": "function"}), "tool_choice"),
    (dict(tools=[{"type": "function", "function": {"description": "no name"}}]), "tools"),
    (dict(tools=[{"type": "function"}]), "tools"),
    (dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools"),
    (dict(tools=[TOOLS[0], TOOLS[0]]), "tools"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "no-such-type"}}}],
          tool_choice="required"), "tools"),
    (dict(tools=None, tool_choice="required"), "tool_choice"),
    (dict(response_format={"type": "json_object"}), "response_format"),
    (dict(extra_body={"guided_regex": "[0-9]+"}), "guided_regex"),
])
def test_bad_tool_requests_are_400s_naming_the_field(client, kwargs, param):
    openai = pytest.importorskip("openai")
    args = dict(model="tiny-tools", messages=MESSAGES, max_tokens=4, tools=TOOLS)
    args.update(kwargs)
    if args["tools"] is None:
        del args["tools"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**args)
    assert e.value.body["param"].split(".")[0] == param, e.value.body
    assert param in e.value.body["message"]
    if param in ("response_format", "guided_regex"):  # a combination: the message names both fields
        assert "tools" in e.value.body["message"]


def test_an_unsupported_schema_feature_is_a_400_naming_the_function_and_feature(client):
    openai = pytest.importorskip("openai")
    unique = {"type": "object", "properties": {"ids": {"type": "array", "items": {"type": "integer"},
                                                       "uniqueItems": True}}}
    tools = TOOLS + [{"type": "function", "function": {"name": "pick", "parameters": unique}}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-tools", messages=MESSAGES, max_tokens=4, tools=tools,
                                       tool_choice="required")
    message = e.value.body["message"]
    assert e.value.body["param"] == "tools" and "'pick'" in message and "uniqueItems" in message, message
    assert "%json" not in message  # the schema's problem, not the generated grammar's text


def test_bad_tool_call_arguments_in_messages_are_400s(client):
    openai = pytest.importorskip("openai")
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{not json"}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-tools", max_tokens=2, tools=TOOLS, messages=MESSAGES + [
            {"role": "assistant", "tool_calls": [call]}, {"role": "tool", "tool_call_id": "call_1", "content": "3"}])
    assert e.value.body["param"] == "messages" and "arguments" in e.value.body["message"]


@pytest.mark.parametrize("parser", ["llama3_json", "mistral"])
def test_the_flag_chooses_the_format(artifact, tmp_path_factory, parser):
    """--tool-call-parser overrides the template's format: the forced call is written (and parsed) in its own."""
    openai = pytest.importorskip("openai")
    jsonschema = pytest.importorskip("jsonschema")
    with _serve(artifact, tmp_path_factory, "--tool-call-parser", parser) as s:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=120)
        named = {"type": "function", "function": {"name": "add"}}
        plain = _chat(client, stream=False, tool_choice=named)
        assert plain[2] == "tool_calls" and [c[0] for c in plain[1]] == ["add"], plain
        jsonschema.validate(json.loads(plain[1][0][1]), ADD)
        assert _chat(client, stream=True, tool_choice=named) == plain


@pytest.mark.parametrize("parser", ["phi4_mini_json", "granite", "pythonic"])
def test_tool_formats_force_calls_through_the_server(artifact, tmp_path_factory, parser):
    """tool_formats.py's formats through a real server and the official client: a named call, the same streamed
    (as `delta.tool_calls`); "required" sampled, streamed and not; string arguments a random model writes (any
    characters, escaped) come back as the JSON the schema accepts."""
    openai = pytest.importorskip("openai")
    jsonschema = pytest.importorskip("jsonschema")
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    with _serve(artifact, tmp_path_factory, "--tool-call-parser", parser) as s:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=120)
        named = {"type": "function", "function": {"name": "add"}}
        plain = _chat(client, stream=False, tool_choice=named)
        assert plain[2] == "tool_calls" and plain[0] is None and [c[0] for c in plain[1]] == ["add"], plain
        jsonschema.validate(json.loads(plain[1][0][1]), ADD)
        assert _chat(client, stream=True, tool_choice=named) == plain
        weather = {"type": "function", "function": {"name": "get_weather"}}
        for seed, stream in ((0, False), (1, True)):
            for choice in (weather, "required"):
                content, calls, finish = _chat(client, stream=stream, tool_choice=choice, parallel_tool_calls=False,
                                               temperature=1.0, seed=seed)
                assert finish == "tool_calls" and content is None and len(calls) == 1, (content, calls)
                jsonschema.validate(json.loads(calls[0][1]), schemas[calls[0][0]])
        if parser == "pythonic":  # a required parameter no keyword argument can name: a 400, not a call without it
            dashed = {"type": "object", "properties": {"first-name": {"type": "string"}}, "required": ["first-name"]}
            with pytest.raises(openai.BadRequestError) as e:
                _chat(client, stream=False, tools=[{"type": "function", "function": {"name": "greet",
                                                                                     "parameters": dashed}}],
                      tool_choice="required")
            assert e.value.body["param"] == "tools" and "'first-name'" in e.value.body["message"], e.value.body
            keyword = {"type": "object", "properties": {"from": {"type": "string"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}}
            _, calls, _ = _chat(client, stream=False, tools=[{"type": "function", "function": {
                "name": "count", "parameters": keyword}}], tool_choice="required", parallel_tool_calls=False)
            assert [c[0] for c in calls] == ["count"] and set(json.loads(calls[0][1])) <= {"n"}  # `from=` left out


def test_a_template_with_no_known_format_needs_the_flag(artifact, tmp_path_factory):
    """The tiny model's own template shows no tool-call format: tools are a 400 naming them (unless not offered)."""
    openai = pytest.importorskip("openai")
    with _serve(artifact, tmp_path_factory, template=False) as s:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=120)
        for choice in ("auto", "required"):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model="tiny-tools", messages=MESSAGES, max_tokens=2, tools=TOOLS,
                                               tool_choice=choice)
            assert e.value.body["param"] == "tools" and "--tool-call-parser" in e.value.body["message"]
        r = client.chat.completions.create(model="tiny-tools", messages=MESSAGES, max_tokens=2, tools=TOOLS,
                                           tool_choice="none")
        assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")


@pytest.fixture(scope="module")
def qwen_client(artifact, tmp_path_factory):
    """A server started with --tool-call-parser qwen3_coder."""
    openai = pytest.importorskip("openai")
    with _serve(artifact, tmp_path_factory, "--tool-call-parser", "qwen3_coder") as s:
        yield openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_qwen3_coder_calls_through_the_server_are_typed_by_the_tools(qwen_client):
    """--tool-call-parser qwen3_coder: a forced call is written in Qwen3-Coder's XML form and comes back through the
    official client with its values typed by the tool's schema (integers, not the text the model wrote)."""
    jsonschema = pytest.importorskip("jsonschema")
    named = {"type": "function", "function": {"name": "add"}}
    plain = _chat(qwen_client, stream=False, tool_choice=named)
    content, calls, finish = plain
    assert finish == "tool_calls" and content is None and [c[0] for c in calls] == ["add"], plain
    arguments = json.loads(calls[0][1])
    jsonschema.validate(arguments, ADD)
    assert all(type(v) is int for v in arguments.values()), arguments
    assert _chat(qwen_client, stream=True, tool_choice=named) == plain


# values a forced call can only write when `<` is allowed in text
MARKUP = {"type": "object", "properties": {"html": {"type": "string", "enum": ["<div>", "<p>a < b</p>"]},
                                           "code": {"const": "if a < b:\n    return '<br>'"},
                                           "text": {"type": "string", "maxLength": 6}},
          "required": ["html", "code", "text"], "additionalProperties": False}


def test_qwen3_coder_forced_calls_can_write_code_and_html(qwen_client):
    """A text value ends only at its closing tag: code and HTML with `<` come back whole (the grammar refused `<`,
    so a forced call could not write these values at all)."""
    jsonschema = pytest.importorskip("jsonschema")
    tools = [{"type": "function", "function": {"name": "render", "parameters": MARKUP}}]
    for seed, stream in ((0, False), (1, True)):
        content, calls, finish = _chat(qwen_client, stream=stream, tools=tools, tool_choice="required",
                                       parallel_tool_calls=False, temperature=1.0, seed=seed)
        assert finish == "tool_calls" and content is None and [c[0] for c in calls] == ["render"], calls
        jsonschema.validate(json.loads(calls[0][1]), MARKUP)


def _trip_tool():
    """A tool as the openai client makes it from nested pydantic models: strict, with $defs and $refs, Optional
    fields as anyOf with null, a Literal as an enum (lengths and ranges bounded for random weights)."""
    openai = pytest.importorskip("openai")
    from typing import Literal, Optional

    from pydantic import BaseModel, Field

    class Place(BaseModel):
        city: str = Field(max_length=6)
        zip: Optional[int] = Field(ge=0, le=99)

    class Trip(BaseModel):
        origin: Place
        stop: Optional[Place]
        days: Optional[int] = Field(ge=1, le=9)
        mode: Literal["car", "train"]
        note: Optional[str] = Field(max_length=6)

    return Trip, openai.pydantic_function_tool(Trip, name="plan_trip")


@pytest.mark.parametrize("fixture", ["client", "qwen_client"])
def test_nested_model_tools_through_the_clients_helpers(request, fixture):
    """The openai client's parse() and stream() helpers with a pydantic tool: a forced call validates against its
    schema and parses into the model (its $refs into $defs were a 400 for the JSON formats, and qwen3_coder wrote
    $ref and Optional parameters as free text)."""
    jsonschema = pytest.importorskip("jsonschema")
    client = request.getfixturevalue(fixture)
    Trip, tool = _trip_tool()
    args = dict(model="tiny-tools", messages=MESSAGES, tools=[tool], max_tokens=300, temperature=1.0)
    r = client.chat.completions.parse(tool_choice={"type": "function", "function": {"name": "plan_trip"}}, seed=1,
                                      **args)
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls
    with client.chat.completions.stream(tool_choice="required", parallel_tool_calls=False, seed=2, **args) as s:
        streamed = s.get_final_completion().choices[0]
    assert streamed.finish_reason == "tool_calls"
    for call in (call, *streamed.message.tool_calls):
        assert call.function.name == "plan_trip" and isinstance(call.function.parsed_arguments, Trip)
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
