"""POST /v1/responses (OpenAI's Responses API, on the chat path) against a real `inferneo serve`, through the official
openai client's `responses.create`, `responses.stream` and `responses.parse`.

The served model is test_reasoning.py's: the tiny llama fine-tuned to think between <think> tags and answer, so every
answer has a reasoning item for real. Its chat template is test_reasoning's with tool calls and tool results rendered
as well (test_tool_calls.py's way); the prompts the model memorized render the same, so it still thinks. A forced
function call is the structured-output mask's doing, so it always parses and matches the function's schema.
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402
from test_reasoning import QUESTION, TEMPLATE, TOOLS, WEATHER, _serve, thinking_artifact  # noqa: E402, F401

KEY = "sk-responses"
MODEL = "tiny-thinking"
# the thinking template, with an assistant's tool calls and the tool results rendered
TOOL_TEMPLATE = TEMPLATE.replace(
    "{{ m.content }}</s>\n{%- else %}",
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ {'name': c.function.name, 'arguments': "
    "c.function.arguments} | tojson }}</tool_call>{% endfor %}{% else %}{{ m.content }}{% endif %}</s>\n"
    "{%- elif m.role == 'tool' %}<s>tool ({{ m.tool_call_id }}): {{ m.content }}</s>\n{%- else %}")
assert TOOL_TEMPLATE != TEMPLATE
FLAT_TOOLS = [{"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"],
               "strict": True} for t in TOOLS]  # the Responses API's flat shape
WEATHER_SCHEMA = TOOLS[0]["function"]["parameters"]


@pytest.fixture(scope="module")
def server(thinking_artifact, tmp_path_factory):  # noqa: F811 - the fixture imported above
    template = tmp_path_factory.mktemp("responses-template") / "template.jinja"
    template.write_text(TOOL_TEMPLATE)
    with _serve(thinking_artifact, tmp_path_factory, "--chat-template", str(template), "--api-key", KEY) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def rendered(server, messages: list, **body) -> tuple[int, str]:
    """(token count, text) of the prompt the chat template renders for `messages`."""
    tokens = post(server, "/tokenize", {"model": MODEL, "messages": messages, **body}).json()["tokens"]
    return len(tokens), post(server, "/detokenize", {"model": MODEL, "tokens": tokens}).json()["prompt"]


def items(resp) -> list[tuple]:
    """(type, text or (name, arguments), status) of each output item."""
    out = []
    for item in resp.output:
        if item.type == "reasoning":
            out.append(("reasoning", "".join(c.text for c in item.content), item.status))
        elif item.type == "message":
            out.append(("message", "".join(c.text for c in item.content), item.status))
        else:
            out.append(("function_call", (item.name, item.arguments), item.status))
    return out


def streamed(client, **args) -> tuple[list, dict]:
    """The raw events of a streamed response, and the texts their deltas join to."""
    events = list(client.responses.create(stream=True, **args))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    joined = {"reasoning": "", "message": "", "arguments": ""}
    for e in events:
        if e.type in ("response.output_text.delta", "response.reasoning_text.delta",
                      "response.function_call_arguments.delta"):
            assert "<think>" not in e.delta and "</think>" not in e.delta
            key = {"response.output_text.delta": "message", "response.reasoning_text.delta": "reasoning"}
            joined[key.get(e.type, "arguments")] += e.delta
    return events, joined


# -- text ----------------------------------------------------------------------------------------------------------
def test_the_answer_is_the_chat_completions(client):
    resp = client.responses.create(model=MODEL, input=QUESTION[0]["content"], temperature=0, max_output_tokens=60,
                                   metadata={"run": "t1"})
    chat = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=60)
    message = chat.choices[0].message
    assert items(resp) == [("reasoning", "two plus two", "completed"), ("message", "It is 4.", "completed")]
    assert resp.output_text == message.content == "It is 4." and message.reasoning_content == "two plus two"
    assert resp.id.startswith("resp_") and resp.object == "response" and resp.status == "completed"
    assert resp.output[0].id.startswith("rs_") and resp.output[1].id.startswith("msg_")
    assert resp.output[1].content[0].annotations == []
    assert (resp.usage.input_tokens, resp.usage.output_tokens, resp.usage.total_tokens,
            resp.usage.output_tokens_details.reasoning_tokens) == \
        (chat.usage.prompt_tokens, chat.usage.completion_tokens, chat.usage.total_tokens,
         chat.usage.completion_tokens_details.reasoning_tokens)
    assert resp.usage.output_tokens_details.reasoning_tokens > 0
    assert resp.usage.input_tokens_details.cached_tokens == 0
    # the request's fields, echoed; the sampling values are the ones used
    assert (resp.model, resp.temperature, resp.top_p, resp.max_output_tokens, resp.metadata, resp.tools,
            resp.tool_choice, resp.parallel_tool_calls, resp.text.format.type, resp.incomplete_details) == \
        (MODEL, 0.0, 1.0, 60, {"run": "t1"}, [], "auto", True, "text", None)
    assert resp.model_extra.get("store") is False  # accepted, but nothing is stored


def test_instructions_and_input_items_reach_the_template(server, client):
    system = "Answer briefly."
    messages = [{"role": "system", "content": system}, *QUESTION]
    resp = client.responses.create(model=MODEL, instructions=system, temperature=0, max_output_tokens=40,
                                   input=[{"role": "user", "content": [{"type": "input_text",
                                                                        "text": QUESTION[0]["content"]}]}])
    chat = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=40)
    count, prompt = rendered(server, messages)
    assert f"system: {system}user: " in prompt
    assert resp.usage.input_tokens == count > rendered(server, QUESTION)[0]
    assert resp.output_text == (chat.choices[0].message.content or "") and resp.instructions == system
    # a developer message is the system message; an earlier turn's reasoning item reaches the template as its
    # reasoning_content
    turns = [{"type": "message", "role": "developer", "content": system}, *QUESTION,
             {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "hm"}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "It is 4."}]},
             *QUESTION]
    again = client.responses.create(model=MODEL, input=turns, max_output_tokens=1)
    chat_turns = [*messages, {"role": "assistant", "content": "It is 4.", "reasoning_content": "hm"}, *QUESTION]
    count, prompt = rendered(server, chat_turns)
    assert "assistant: <think>hm</think>\n\nIt is 4.user: " in prompt and again.usage.input_tokens == count


def test_streaming_joins_to_the_same_response(client):
    args = dict(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=60)
    plain = client.responses.create(**args)
    events, joined = streamed(client, **args)
    assert (joined["reasoning"], joined["message"]) == ("two plus two", plain.output_text)
    kinds = [e.type for e in events]
    assert kinds[-1] == "response.completed" and "error" not in kinds
    for done in ("response.reasoning_text.done", "response.output_text.done", "response.content_part.done",
                 "response.output_item.done"):
        assert done in kinds
    assert kinds.index("response.reasoning_text.delta") < kinds.index("response.output_text.delta")
    text_done = next(e for e in events if e.type == "response.output_text.done")
    assert text_done.text == plain.output_text
    with client.responses.stream(**args) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert deltas == final.output_text == plain.output_text
    assert items(final) == items(plain) and final.usage.output_tokens == plain.usage.output_tokens


def test_max_output_tokens_makes_an_incomplete_response(client):
    resp = client.responses.create(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=3)
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage.output_tokens == 3 and [i[0] for i in items(resp)] == ["reasoning"]
    assert resp.output[-1].status == "incomplete"  # cut off while thinking: no answer
    events, joined = streamed(client, model=MODEL, input=QUESTION, temperature=0, max_output_tokens=3)
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "incomplete"
    assert joined["reasoning"] == items(resp)[0][1]
    assert items(events[-1].response) == items(resp)


# -- tools -----------------------------------------------------------------------------------------------------------
def test_a_forced_function_call_and_its_output_going_back(server, client):
    jsonschema = pytest.importorskip("jsonschema")
    args = dict(model=MODEL, input=WEATHER, tools=FLAT_TOOLS, temperature=0, max_output_tokens=120,
                tool_choice={"type": "function", "name": "get_weather"})
    resp = client.responses.create(**args)
    calls = [item for item in resp.output if item.type == "function_call"]
    assert len(calls) == 1 and resp.output[-1] is calls[0] and resp.status == "completed", resp.output
    call = calls[0]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER_SCHEMA)
    assert not any(item.type == "message" for item in resp.output)  # only the call (and the thinking before it)
    events, joined = streamed(client, **args)
    assert joined["arguments"] == call.arguments
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert done.arguments == call.arguments
    with client.responses.stream(**args) as stream:
        final = stream.get_final_response()
    assert [(i.name, i.arguments) for i in final.output if i.type == "function_call"] == [(call.name, call.arguments)]
    # the call and its output go back as input items: the template renders them as the chat messages they mean
    follow_up = [*WEATHER, {"type": "function_call", "call_id": call.call_id, "name": call.name,
                            "arguments": call.arguments},
                 {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]
    answer = client.responses.create(model=MODEL, input=follow_up, tools=FLAT_TOOLS, max_output_tokens=2)
    chat_turns = [*WEATHER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}]
    count, prompt = rendered(server, chat_turns, tools=TOOLS)
    assert answer.usage.input_tokens == count
    assert f"<tool_call>{json.dumps({'name': call.name, 'arguments': json.loads(call.arguments)})}</tool_call>" \
           in prompt and f"tool ({call.call_id}): sunny" in prompt


class Sum(BaseModel):
    answer: int = Field(ge=0, le=9)  # bounded: greedy random-ish weights would write digits forever


def test_json_schema_output_parses(client):
    jsonschema = pytest.importorskip("jsonschema")
    parsed = client.responses.parse(model=MODEL, input=QUESTION, text_format=Sum, temperature=0,
                                    max_output_tokens=60)
    assert isinstance(parsed.output_parsed, Sum) and parsed.output[0].type == "reasoning"  # thought, then JSON
    assert parsed.text.format.type == "json_schema"
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    resp = client.responses.create(model=MODEL, input=QUESTION, temperature=1.0, max_output_tokens=60,
                                   text={"format": {"type": "json_schema", "name": "n", "schema": schema}})
    jsonschema.validate(json.loads(resp.output_text), schema)


# -- what is refused, limits, metrics, authentication --------------------------------------------------------------
@pytest.mark.parametrize("fields,param", [
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"background": True}, "background"),
    ({"include": ["reasoning.encrypted_content"]}, "include"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"truncation": "auto"}, "truncation"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"tool_choice": {"type": "function", "name": "nope"}, "tools": FLAT_TOOLS}, "tool_choice"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]}, "input"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input"),
    ({"input": []}, "input"),
    ({"text": {"format": {"type": "json_object"}}, "tools": FLAT_TOOLS}, "text.format"),
    ({"max_output_tokens": 10_000}, "input"),  # chat names its messages: the context is too short for both
])
def test_what_cannot_be_honoured_is_a_400_naming_it(server, fields, param):
    r = post(server, "/v1/responses", {"model": MODEL, "input": "Hi", **fields})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_store_is_accepted_and_the_endpoint_is_counted_and_guarded(server, client):
    resp = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=2, store=True)
    assert resp.model_extra.get("store") is False
    assert httpx.post(f"{server.url}/v1/responses", json={"model": MODEL, "input": "Hi"}).status_code == 401
    assert post(server, "/v1/responses", {"model": MODEL, "input": "Hi", "background": True}).status_code == 400
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'endpoint="responses",model="tiny-thinking",status="200"' in metrics
    assert 'endpoint="responses",model="",status="400"' in metrics  # refused requests are counted too


def test_an_error_after_the_headers_is_the_streams_error_event():
    """What guarded() sends when a stream fails mid-way: the Responses API's `error` event, numbered in sequence."""
    from openai.types.responses import ResponseErrorEvent

    from inferneo_runtime.server.protocol import ErrorInfo
    from inferneo_runtime.server.routes.responses import _Events

    event = _Events()
    event("response.created", response={})
    sent = event.error(ErrorInfo(message="the server shut down", type="service_unavailable", code="shutting_down"))
    kind, data = sent.split("\n")[:2]
    error = ResponseErrorEvent.model_validate(json.loads(data.removeprefix("data: ")))
    assert kind == "event: error" and sent.endswith("\n\n")
    assert (error.type, error.sequence_number, error.code, error.message) == \
        ("error", 1, "shutting_down", "the server shut down")
