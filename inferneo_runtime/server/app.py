"""The FastAPI app: OpenAI-compatible endpoints over the registry's models and their engine drivers.

A request: bound the body (413 over `max_request_bytes`) → parse (pydantic; errors become OpenAI-shaped 400s)
→ check the per-request limits (n, max_tokens, prompt size, stop lists: 400) → route it (an explicit model
name goes to that model; otherwise routing rules, A/B tests, the default model; routing.py) → find the model
(404) → count a stream against its client (429 beyond `max_streams_per_client`) and the request against
`max_concurrent_requests` (429) → reserve room in the queue (429 when `max_queue` sequences are already in
flight) → lease the model (loading it, or 503 when it cannot fit the budget) → tokenize and check the
context bound (400 naming the numbers) → submit one ticket per sequence (n per prompt, seed + i) to the
model's driver → await TokenEvents on an asyncio.Queue fed from the driver thread with
loop.call_soon_threadsafe → answer, or stream server-sent events ending in `data: [DONE]`. Everything taken
is given back when the answer ends; a streaming client that disconnects cancels its tickets, which frees
their engine slots at the next step.

Validation errors are mapped to 400 (OpenAI answers bad parameters with 400, and so do the openai
clients' BadRequestError), not FastAPI's default 422. Management endpoints (register / load / unload /
unregister models, routing rules, A/B tests) are guarded by admin_guard.py (Host allow-list, Origin, JSON
bodies, the admin token or a loopback peer); what they may register, by registration_policy.py.

Where each part lives: errors.py (exceptions -> HTTP status and OpenAI error), state.py (shared state and
admission), jobs.py (a request's sequences and what it holds), streaming.py (SSE and waiting for an answer),
middleware.py (draining, API key), routes/ (one module per endpoint family), lifecycle.py (`run_server`: start,
warm up, drain on SIGTERM).
"""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from .. import __version__
from ..registry import ModelRegistry
from .config import ServerConfig
from .errors import ENDPOINTS, add_error_handlers
from .jobs import Call
from .limits import BodyLimit
from .middleware import RefuseWhileDraining, RequireAPIKey
from .routes import generation, models, responses, service
from .state import ServerState


def create_app(registry: ModelRegistry, config: ServerConfig) -> FastAPI:
    """The app over `registry` (a ModelRegistry or ModelManager) with `config`'s settings. The registry is
    closed (drained) when the app shuts down. Loading and warming up the models is the caller's:
    `app.state.inferneo.start_models()` (run_server runs it on a thread, a Ray replica in its constructor)."""
    state = ServerState(registry, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.shutting_down = True  # uvicorn has already waited for in-flight requests; drain the engines
        await asyncio.to_thread(registry.close, config.graceful_timeout_s)
        state.lease_waits.shutdown(wait=False)  # its waits ended: the closed registry refuses leases

    app = FastAPI(title="Inferneo", version=__version__, lifespan=lifespan)
    app.state.inferneo = state
    app.add_middleware(BodyLimit, max_bytes=config.max_request_bytes)
    app.add_middleware(RequireAPIKey, config=config)  # outside BodyLimit: a keyless request is not read
    app.add_middleware(RefuseWhileDraining, state=state)
    if config.allowed_origins:  # outermost: a browser's preflight carries no API key and is answered here
        app.add_middleware(CORSMiddleware, allow_origins=config.allowed_origins, allow_methods=config.allowed_methods,
                           allow_headers=config.allowed_headers, allow_credentials=config.allow_credentials)

    def count_refused(path: str, status: int) -> None:
        if path in ENDPOINTS:
            Call(state, ENDPOINTS[path]).finish(status)

    add_error_handlers(app, count_refused)
    for routes in (service, models, generation, responses):
        routes.add_routes(app, state)
    return app

