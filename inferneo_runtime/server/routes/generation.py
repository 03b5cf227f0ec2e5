"""/v1/completions and /v1/chat/completions: admitted by ServerState.open_job, answered whole or streamed."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from functools import partial
from typing import Optional

from fastapi import FastAPI, Request, Response

from ...sampling import TokenLogprobs
from ..errors import ERROR_RESPONSES
from ..jobs import Job
from ..protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
                        ChatTokenLogprob, ChoiceLogprobs, CompletionChoice, CompletionLogprobs, CompletionRequest,
                        CompletionResponse, CompletionTokensDetails, ParamError, PromptLogprob, ResponseMessage,
                        TopLogprob, UsageInfo)
from ..state import ServerState
from ..streaming import EventStream, end_stream, guarded, run_to_end, sse


def add_routes(app: FastAPI, state: ServerState) -> None:
    # -- completions -----------------------------------------------------------------------------------
    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES)
    async def completions(body: CompletionRequest, request: Request, response: Response):
        prompts = body.prompts()
        echoed: list[str] = []  # with echo: the text of each prompt
        prompt_ids: list[list[int]] = []  # each prompt's tokens

        def prepare(job: Job) -> None:
            ids_list, params, defaults = [], [], state.sampling_defaults(job)
            for p in prompts:
                ids = job.tokenizer.encode(p) if isinstance(p, str) else list(p)
                job.prompt_tokens += len(ids)
                prompt_ids.append(ids)
                if body.echo:  # each choice's text starts with its prompt (token prompts: decoded)
                    echoed.append(p if isinstance(p, str) else
                                  job.tokenizer.decode(ids, skip_special_tokens=body.skip_special_tokens))
                for i in range(body.samples):  # sample p * samples + i draws with seed + i
                    sp = body.to_sampling_params(defaults, seed_offset=i)
                    state.check_context(job, ids, sp, "prompt")
                    ids_list.append(ids)
                    params.append(sp)
            job.submit(ids_list, params)

        job = await state.open_job("completions", body, request, len(prompts) * body.samples, prepare)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        model = state.model_field(body, job)
        if body.stream:
            return EventStream(_stream_completion(job, rid, created, body, model, echoed, prompt_ids),
                                on_close=partial(end_stream, job), headers=state.response_headers(job))
        await run_to_end(job, request)
        choices = [CompletionChoice(index=i, text=(echoed[i // body.n] if echoed else "") + s.text,
                                    finish_reason=s.finish_reason,
                                    logprobs=_choice_logprobs(job, body, s, prompt_ids[i // body.n])
                                    if body.logprobs is not None else None,
                                    prompt_logprobs=_prompt_logprobs(job.tokenizer, s.prompt_logprobs,
                                                                     body.prompt_logprobs))
                   for i, s in enumerate(_best_of(job.seqs, body.samples, body.n))]
        job.call.finish(200)
        response.headers.update(state.response_headers(job))
        return CompletionResponse(id=rid, created=created, model=model, choices=choices, usage=job.usage())

    # -- chat completions --------------------------------------------------------------------------------
    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request, response: Response):
        chat = new_chat(body)
        prepare = partial(prepare_chat, state, body, chat)
        job = await state.open_job("chat", body, request, body.n, prepare)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        model = state.model_field(body, job)
        if body.stream:
            return EventStream(_stream_chat(job, rid, created, body, model, chat),
                                on_close=partial(end_stream, job), headers=state.response_headers(job))
        await run_to_end(job, request)
        choices = []
        for i, s in enumerate(job.seqs):
            answer = chat_answer(chat, s)
            message = ResponseMessage(content=answer.content, reasoning=answer.reasoning,
                                      reasoning_content=answer.reasoning,
                                      tool_calls=[c.to_openai() for c in answer.calls] or None)
            choices.append(ChatChoice(index=i, message=message, finish_reason=answer.finish_reason,
                                      logprobs=_chat_logprobs(job.tokenizer, s.logprobs) if body.logprobs else None))
        job.call.finish(200)
        response.headers.update(state.response_headers(job))
        return ChatCompletionResponse(id=rid, created=created, model=model, choices=choices,
                                      usage=chat_usage(job, chat),
                                      prompt_logprobs=_prompt_logprobs(job.tokenizer, job.seqs[0].prompt_logprobs,
                                                                       body.prompt_logprobs))


# -- the chat machinery, shared with /v1/responses (routes/responses.py) ------------------------------------------
def new_chat(body: ChatCompletionRequest) -> dict:
    """What prepare_chat finds out: the tool-call parser and tools when the request offers tools, the reasoning split
    (reasoning.Reasoning, or harmony.Harmony, which also splits out the tool calls) when the model reasons, whether
    the text keeps special tokens, and the first sequence's SamplingParams."""
    return {"parser": None, "tools": None, "reasoning": None, "skip_special_tokens": body.skip_special_tokens,
            "params": None}


def prepare_chat(state: ServerState, body: ChatCompletionRequest, chat: dict, job: Job) -> None:
    """Render and tokenize a chat request, choose its sampling params and constraint, and submit it (on a worker
    thread: ServerState.open_job's `prepare`)."""
    tools, parser, constraint = body.offered_tools(), None, None
    ids = state.encode_chat(job.tokenizer, body)
    job.prompt_tokens = len(ids)
    continued = body.messages[-1].text() if body.continue_final_message else None
    reasoning = chat["reasoning"] = state.reasoning(job, ids, continued)
    if tools is not None and reasoning is not None and reasoning.parses_tools:  # harmony: calls come from the split
        constraint = body.tool_constraint(reasoning.call_format(job.tokenizer), tools)
        chat.update(tools=tools)
    elif tools is not None:
        parser = state.tool_parser(job.tokenizer)
        if parser is None:
            from ...tool_calls import PARSERS

            raise ParamError("tools: this model's chat template shows no tool-call format this server "
                             f"knows ({', '.join(PARSERS)}); start the server with "
                             "--tool-call-parser NAME", param="tools")
        constraint = body.tool_constraint(parser, tools)
        chat.update(parser=parser, tools=tools)  # the tools type qwen3_coder's text values
    constraint = _after_reasoning(body.output_constraint(constraint), reasoning, job.tokenizer)
    max_seq = job.driver.max_sequence
    room = max_seq - len(ids)
    if room < 1 and body.requested_max_tokens is None:
        raise ParamError(f"This model's maximum context length is {max_seq} tokens. However, your messages "
                         f"resulted in {len(ids)} tokens. Please reduce the length of the messages.",
                         param="messages", code="context_length_exceeded")
    defaults = state.sampling_defaults(job)
    default_max = min(room, defaults.get("max_tokens") or state.config.max_chat_default_tokens)
    keep_special = (parser is not None and parser.name == "mistral") or (
        reasoning is not None and reasoning.keeps_special(job.tokenizer))
    params = [body.to_sampling_params(max(default_max, 1), defaults, seed_offset=i,
                                      constraint=constraint, keep_special_tokens=keep_special)
              for i in range(body.n)]
    chat.update(skip_special_tokens=params[0].skip_special_tokens, params=params[0])
    for sp in params:
        state.check_context(job, ids, sp, "messages")
    job.submit([ids] * body.n, params)


@dataclass
class Answer:
    """One chat choice's finished output, split: its reasoning, its content and the tool calls parsed from it."""

    reasoning: Optional[str]
    content: Optional[str]
    calls: list  # tool_calls.ToolCall
    finish_reason: Optional[str]  # "tool_calls" when there are calls


def chat_answer(chat: dict, seq) -> Answer:
    """A finished sequence's reasoning, content and tool calls. Calls are read from the content only: a <tool_call>
    written while thinking is not a call. Harmony marks its calls itself: they come from the split."""
    thought, content = None, seq.text
    if chat["reasoning"] is not None:
        split = chat["reasoning"].split(seq.text)
        thought, content = split.reasoning, split.content
        if split.calls:
            return Answer(thought, content, list(split.calls), "tool_calls")
    parser = chat["parser"]
    parsed = parser.parse(content, chat["tools"]) if parser is not None and content is not None else None
    if parsed is not None and parsed.calls:  # OpenAI's shape: the calls, the text before them, "tool_calls"
        return Answer(thought, parsed.content, parsed.calls, "tool_calls")
    return Answer(thought, content, [], seq.finish_reason)


class AnswerStream:
    """One chat choice's streamed output, split as chat_answer splits it: `feed(text, finished)` -> (reasoning,
    content, tool calls) to send now. With the reasoning split (reasoning.ReasoningStream, or harmony.HarmonyStream,
    whose calls come when the output ends) the thinking comes first; with tools (tool_calls.ToolStream) content
    streams until a call's marker, the rest is held and the calls come when the output ends."""

    def __init__(self, chat: dict):
        from ...tool_calls import ToolStream

        self.reasoning = chat["reasoning"].stream() if chat["reasoning"] is not None else None
        self.tools = ToolStream(chat["parser"], chat["tools"]) if chat["parser"] is not None else None

    def feed(self, text: str, finished: bool) -> tuple[str, str, list]:
        thought, answer = "", text
        if self.reasoning is not None:
            thought, answer = self.reasoning.feed(text) if text else ("", "")
            if finished:
                rest = self.reasoning.finish()
                thought, answer = thought + rest[0], answer + rest[1]
        calls = list(self.reasoning.calls) if finished and self.reasoning is not None else []
        if self.tools is not None:
            answer = self.tools.feed(answer) if answer else ""
            if finished:
                rest, parsed = self.tools.finish()
                answer, calls = answer + rest, calls + parsed
        return thought, answer, calls


def _after_reasoning(constraint, reasoning, tokenizer):
    """The output constraint, enforced after the model's reasoning when it reasons (vLLM's rule): a JSON answer or a
    forced tool call follows the thinking instead of replacing it."""
    if constraint is None or reasoning is None:
        return constraint
    from ...structured import ConstraintError

    try:
        return reasoning.constrain(constraint, tokenizer)
    except ConstraintError as e:
        raise ParamError(f"{e}; or start the server with --reasoning-parser none", param=e.param) from None


def chat_usage(job: Job, chat: dict) -> UsageInfo:
    """The job's usage; for a model that reasons, with OpenAI's completion_tokens_details.reasoning_tokens."""
    usage = job.usage()
    reasoning = chat["reasoning"]
    if reasoning is None:
        return usage
    count = sum(reasoning.token_count(job.tokenizer, s.token_ids, chat["skip_special_tokens"]) for s in job.seqs)
    return usage.model_copy(update={"completion_tokens_details": CompletionTokensDetails(reasoning_tokens=count)})


def _best_of(seqs: list, samples: int, n: int) -> list:
    """Of each prompt's `samples` sequences, the `n` with the highest log-probability (all of them when equal)."""
    if samples == n:
        return seqs
    best = []
    for start in range(0, len(seqs), samples):
        group = seqs[start:start + samples]
        best += sorted(group, key=lambda s: -sum(lp.logprob for lp in s.logprobs))[:n]
    return best


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _completion_logprobs(tokenizer, lps: list[TokenLogprobs], offset: int,
                         top_n: Optional[int] = None) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for lp in lps:
        text = _token_text(tokenizer, lp.token_id)
        out.tokens.append(text)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append({_token_text(tokenizer, t): v for t, v in lp.top[:top_n]})
        out.text_offset.append(offset)
        offset += len(text)
    return out


def _joined(*parts: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(**{k: [x for p in parts for x in getattr(p, k)] for k in CompletionLogprobs.model_fields})


def _echo_logprobs(tokenizer, ids: list[int], prompt: list[Optional[TokenLogprobs]], top_n: int) -> CompletionLogprobs:
    """OpenAI's legacy echo + logprobs: the prompt's tokens first, the first of them without a logprob."""
    first = _token_text(tokenizer, ids[0])
    head = CompletionLogprobs(tokens=[first], token_logprobs=[None], top_logprobs=[None], text_offset=[0])
    return _joined(head, _completion_logprobs(tokenizer, prompt[1:], len(first), top_n))


def _choice_logprobs(job: Job, body: CompletionRequest, s, prompt_ids: list[int]) -> CompletionLogprobs:
    """A choice's logprobs: its tokens', after its echoed prompt's with echo."""
    if not (body.echo and s.prompt_logprobs is not None):
        return _completion_logprobs(job.tokenizer, s.logprobs, 0)
    head = _echo_logprobs(job.tokenizer, prompt_ids, s.prompt_logprobs, body.logprobs)
    return _joined(head, _completion_logprobs(job.tokenizer, s.logprobs, sum(len(t) for t in head.tokens)))


def _prompt_logprobs(tokenizer, prompt: Optional[list[Optional[TokenLogprobs]]], top_n: Optional[int]):
    """vLLM's prompt_logprobs: per prompt token, None for the first, else {token id: logprob, rank, text} for the
    token itself and the top `top_n` alternatives."""
    if prompt is None or top_n is None:
        return None

    def entry(t: int, logprob: float, rank: int) -> tuple[str, PromptLogprob]:
        return str(t), PromptLogprob(logprob=logprob, rank=rank, decoded_token=_token_text(tokenizer, t))

    out = [None]
    for lp in prompt[1:]:
        out.append(dict([entry(t, v, r + 1) for r, (t, v) in enumerate(lp.top[:top_n])]
                        + [entry(lp.token_id, lp.logprob, lp.rank)]))
    return out


def _chat_logprobs(tokenizer, lps: list[TokenLogprobs]) -> ChoiceLogprobs:
    def top(t: int, v: float) -> TopLogprob:
        s = _token_text(tokenizer, t)
        return TopLogprob(token=s, logprob=v, bytes=list(tokenizer.token_bytes(t, s)))

    content = []
    for lp in lps:
        s = _token_text(tokenizer, lp.token_id)
        content.append(ChatTokenLogprob(token=s, logprob=lp.logprob, bytes=list(tokenizer.token_bytes(lp.token_id, s)),
                                        top_logprobs=[top(t, v) for t, v in lp.top]))
    return ChoiceLogprobs(content=content)


def _stream_completion(job: Job, rid: str, created: int, body: CompletionRequest, model: str,
                       echoed: list[str], prompt_ids: list[list[int]]):
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    # echo with logprobs: the prompt's logprobs come with a choice's first token, so its echo chunk waits for it
    late_echo = bool(echoed) and body.logprobs is not None

    async def chunks():
        offsets = [0] * len(job.tickets)
        for i in range(len(job.tickets) if echoed and not late_echo else 0):  # the prompt first, as vLLM streams it
            choice = CompletionChoice(index=i, text=echoed[i // body.n])
            yield sse(CompletionResponse(id=rid, created=created, model=model, choices=[choice]))
        async for i, ev in job.events():
            if late_echo and ev.prompt_logprobs is not None:
                lp = _echo_logprobs(job.tokenizer, prompt_ids[i // body.n], ev.prompt_logprobs, body.logprobs)
                offsets[i] = sum(len(t) for t in lp.tokens)
                choice = CompletionChoice(index=i, text=echoed[i // body.n], logprobs=lp)
                yield sse(CompletionResponse(id=rid, created=created, model=model, choices=[choice]))
            lp = None
            if ev.logprobs is not None:
                lp = _completion_logprobs(job.tokenizer, [ev.logprobs], offsets[i])
                offsets[i] += sum(len(t) for t in lp.tokens)
            if not ev.text and ev.finish_reason is None and lp is None:
                continue
            choice = CompletionChoice(index=i, text=ev.text, logprobs=lp, finish_reason=ev.finish_reason)
            yield sse(CompletionResponse(id=rid, created=created, model=model, choices=[choice]))
        if include_usage:
            yield sse(CompletionResponse(id=rid, created=created, model=model, choices=[], usage=job.usage()))

    return guarded(job, chunks())


def _stream_chat(job: Job, rid: str, created: int, body: ChatCompletionRequest, model: str, chat: dict):
    """Each choice's text goes through an AnswerStream: its reasoning streams as `reasoning` and `reasoning_content`
    deltas, the answer as `content`; tool calls are sent at the end as `tool_calls` deltas (first the call's id,
    type and name, then its arguments), with finish_reason "tool_calls"."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    streams = [AnswerStream(chat) for _ in range(body.n)]

    def chunk(choices, usage=None) -> str:
        return sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage))

    async def chunks():
        yield chunk([ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""}) for i in range(body.n)])
        async for i, ev in job.events():
            lp = _chat_logprobs(job.tokenizer, [ev.logprobs]) if ev.logprobs is not None else None
            if not ev.text and ev.finish_reason is None and lp is None:
                continue
            finish = ev.finish_reason
            thought, text, calls = streams[i].feed(ev.text, finish is not None)
            if thought:
                yield chunk([ChatChunkChoice(index=i, delta={"reasoning": thought, "reasoning_content": thought},
                                             logprobs=lp)])
                lp = None
            if calls:
                if text or lp is not None:
                    yield chunk([ChatChunkChoice(index=i, delta={"content": text} if text else {}, logprobs=lp)])
                text, lp, finish = "", None, "tool_calls"
                for k, call in enumerate(calls):
                    head = {"index": k, "id": call.id, "type": "function",
                            "function": {"name": call.name, "arguments": ""}}
                    yield chunk([ChatChunkChoice(index=i, delta={"tool_calls": [head]})])
                    yield chunk([ChatChunkChoice(index=i, delta={"tool_calls": [
                        {"index": k, "function": {"arguments": call.arguments}}]})])
            if not text and finish is None and lp is None:
                continue
            delta = {"content": text} if text else {}
            yield chunk([ChatChunkChoice(index=i, delta=delta, logprobs=lp, finish_reason=finish)])
        if include_usage:
            yield chunk([], usage=chat_usage(job, chat))

    return guarded(job, chunks())
