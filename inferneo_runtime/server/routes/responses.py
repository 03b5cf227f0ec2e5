"""POST /v1/responses: OpenAI's Responses API, stateless, on the chat path. The request becomes a chat completion
request (protocol/responses_api.py), which is admitted, rendered, sampled and parsed exactly as /v1/chat/completions
does it (routes/generation.py: prepare_chat, chat_answer, AnswerStream); its one answer becomes output items: a
`reasoning` item, a `message` item, `function_call` items, in that order. Streamed, the items come as the Responses
API's events, each with its `sequence_number`, and the stream has no [DONE]."""
from __future__ import annotations

import json
import time
import uuid
from functools import partial
from typing import Optional

from fastapi import FastAPI, Request, Response

from ..errors import ERROR_RESPONSES
from ..jobs import Call, Job
from ..protocol import ParamError
from ..protocol.responses_api import (CHAT_PARAMS, FunctionCallItem, IncompleteDetails, OutputMessage, OutputText,
                                      OutputTokensDetails, ReasoningItem, ReasoningText, ResponseObject,
                                      ResponsesRequest, ResponsesUsage)
from ..state import ServerState
from ..streaming import EventStream, end_stream, guarded, run_to_end
from .generation import AnswerStream, chat_answer, chat_usage, new_chat, prepare_chat


def add_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/responses", response_model=ResponseObject, responses=ERROR_RESPONSES)
    async def responses(body: ResponsesRequest, request: Request, response: Response):
        try:
            chat_body = body.to_chat()
        except ParamError:
            Call(state, "responses").finish(400)  # counted as chat counts the requests it refuses
            raise
        chat = new_chat(chat_body)
        prepare = partial(prepare_chat, state, chat_body, chat)
        try:
            job = await state.open_job("responses", chat_body, request, 1, prepare)
        except ParamError as e:  # found on the chat path: named by the Responses API's field
            e.param = CHAT_PARAMS.get(e.param, e.param)
            raise
        frame = _Frame(body, state.model_field(chat_body, job), chat)
        if body.stream:
            return EventStream(_stream(job, frame), on_close=partial(end_stream, job),
                               headers=state.response_headers(job))
        await run_to_end(job, request)
        answer = chat_answer(chat, job.seqs[0])
        incomplete = answer.finish_reason == "length"
        items = []
        if answer.reasoning is not None:
            items.append(_reasoning_item(_item_id("rs"), answer.reasoning))
        if answer.content is not None or (not answer.calls and answer.reasoning is None):
            items.append(_message_item(_item_id("msg"), answer.content or ""))
        items += [_call_item(call) for call in answer.calls]
        job.call.finish(200)
        response.headers.update(state.response_headers(job))
        return frame.response(_finished(items, incomplete), incomplete, job)


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _reasoning_item(item_id: str, text: str, status: str = "completed") -> ReasoningItem:
    return ReasoningItem(id=item_id, content=[ReasoningText(text=text)], status=status)


def _message_item(item_id: str, text: str, status: str = "completed") -> OutputMessage:
    return OutputMessage(id=item_id, content=[OutputText(text=text)], status=status)


def _call_item(call, status: str = "completed") -> FunctionCallItem:
    return FunctionCallItem(id=_item_id("fc"), call_id=call.id, name=call.name, arguments=call.arguments, status=status)


def _finished(items: list, incomplete: bool) -> list:
    """The items of a response cut off by max_output_tokens: the last one, being written then, is incomplete."""
    if incomplete and items:
        items[-1] = items[-1].model_copy(update={"status": "incomplete"})
    return items


class _Frame:
    """What every response object of one request shares: the request's echoed fields, its id, model and time."""

    def __init__(self, body: ResponsesRequest, model: str, chat: dict):
        self.body, self.model, self.chat = body, model, chat
        self.id = _item_id("resp")
        self.created_at = int(time.time())

    def response(self, output: list, incomplete: bool, job: Optional[Job]) -> ResponseObject:
        """The response object; `job` None: still in progress (no status or usage yet)."""
        params = self.chat["params"]  # the sampling values used: the request's, else the model's defaults
        status = "in_progress" if job is None else "incomplete" if incomplete else "completed"
        return ResponseObject(id=self.id, created_at=self.created_at, model=self.model, status=status, output=output,
                              incomplete_details=IncompleteDetails() if status == "incomplete" else None,
                              temperature=params.temperature, top_p=params.top_p,
                              usage=_usage(job, self.chat) if job is not None else None, **self.body.echo())


def _usage(job: Job, chat: dict) -> ResponsesUsage:
    usage = chat_usage(job, chat)
    details = usage.completion_tokens_details
    return ResponsesUsage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                          total_tokens=usage.total_tokens,
                          output_tokens_details=OutputTokensDetails(reasoning_tokens=details.reasoning_tokens
                                                                    if details is not None else 0))


class _Events:
    """Server-sent events of the Responses API: `event: TYPE` and its JSON with the next sequence_number."""

    def __init__(self):
        self.sequence_number = 0

    def __call__(self, kind: str, **fields) -> str:
        data = {"type": kind, "sequence_number": self.sequence_number,
                **{k: v.model_dump(mode="json") if hasattr(v, "model_dump") else v for k, v in fields.items()}}
        self.sequence_number += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    def error(self, info) -> str:
        return self("error", code=info.code, message=info.message, param=info.param)


def _stream(job: Job, frame: _Frame):
    """response.created and .in_progress; then per item: output_item.added, its content part or arguments as deltas
    and their .done events, output_item.done; then response.completed (or .incomplete) with the whole response."""
    event = _Events()

    async def events():
        yield event("response.created", response=frame.response([], False, None))
        yield event("response.in_progress", response=frame.response([], False, None))
        items: list = []  # finished output items
        stream = AnswerStream(frame.chat)
        open_item = None  # (kind, id, text so far) of the reasoning or message being streamed
        calls, finish = [], None

        def start(kind: str):
            nonlocal open_item
            open_item = (kind, _item_id("rs" if kind == "reasoning" else "msg"), "")
            index, item_id = len(items), open_item[1]
            item = (_reasoning_item if kind == "reasoning" else _message_item)(item_id, "", "in_progress")
            part = ReasoningText(text="") if kind == "reasoning" else OutputText(text="")
            return [event("response.output_item.added", output_index=index, item=item),
                    event("response.content_part.added", output_index=index, item_id=item_id, content_index=0,
                          part=part)]

        def delta(text: str):
            nonlocal open_item
            kind, item_id, so_far = open_item
            open_item = (kind, item_id, so_far + text)
            name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
            extra = {} if kind == "reasoning" else {"logprobs": []}
            return [event(name, output_index=len(items), item_id=item_id, content_index=0, delta=text, **extra)]

        def close(status: str = "completed"):
            nonlocal open_item
            kind, item_id, text = open_item
            index, open_item = len(items), None
            item = (_reasoning_item if kind == "reasoning" else _message_item)(item_id, text, status)
            name = "response.reasoning_text.done" if kind == "reasoning" else "response.output_text.done"
            extra = {} if kind == "reasoning" else {"logprobs": []}
            items.append(item)
            return [event(name, output_index=index, item_id=item_id, content_index=0, text=text, **extra),
                    event("response.content_part.done", output_index=index, item_id=item_id, content_index=0,
                          part=item.content[0]),
                    event("response.output_item.done", output_index=index, item=item)]

        def write(kind: str, text: str):
            out = []
            if open_item is not None and open_item[0] != kind:
                out += close()
            if open_item is None:
                out += start(kind)
            return out + delta(text)

        async for _, ev in job.events():
            finish = ev.finish_reason or finish
            thought, text, new_calls = stream.feed(ev.text, ev.finish_reason is not None)
            calls += new_calls
            for chunk in (write("reasoning", thought) if thought else []) + (write("message", text) if text else []):
                yield chunk
        incomplete = finish == "length" and not calls
        if open_item is not None:
            for chunk in close("incomplete" if incomplete else "completed"):
                yield chunk
        if not items and not calls:  # nothing written: an empty message, as the response without stream has
            for chunk in start("message") + close("incomplete" if incomplete else "completed"):
                yield chunk
        for call in calls:
            item = _call_item(call)
            for chunk in _stream_call(event, len(items), item):
                yield chunk
            items.append(item)
        final = frame.response(items, incomplete, job)
        yield event("response.incomplete" if incomplete else "response.completed", response=final)

    return guarded(job, events(), error_event=event.error, done="")


def _stream_call(event: _Events, index: int, item: FunctionCallItem) -> list[str]:
    added = item.model_copy(update={"arguments": "", "status": "in_progress"})
    return [event("response.output_item.added", output_index=index, item=added),
            event("response.function_call_arguments.delta", output_index=index, item_id=item.id,
                  delta=item.arguments),
            event("response.function_call_arguments.done", output_index=index, item_id=item.id,
                  arguments=item.arguments, name=item.name),
            event("response.output_item.done", output_index=index, item=item)]
