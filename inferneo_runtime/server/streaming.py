"""How a generation request's answer goes out: server-sent events (`EventStream`, `guarded`, `sse`) or, not
streamed, one wait for every sequence (`run_to_end`). Either way a client that goes away cancels its sequences."""
from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterator, Callable, Optional

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse

from ..drivers import Cancelled
from .errors import ClientGone, error_info
from .jobs import Job
from .protocol import ErrorResponse

logger = logging.getLogger("inferneo.server")


def sse(payload) -> str:
    body = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {body}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events that stop (cancelling the generator) when the client disconnects, whatever the
    ASGI spec version, and that always run `on_close` at the end."""

    media_type = "text/event-stream"

    def __init__(self, content, on_close: Callable[[], None], headers: Optional[dict] = None):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away mid-write
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            self._on_close()


async def run_to_end(job: Job, request: Request) -> None:
    """Wait for every sequence of a non-streaming request; the lease and queue room are given back after. A client
    that closes its connection meanwhile ends the request: its sequences are cancelled at the engine's next step."""
    watcher = asyncio.ensure_future(watch_disconnect(job, request))
    try:
        async for _ in job.events():
            pass
    except BaseException as e:
        job.call.finish(499 if isinstance(e, (asyncio.CancelledError, ClientGone)) else error_info(e)[0])
        raise
    finally:
        watcher.cancel()
        job.close()


async def watch_disconnect(job: Job, request: Request) -> None:
    # the body has been read, so the next ASGI message is the disconnect (uvicorn sends it when the socket closes)
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.abort(ClientGone("the client closed the connection; its sequences were cancelled"))
            return


def end_stream(job: Job) -> None:
    job.close()
    job.call.finish(499)  # a no-op when the stream already recorded how it ended


def chat_error_event(info) -> str:
    return sse(ErrorResponse(error=info))


async def guarded(job: Job, chunks: AsyncIterator[str], error_event: Callable[..., str] = chat_error_event,
                  done: str = "data: [DONE]\n\n") -> AsyncIterator[str]:
    """Record the stream's outcome; an error after the headers went out becomes an error event (`error_event(info)`,
    info an ErrorInfo), and the stream ends with `done` (the Responses API's streams have no [DONE])."""
    try:
        async for chunk in chunks:
            yield chunk
    except (asyncio.CancelledError, GeneratorExit, Cancelled):
        job.call.finish(499)
        raise
    except Exception as e:  # noqa: BLE001 - the status line is sent; report in-band as OpenAI does
        status, info = error_info(e)
        if status >= 500 and status != 503:
            logger.exception("stream failed", exc_info=e)
        job.call.finish(status)
        yield error_event(info)
        if done:
            yield done
        return
    job.call.finish(200)
    if done:
        yield done
