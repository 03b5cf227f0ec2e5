"""Reasoning output (inferneo_runtime/reasoning.py): the <think> split on a real tokenizer's token streams, and
`reasoning` / `reasoning_content` / reasoning_tokens against a real `inferneo serve` with the official openai client.

A random-weight model never writes </think>, so the served model is the tiny llama with <think> and </think> added
as tokens (as Qwen3's are) and a Qwen3-style template, fine-tuned for a few dozen steps (~2 s) to memorize a few
replies: greedy decoding then writes the tags for real.
"""
from __future__ import annotations

import json
import shutil

import pytest

from inferneo_runtime.reasoning import Reasoning, detect, prompt_opens_reasoning

# Qwen3's template, in short: earlier turns' reasoning from `reasoning_content`, enable_thinking false renders an
# empty closed block, and `reasoning_in_prompt` opens the block in the prompt as Qwen3-2507-thinking's does.
TEMPLATE = """{%- if tools %}<s>system: tools {% for t in tools %}{{ t.function.name }} {% endfor %}in <tool_call></s>\
{% endif %}
{%- for m in messages %}
{%- if m.role == 'assistant' %}<s>assistant: {% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>

{% endif %}{{ m.content }}</s>
{%- else %}<s>{{ m.role }}: {{ m.content }}</s>{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<s>assistant: {% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% elif reasoning_in_prompt %}<think>
{% endif %}{% endif %}"""
QUESTION = [{"role": "user", "content": "What is 2+2?"}]
WEATHER = [{"role": "user", "content": "Weather in Paris?"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                                          "required": ["city"], "additionalProperties": False}}}]
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
# (messages, template variables, the reply memorized)
REPLIES = [(QUESTION, {}, "<think>two plus two</think>\n\nIt is 4."),
           (QUESTION, {"enable_thinking": False}, "It is 4."),
           (QUESTION, {"reasoning_in_prompt": True}, "two plus two</think>\n\nIt is 4."),
           (WEATHER, {"tools": TOOLS}, f"<think>no <tool_call> yet</think>\n\n{CALL}")]


# -- the split, on token streams ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    """The tiny byte-level BPE: it writes each tag as several tokens, so tags split across stream deltas."""
    from inferneo_runtime.tokenizer import Tokenizer

    return Tokenizer(tiny_checkpoint("llama"))


@pytest.mark.parametrize("starts_inside, text, reasoning, content", [
    (False, "<think>two plus two</think>\n\nIt is 4.", "two plus two", "It is 4."),
    (False, "\n <think>a\nb</think>It is", "a\nb", "It is"),
    (False, "It is 4. <think>x</think>", None, "It is 4. <think>x</think>"),  # not at the start: content
    (False, "<think>never closed", "never closed", None),
    (False, "<think>x</think>\n\n", "x", None),
    (True, "two plus two</think>\n\nIt is 4.", "two plus two", "It is 4."),
    (True, "cut off at max_tok", "cut off at max_tok", None),
    (True, "</think>It is", "", "It is"),
])
def test_split(tokenizer, starts_inside, text, reasoning, content):
    split = Reasoning(starts_inside).split(text)
    assert (split.reasoning, split.content) == (reasoning, content)
    # streamed one token at a time (the tags arrive in pieces): the same parts, no tag in either
    stream, parts = Reasoning(starts_inside).stream(), ["", ""]
    for token in tokenizer.encode(text, add_special_tokens=False):
        for k, piece in enumerate(stream.feed(tokenizer.decode([token]))):
            assert "<think>" not in piece and "</think>" not in piece
            parts[k] += piece
    parts = [a + b for a, b in zip(parts, stream.finish())]
    assert (parts[0] if reasoning is not None else None, parts[1] or None) == (reasoning, content or None)


def test_every_split_point_streams_the_same():
    text = "  <think>a </thin k</think>\n\n\nanswer </think>"
    want = Reasoning(False).split(text)
    for cut in range(len(text) + 1):
        for cut2 in range(cut, len(text) + 1):
            stream = Reasoning(False).stream()
            got = [stream.feed(text[:cut]), stream.feed(text[cut:cut2]), stream.feed(text[cut2:]), stream.finish()]
            assert ("".join(g[0] for g in got), "".join(g[1] for g in got)) == (want.reasoning, want.content)


def test_detect_and_where_reasoning_starts(tokenizer):
    assert detect(TEMPLATE, tokenizer)
    assert not detect("{% for m in messages %}{{ m.content }}{% endfor %}", tokenizer)
    assert not detect("{{ '<think>' }} only the opening tag", tokenizer)
    opens = tokenizer.encode("<s>assistant: <think>\n", add_special_tokens=False)
    closed = tokenizer.encode("<s>assistant: <think>\n\n</think>\n\n", add_special_tokens=False)
    assert prompt_opens_reasoning(tokenizer, opens) and not prompt_opens_reasoning(tokenizer, closed)


def test_tags_that_are_special_tokens_are_kept_in_the_text(thinking_artifact, tmp_path):
    """Decoding drops special tokens; where a tag is one, the server keeps special tokens so the split sees it."""
    from inferneo_runtime.reasoning import tags_are_special
    from inferneo_runtime.tokenizer import Tokenizer

    spec = json.loads((thinking_artifact / "tokenizer.json").read_text())
    for token in spec["added_tokens"]:
        token["special"] = token["special"] or token["content"] in ("<think>", "</think>")
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    special = Tokenizer(tmp_path)
    ids = special.encode("<think>x</think>", add_special_tokens=False)
    assert special.decode(ids) == "x" and special.decode(ids, skip_special_tokens=False) == "<think>x</think>"
    assert tags_are_special(special) and not tags_are_special(Tokenizer(thinking_artifact))


@pytest.mark.parametrize("kind, spec, answer", [
    ("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}),
     '{"a":4}'),
    ("regex", "[0-9]+", "4"),
    ("grammar", 'start: "yes" | "no"', "yes"),  # a Lark grammar: llguidance's text, not its JSON form
])
def test_constraints_apply_after_the_reasoning(tokenizer, thinking_artifact, kind, spec, answer):
    """Each kind of constraint after the reasoning, with the tags as text (the tiny tokenizer) and as added tokens
    (the fine-tuned model's, which llguidance matches only as tokens)."""
    pytest.importorskip("llguidance")
    from inferneo_runtime.structured import Constraint
    from inferneo_runtime.tokenizer import Tokenizer

    def accepts(tok, text: str, starts_inside: bool) -> bool:
        return accepted(Reasoning(starts_inside).constrain(Constraint(kind, spec), tok), tok, text)

    for tok in (tokenizer, Tokenizer(thinking_artifact)):
        assert accepts(tok, f"two plus two</think>\n\n{answer}", True)
        assert accepts(tok, f"<think>two</think>\n{answer}", False) and accepts(tok, answer, False)
        assert not accepts(tok, "two plus two</think>\n\nIt is 4.", True)  # the answer must match
        assert not accepts(tok, answer, True)  # the prompt opened the reasoning: it must close first


def accepted(constraint, tok, text: str) -> bool:
    """Whether `constraint` lets `text`'s tokens through, then the end of the output."""
    from inferneo_runtime.structured import sequence_constraint

    seq = sequence_constraint(constraint, tok, [tok.eos_id])
    for t in tok.encode(text, add_special_tokens=False):
        if not seq.allowed(tok.vocab_size)[t]:
            return False
        seq.advance(t)
    return bool(seq.allowed(tok.vocab_size)[tok.eos_id])


# -- the server ------------------------------------------------------------------------------------------------------
def memorize(model, pairs) -> None:
    """Train `model` on (prompt ids, reply ids) pairs until greedy decoding writes the replies: 60 Adam steps on one
    right-padded batch, the loss on the replies only (~2 s)."""
    import torch

    width = max(len(p) + len(r) for p, r in pairs)
    ids = torch.tensor([p + r + [0] * (width - len(p) - len(r)) for p, r in pairs])
    labels = torch.tensor([[-100] * len(p) + r + [-100] * (width - len(p) - len(r)) for p, r in pairs])
    mask = (torch.arange(width)[None, :] < torch.tensor([[len(p) + len(r)] for p, r in pairs])).long()
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only contend (several times slower on a busy host)
    try:
        model.train()
        for _ in range(60):
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)


def _fine_tune(checkpoint, out):
    """The checkpoint with <think>/</think> tokens and TEMPLATE, trained to write REPLIES greedily."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(checkpoint)
    tok.add_tokens(["<think>", "</think>"])  # plain added tokens, as Qwen3's are (not special)
    tok.chat_template = TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    model.resize_token_embeddings(len(tok))
    prompts, replies = [], []
    for messages, variables, reply in REPLIES:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **variables)
        prompts.append(tok(text, add_special_tokens=False).input_ids)
        replies.append(tok(reply + tok.eos_token, add_special_tokens=False).input_ids)
    memorize(model, list(zip(prompts, replies)))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def thinking_artifact(tiny_checkpoint, tmp_path_factory):
    from conftest import tiny_recipe_fields
    from inferneo_build import build
    from inferneo_build.recipe import Recipe

    checkpoint = _fine_tune(tiny_checkpoint("llama"), tmp_path_factory.mktemp("ckpt-thinking"))
    out = tmp_path_factory.mktemp("art-thinking") / "tiny-thinking"
    fields = tiny_recipe_fields(checkpoint, "tiny-thinking", out, targets=("onnx",),
                                shapes={"max_batch": 4, "max_sequence": 256})
    return build(Recipe.model_validate(fields)).output


def _serve(artifact, tmp_path_factory, *flags, config: dict | None = None):
    pytest.importorskip("fastapi")
    from conftest import free_port, serve_subprocess

    cwd = tmp_path_factory.mktemp("serve-thinking")
    shutil.copytree(artifact, cwd / "tiny-thinking")
    port = free_port()
    if config is not None:
        (cwd / "serve.yaml").write_text(json.dumps(config))
        flags = ("--config", str(cwd / "serve.yaml"), *flags)
    else:
        flags = (str(cwd / "tiny-thinking"), *flags)
    return serve_subprocess([*flags, "--port", str(port), "--log-level", "warning"], cwd, port)


@pytest.fixture(scope="module")
def server(thinking_artifact, tmp_path_factory):
    with _serve(thinking_artifact, tmp_path_factory) as s:  # reasoning_parser auto: detected from the template
        yield s


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _chat(client, stream: bool, messages=QUESTION, **kwargs) -> dict:
    """One chat completion's message fields, finish_reason and reasoning_tokens; streamed: reassembled from the
    deltas, each of which is checked to hold no tag."""
    args = {"model": "tiny-thinking", "messages": messages, "max_tokens": 150, "temperature": 0, **kwargs}
    if not stream:
        out = client.chat.completions.create(**args)
        message = out.choices[0].message.model_dump()
        calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"] or []]
        return {"reasoning": message["reasoning"], "reasoning_content": message["reasoning_content"],
                "content": message["content"], "calls": calls, "finish": out.choices[0].finish_reason,
                "reasoning_tokens": out.usage.completion_tokens_details.reasoning_tokens,
                "completion_tokens": out.usage.completion_tokens}
    got = {"reasoning": None, "reasoning_content": None, "content": None, "calls": {}, "finish": None}
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args):
        if not chunk.choices:
            got["reasoning_tokens"] = chunk.usage.completion_tokens_details.reasoning_tokens
            got["completion_tokens"] = chunk.usage.completion_tokens
            continue
        delta = chunk.choices[0].delta.model_dump()
        for key in ("reasoning", "reasoning_content", "content"):
            if delta.get(key):
                assert "<think>" not in delta[key] and "</think>" not in delta[key], delta
                got[key] = (got[key] or "") + delta[key]
        for d in delta.get("tool_calls") or []:
            got["calls"].setdefault(d["index"], ["", ""])
            got["calls"][d["index"]][0] += d["function"].get("name") or ""
            got["calls"][d["index"]][1] += d["function"].get("arguments") or ""
        got["finish"] = chunk.choices[0].finish_reason or got["finish"]
    got["calls"] = [(name, json.loads(arguments)) for name, arguments in got["calls"].values()]
    return got


@pytest.mark.parametrize("stream", [False, True])
def test_a_continued_message_that_opened_the_reasoning_continues_it(client, stream):
    """continue_final_message on an assistant message that opened <think> (a prefill): the output starts inside
    the reasoning, whatever the prompt's last token is."""
    partial = [*QUESTION, {"role": "assistant", "content": "<think>two plus"}]
    got = _chat(client, stream, messages=partial,
                extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert (got["reasoning"], got["content"]) == (" two", "It is 4.")


def _token_count(server, text: str) -> int:
    import httpx

    return httpx.post(f"{server.url}/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["count"]


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_is_split_from_the_answer(server, client, stream):
    got = _chat(client, stream)
    assert got["reasoning"] == got["reasoning_content"] == "two plus two"
    assert got["content"] == "It is 4." and got["finish"] == "stop" and got["calls"] == []
    assert got["reasoning_tokens"] == _token_count(server, "<think>two plus two</think>") < got["completion_tokens"]


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_disabled_and_opened_by_the_prompt(client, stream):
    off = _chat(client, stream, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert (off["reasoning"], off["content"], off["reasoning_tokens"]) == (None, "It is 4.", 0)
    opened = _chat(client, stream, extra_body={"chat_template_kwargs": {"reasoning_in_prompt": True}})
    assert (opened["reasoning"], opened["content"]) == ("two plus two", "It is 4.")


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_cut_off_by_max_tokens_has_no_content(client, stream):
    got = _chat(client, stream, max_tokens=3)
    assert got["finish"] == "length" and got["content"] is None
    assert got["reasoning"] == got["reasoning_content"] and "two plus two".startswith(got["reasoning"])
    assert got["reasoning_tokens"] == got["completion_tokens"] == 3


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_are_read_from_the_answer_only(client, stream):
    """The reasoning mentions <tool_call>; only the answer's call is one."""
    got = _chat(client, stream, messages=WEATHER, tools=TOOLS)
    assert got["reasoning"] == "no <tool_call> yet"
    assert got["calls"] == [("get_weather", {"city": "Paris"})] and got["finish"] == "tool_calls"
    assert got["content"] is None


@pytest.mark.parametrize("stream", [False, True])
def test_forced_outputs_follow_the_reasoning(client, stream):
    """The grammar of a forced call or a JSON schema applies after </think>: the thinking survives it."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    forced = _chat(client, stream, messages=WEATHER, tools=TOOLS, tool_choice=named)
    assert forced["reasoning"] == "no <tool_call> yet" and forced["finish"] == "tool_calls"
    assert [name for name, _ in forced["calls"]] == ["get_weather"]
    schema = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["answer"],
              "additionalProperties": False}
    got = _chat(client, stream, response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
                extra_body={"chat_template_kwargs": {"reasoning_in_prompt": True}})
    assert got["reasoning"] == "two plus two"
    assert set(json.loads(got["content"])) == {"answer"}


def test_earlier_reasoning_reaches_the_template_under_either_name(server):
    import httpx

    def rendered(**fields) -> str:
        messages = [*QUESTION, {"role": "assistant", "content": "It is 4.", **fields}, *QUESTION]
        ids = httpx.post(f"{server.url}/tokenize", json={"messages": messages}).json()["tokens"]
        return httpx.post(f"{server.url}/detokenize", json={"tokens": ids}).json()["prompt"]

    assert "<think>two plus two</think>\n\nIt is 4." in rendered(reasoning="two plus two")
    assert "<think>two plus two</think>\n\nIt is 4." in rendered(reasoning_content="two plus two")
    assert "<think>" not in rendered()


def test_completions_stay_raw_text(client):
    prompt = "<s>user: What is 2+2?</s><s>assistant: "
    text = client.completions.create(model="tiny-thinking", prompt=prompt, max_tokens=40, temperature=0).choices[0].text
    assert text.startswith("<think>two plus two</think>")


def test_a_models_entry_turns_it_off(thinking_artifact, tmp_path_factory):
    """`reasoning_parser: none` in the model's `models:` entry wins over the command's --reasoning-parser."""
    openai = pytest.importorskip("openai")
    config = {"models": [{"path": "tiny-thinking", "reasoning_parser": "none"}]}
    with _serve(thinking_artifact, tmp_path_factory, "--reasoning-parser", "think", config=config) as s:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=120)
        out = client.chat.completions.create(model="tiny-thinking", messages=QUESTION, max_tokens=40, temperature=0)
    message = out.choices[0].message
    assert message.content == "<think>two plus two</think>\n\nIt is 4." and message.reasoning_content is None
    assert out.usage.completion_tokens_details is None


def test_the_setting_fills_each_models_entry():
    from inferneo_runtime.server.config import ConfigError, artifacts_to_serve, load_server_config

    config = load_server_config(overrides={"models": ["a", {"path": "b", "reasoning_parser": "none"}],
                                           "reasoning_parser": "qwen3"}, env={})
    assert [m.reasoning_parser for m in artifacts_to_serve(config)] == ["qwen3", "none"]
    assert load_server_config(env={}).reasoning_parser == "auto"
    with pytest.raises(ConfigError, match="reasoning_parser"):
        load_server_config(overrides={"reasoning_parser": "r1"}, env={})
