"""gpt-oss's harmony output (inferneo_runtime/harmony.py): the split on a real tokenizer's token streams, and
`content` / `reasoning` / tool calls / reasoning_tokens / response_format against a real `inferneo serve` with the
official openai client.

The served model is the tiny llama with harmony's markers added as special tokens (as gpt-oss's are) and a compact
harmony template, fine-tuned for a few dozen steps to memorize two replies (analysis + final; analysis + a tool call)
ending in `<|return|>` / `<|call|>`, which its generation_config makes EOS ids (as gpt-oss's does).
"""
from __future__ import annotations

import json

import pytest
from test_reasoning import _chat, _serve, _token_count, accepted, memorize

from inferneo_runtime.harmony import Harmony, detect

MARKERS = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>", "<|constrain|>"]
# A compact stand-in for gpt-oss's chat template: tools in a developer message, earlier reasoning from `thinking`
# (ChatMessage.to_template passes reasoning_content under that name too), calls and results in harmony, and the
# generation prompt ending with `<|start|>assistant`.
TEMPLATE = """{%- if tools %}<|start|>developer<|message|># Tools {% for t in tools %}{{ t.function.name }} \
{% endfor %}<|end|>{% endif %}
{%- for m in messages %}
{%- if m.role == 'assistant' %}
{%- if m.thinking %}<|start|>assistant<|channel|>analysis<|message|>{{ m.thinking }}<|end|>{% endif %}
{%- for c in m.tool_calls or [] %}<|start|>assistant to=functions.{{ c.function.name }}<|channel|>commentary json\
<|message|>{{ c.function.arguments | tojson }}<|call|>{% endfor %}
{%- if m.content %}<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>{% endif %}
{%- elif m.role == 'tool' %}<|start|>functions.tool to=assistant<|channel|>commentary<|message|>{{ m.content }}<|end|>
{%- else %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start|>assistant{% endif %}"""
QUESTION = [{"role": "user", "content": "What is 2+2?"}]
WEATHER = [{"role": "user", "content": "Weather in Paris?"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                          "required": ["city"]}}}]
ANALYSIS = "<|channel|>analysis<|message|>two plus two<|end|>"
ANSWER = f"{ANALYSIS}<|start|>assistant<|channel|>final<|message|>It is 4."
CALL = ('<|channel|>analysis<|message|>need weather<|end|><|start|>assistant<|channel|>commentary '
        'to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}')
REPLIES = [(QUESTION, {}, ANSWER + "<|return|>"), (WEATHER, {"tools": TOOLS}, CALL + "<|call|>")]


@pytest.fixture(scope="module")
def harmony_tokenizer_dir(tiny_checkpoint, tmp_path_factory):
    """The tiny byte-level BPE with the markers as special tokens, and TEMPLATE."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(tiny_checkpoint("llama"))
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    tok.chat_template = TEMPLATE
    out = tmp_path_factory.mktemp("tok-harmony")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tokenizer(harmony_tokenizer_dir):
    from inferneo_runtime.tokenizer import Tokenizer

    return Tokenizer(harmony_tokenizer_dir)


# -- the split, on token streams ----------------------------------------------------------------------------------
PREAMBLE = "<|start|>assistant<|channel|>commentary<|message|>Let me look.<|end|>"
ROLE_CALL = ' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}'


@pytest.mark.parametrize("text, reasoning, content, calls", [
    (ANSWER, "two plus two", "It is 4.", []),
    ("<|channel|>final<|message|>It is 4.", None, "It is 4.", []),
    ("It is 4, in plain text.", None, "It is 4, in plain text.", []),
    ("<|channel|>analysis<|message|>cut off at max_tok", "cut off at max_tok", None, []),  # max_tokens
    (CALL, "need weather", None, [("get_weather", '{"city":"Paris"}')]),
    (ROLE_CALL, None, None, [("get_weather", '{"city": "Paris"}')]),  # the recipient after the role
    (f"{ANALYSIS}{PREAMBLE}<|start|>assistant{ROLE_CALL}", "two plus two", "Let me look.",
     [("get_weather", '{"city": "Paris"}')]),
    (f"{ANALYSIS}<|start|>assistant<|channel|>analysis<|message|>still four<|end|>"
     "<|start|>assistant<|channel|>final<|message|>4", "two plus two\nstill four", "4", []),
])
def test_split(tokenizer, text, reasoning, content, calls):
    split = Harmony().split(text)
    assert (split.reasoning, split.content) == (reasoning, content)
    assert [(c.name, c.arguments) for c in split.calls] == calls
    # streamed one token at a time (each marker one token, the rest in pieces): the same parts, no marker in either
    stream, parts = Harmony().stream(), ["", ""]
    for token in tokenizer.encode(text, add_special_tokens=False):
        for k, piece in enumerate(stream.feed(tokenizer.decode([token], skip_special_tokens=False))):
            assert "<|" not in piece
            parts[k] += piece
    parts = [a + b for a, b in zip(parts, stream.finish())]
    assert (parts[0] if reasoning is not None else None, parts[1] or None) == (reasoning, content)
    assert [(c.name, c.arguments) for c in stream.calls] == calls


def test_every_split_point_streams_the_same():
    text = f"{ANALYSIS}<|start|>assistant<|channel|>final<|message|>a <|en b<|"
    for case in (text, f"{PREAMBLE}{CALL}", "to be <|or not"):
        want = Harmony().split(case)
        for cut in range(len(case) + 1):
            for cut2 in range(cut, len(case) + 1, 2):
                stream = Harmony().stream()
                got = [stream.feed(case[:cut]), stream.feed(case[cut:cut2]), stream.feed(case[cut2:]), stream.finish()]
                joined = ("".join(g[0] for g in got), "".join(g[1] for g in got))
                assert (joined[0] if want.reasoning is not None else None, joined[1] or None) == \
                    (want.reasoning, want.content)
                assert [(c.name, c.arguments) for c in stream.calls] == [(c.name, c.arguments) for c in want.calls]


def test_detect_and_count(tokenizer):
    assert detect(TEMPLATE, tokenizer)
    assert not detect("{% for m in messages %}{{ m.content }}{% endfor %}", tokenizer)
    ids = tokenizer.encode(ANSWER, add_special_tokens=False)
    assert Harmony().token_count(tokenizer, ids) == len(tokenizer.encode(ANALYSIS, add_special_tokens=False))


def test_constraints_apply_to_the_final_channel(tokenizer):
    pytest.importorskip("llguidance")
    from inferneo_runtime.structured import Constraint

    constraint = Harmony().constrain(Constraint("regex", "[0-9]+"), tokenizer)
    call = Constraint("grammar", Harmony().call_format(tokenizer).grammar(TOOLS, False), "tools")

    def accepts(text: str, constraint=constraint) -> bool:
        return accepted(constraint, tokenizer, text)

    assert accepts(f"{ANALYSIS}<|start|>assistant<|channel|>final<|message|>4")
    assert accepts("<|channel|>final<|message|>42")
    assert not accepts(ANSWER) and not accepts("4") and not accepts(CALL)
    call = Harmony().constrain(call, tokenizer)  # a forced call: after the optional analysis, the call's message
    assert accepts(CALL, call) and accepts(CALL[CALL.index("<|start|>assistant") + 18:], call)
    assert not accepts(CALL.replace('"city":"Paris"', ""), call)  # the parameters' schema: city is required
    assert not accepts(CALL.replace("get_weather", "get_time"), call) and not accepts(ANSWER, call)


# -- the server ------------------------------------------------------------------------------------------------------
def _fine_tune(checkpoint, tokenizer_dir, out):
    """The checkpoint with the harmony tokenizer, trained to write REPLIES greedily (one batch, loss on replies)."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    model.resize_token_embeddings(len(tok))
    pairs = [(tok(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True, **v),
                  add_special_tokens=False).input_ids, tok(r, add_special_tokens=False).input_ids)
             for m, v, r in REPLIES]
    memorize(model, pairs)
    # <|return|> and <|call|> end the turn, as in gpt-oss's generation_config
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids(t) for t in ("<|return|>", "<|call|>")]
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def harmony_artifact(tiny_checkpoint, harmony_tokenizer_dir, tmp_path_factory):
    from conftest import tiny_recipe_fields
    from inferneo_build import build
    from inferneo_build.recipe import Recipe

    checkpoint = _fine_tune(tiny_checkpoint("llama"), harmony_tokenizer_dir, tmp_path_factory.mktemp("ckpt-harmony"))
    out = tmp_path_factory.mktemp("art-harmony") / "tiny-harmony"
    fields = tiny_recipe_fields(checkpoint, "tiny-harmony", out, targets=("onnx",),
                                shapes={"max_batch": 4, "max_sequence": 256})
    return build(Recipe.model_validate(fields)).output


@pytest.fixture(scope="module")
def server(harmony_artifact, tmp_path_factory):
    with _serve(harmony_artifact, tmp_path_factory) as s:  # reasoning_parser auto: harmony, from the template
        yield s


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _ask(client, stream: bool, **kwargs) -> dict:
    got = _chat(client, stream, model="tiny-harmony", **kwargs)
    assert not any("<|" in (got[k] or "") for k in ("reasoning", "content")), got
    return got


@pytest.mark.parametrize("stream", [False, True])
def test_analysis_and_final_are_split(server, client, stream):
    got = _ask(client, stream)
    assert got["reasoning"] == got["reasoning_content"] == "two plus two"
    assert got["content"] == "It is 4." and got["finish"] == "stop" and got["calls"] == []
    assert got["reasoning_tokens"] == _token_count(server, ANALYSIS) < got["completion_tokens"]
    # cut off in the analysis's body (max_tokens): all reasoning, no content
    cut = _ask(client, stream, max_tokens=_token_count(server, "<|channel|>analysis<|message|>") + 2)
    assert cut["finish"] == "length" and cut["content"] is None
    assert cut["reasoning"] and "two plus two".startswith(cut["reasoning"])


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_come_from_the_split(client, stream):
    got = _ask(client, stream, messages=WEATHER, tools=TOOLS)
    assert got["reasoning"] == "need weather" and got["content"] is None
    assert got["calls"] == [("get_weather", {"city": "Paris"})] and got["finish"] == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_applies_to_the_final_channel(client, stream):
    schema = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["answer"], "additionalProperties": False}
    got = _ask(client, stream, response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert got["reasoning"] == "two plus two" and set(json.loads(got["content"])) == {"answer"}


@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_calls_follow_the_analysis(client, stream):
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("required", named):
        got = _ask(client, stream, messages=WEATHER, tools=TOOLS, tool_choice=choice)
        assert got["reasoning"] == "need weather" and got["finish"] == "tool_calls"
        assert got["calls"] == [("get_weather", {"city": "Paris"})]


def test_responses_api_and_earlier_reasoning(server, client):
    import httpx

    resp = client.responses.create(model="tiny-harmony", input=QUESTION[0]["content"], temperature=0,
                                   max_output_tokens=60)
    assert [item.type for item in resp.output] == ["reasoning", "message"] and resp.output_text == "It is 4."
    assert resp.output[0].content[0].text == "two plus two" and resp.usage.output_tokens_details.reasoning_tokens > 0
    args = dict(model="tiny-harmony", input=WEATHER[0]["content"], temperature=0, max_output_tokens=150,
                tools=[{"type": "function", **TOOLS[0]["function"]}])
    call = client.responses.create(**args)
    streamed = list(client.responses.create(stream=True, **args))[-1]
    assert streamed.type == "response.completed"
    for out in (call.output, streamed.response.output):
        assert [item.type for item in out] == ["reasoning", "function_call"]
        assert (out[1].name, json.loads(out[1].arguments)) == ("get_weather", {"city": "Paris"})
    messages = [*QUESTION, {"role": "assistant", "content": "It is 4.", "reasoning_content": "two plus two"}]
    ids = httpx.post(f"{server.url}/tokenize", json={"messages": messages}).json()["tokens"]
    want = httpx.post(f"{server.url}/tokenize", json={"prompt": ANALYSIS, "add_special_tokens": False}).json()
    assert any(ids[i:i + want["count"]] == want["tokens"] for i in range(len(ids)))  # the markers are tokens


def test_the_setting_takes_harmonys_names():
    from inferneo_runtime.server.config import artifacts_to_serve, load_server_config

    for name in ("harmony", "openai_gptoss"):
        config = load_server_config(overrides={"models": ["a"], "reasoning_parser": name}, env={})
        assert [m.reasoning_parser for m in artifacts_to_serve(config)] == [name]
        entry = load_server_config(overrides={"models": [{"path": "a", "reasoning_parser": name}]}, env={})
        assert [m.reasoning_parser for m in artifacts_to_serve(entry)] == [name]  # one `models:` entry's own
