"""/v1/completions and /v1/chat/completions: admitted by ServerState.open_job, answered whole or streamed."""
from __future__ import annotations

import time
import uuid
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
    config = state.config

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
        # what prepare finds out: the tool-call parser and tools when the request offers tools, the reasoning split
        # (reasoning.Reasoning) when the model reasons, and whether the text keeps special tokens
        chat = {"parser": None, "tools": None, "reasoning": None, "skip_special_tokens": body.skip_special_tokens}

        def prepare(job: Job) -> None:
            tools, parser, constraint = body.offered_tools(), None, None
            if tools is not None:
                parser = state.tool_parser(job.tokenizer)
                if parser is None:
                    from ...tool_calls import PARSERS

                    raise ParamError("tools: this model's chat template shows no tool-call format this server "
                                     f"knows ({', '.join(PARSERS)}); start the server with "
                                     "--tool-call-parser NAME", param="tools")
                constraint = body.tool_constraint(parser, tools)
                chat.update(parser=parser, tools=tools)  # the tools type qwen3_coder's text values
            ids = state.encode_chat(job.tokenizer, body)
            job.prompt_tokens = len(ids)
            reasoning = chat["reasoning"] = state.reasoning(job, ids)
            constraint = _after_reasoning(body.output_constraint(constraint), reasoning, job.tokenizer)
            max_seq = job.driver.max_sequence
            room = max_seq - len(ids)
            if room < 1 and body.requested_max_tokens is None:
                raise ParamError(f"This model's maximum context length is {max_seq} tokens. However, your messages "
                                 f"resulted in {len(ids)} tokens. Please reduce the length of the messages.",
                                 param="messages", code="context_length_exceeded")
            defaults = state.sampling_defaults(job)
            default_max = min(room, defaults.get("max_tokens") or config.max_chat_default_tokens)
            keep_special = (parser is not None and parser.name == "mistral") or (
                reasoning is not None and _tags_are_special(job.tokenizer))
            params = [body.to_sampling_params(max(default_max, 1), defaults, seed_offset=i,
                                              constraint=constraint, keep_special_tokens=keep_special)
                      for i in range(body.n)]
            chat["skip_special_tokens"] = params[0].skip_special_tokens
            for sp in params:
                state.check_context(job, ids, sp, "messages")
            job.submit([ids] * body.n, params)

        job = await state.open_job("chat", body, request, body.n, prepare)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        model = state.model_field(body, job)
        if body.stream:
            return EventStream(_stream_chat(job, rid, created, body, model, chat),
                                on_close=partial(end_stream, job), headers=state.response_headers(job))
        await run_to_end(job, request)
        choices = []
        for i, s in enumerate(job.seqs):
            thought, content = None, s.text
            if chat["reasoning"] is not None:
                split = chat["reasoning"].split(s.text)
                thought, content = split.reasoning, split.content
            message = ResponseMessage(content=content, reasoning=thought, reasoning_content=thought)
            finish = s.finish_reason
            parser = chat["parser"]
            # tool calls are read from the answer only: a <tool_call> written while thinking is not a call
            parsed = parser.parse(content, chat["tools"]) if parser is not None and content is not None else None
            if parsed is not None and parsed.calls:  # OpenAI's shape: the calls, the text before them, "tool_calls"
                message = message.model_copy(update={"content": parsed.content,
                                                     "tool_calls": [c.to_openai() for c in parsed.calls]})
                finish = "tool_calls"
            choices.append(ChatChoice(index=i, message=message, finish_reason=finish,
                                      logprobs=_chat_logprobs(job.tokenizer, s.logprobs) if body.logprobs else None))
        job.call.finish(200)
        response.headers.update(state.response_headers(job))
        return ChatCompletionResponse(id=rid, created=created, model=model, choices=choices,
                                      usage=_chat_usage(job, chat),
                                      prompt_logprobs=_prompt_logprobs(job.tokenizer, job.seqs[0].prompt_logprobs,
                                                                       body.prompt_logprobs))


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


def _tags_are_special(tokenizer) -> bool:
    from ...reasoning import tags_are_special

    return tags_are_special(tokenizer)


def _chat_usage(job: Job, chat: dict) -> UsageInfo:
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
    """`chat["reasoning"]`: the model reasons; each choice's text goes through a reasoning.ReasoningStream first:
    its reasoning streams as `reasoning` and `reasoning_content` deltas, the rest as the answer.
    `chat["parser"]`: the request offers tools; each choice's answer goes through a tool_calls.ToolStream: content
    streams until a call's marker, the rest is held and sent at the end as `tool_calls` deltas (first the call's id,
    type and name, then its arguments), with finish_reason "tool_calls"."""
    from ...tool_calls import ToolStream

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    parser = chat["parser"]
    tool_streams = [ToolStream(parser, chat["tools"]) for _ in range(body.n)] if parser is not None else None
    reasoning_streams = ([chat["reasoning"].stream() for _ in range(body.n)] if chat["reasoning"] is not None
                         else None)

    def chunk(choices, usage=None) -> str:
        return sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage))

    def split(i: int, text: str, finished: bool) -> tuple[str, str]:
        """(reasoning, answer) of a choice's new text."""
        if reasoning_streams is None:
            return "", text
        thought, answer = reasoning_streams[i].feed(text) if text else ("", "")
        if finished:
            rest = reasoning_streams[i].finish()
            thought, answer = thought + rest[0], answer + rest[1]
        return thought, answer

    async def chunks():
        yield chunk([ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""}) for i in range(body.n)])
        async for i, ev in job.events():
            lp = _chat_logprobs(job.tokenizer, [ev.logprobs]) if ev.logprobs is not None else None
            if not ev.text and ev.finish_reason is None and lp is None:
                continue
            finish = ev.finish_reason
            thought, text = split(i, ev.text, finish is not None)
            if thought:
                yield chunk([ChatChunkChoice(index=i, delta={"reasoning": thought, "reasoning_content": thought},
                                             logprobs=lp)])
                lp = None
            if tool_streams is not None:
                text = tool_streams[i].feed(text) if text else ""
                if finish is not None:
                    rest, calls = tool_streams[i].finish()
                    text += rest
                    if calls:
                        if text or lp is not None:
                            yield chunk([ChatChunkChoice(index=i, delta={"content": text} if text else {},
                                                         logprobs=lp)])
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
            yield chunk([], usage=_chat_usage(job, chat))

    return guarded(job, chunks())
