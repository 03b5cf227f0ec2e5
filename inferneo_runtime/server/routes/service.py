"""Probes (/health, /ready), /metrics, /version, vLLM's /tokenize and /detokenize, and /v1/embeddings."""
from __future__ import annotations

import asyncio
from functools import partial
from typing import Optional

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ... import __version__
from ...errors import RequestError
from ...registry import Lease
from ..errors import ERROR_RESPONSES
from ..metrics import CONTENT_TYPE
from ..protocol import (DetokenizeRequest, DetokenizeResponse, Embedding, EmbeddingRequest, EmbeddingResponse,
                        EmbeddingUsage, ParamError, TokenizeChatRequest, TokenizeCompletionRequest, TokenizeResponse)
from ..routing import RouteContext
from ..state import ServerState


def add_routes(app: FastAPI, state: ServerState) -> None:
    registry, config = state.registry, state.config

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        """200 once the models loaded at startup are loaded and warmed up (lazy ones load on first use and do not
        count); 503 while they load, when nothing can be served, and from SIGTERM on."""
        if state.shutting_down:
            return JSONResponse({"status": "not ready", "reason": "shutting down"}, status_code=503)
        if state.starting:
            return JSONResponse({"status": "not ready", "reason": "loading and warming up the models"},
                                status_code=503)
        loaded = registry.loaded()
        entries = list(registry.entries.values())
        errors = {e.key: e.error for e in entries if e.error}
        # not ready: nothing to serve, or nothing loaded because loading failed (unloaded models load on use)
        if not loaded and (not entries or (errors and not config.lazy)):
            return JSONResponse({"status": "not ready", "reason": "no model is loaded", "errors": errors},
                                status_code=503)
        return {"status": "ready", "models": registry.names, "loaded": loaded, "warmed": list(state.warmed)}

    @app.get("/metrics")
    async def metrics():
        if not config.enable_metrics:
            raise StarletteHTTPException(404, "metrics are off (enable_metrics: false)")
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    # -- vLLM's tokenizer endpoints and /version ------------------------------------------------------------
    async def lease_for(model: Optional[str], request: Request) -> Lease:
        """The model a /tokenize or /detokenize request names (or the routing default), leased (loaded if need be)."""
        ctx = RouteContext(prompt="", headers={k.lower(): v for k, v in request.headers.items()}, user=None)
        names = list(dict.fromkeys(e.name for e in list(registry.entries.values())))
        entry = registry.entry(state.router.route(model, ctx, names).model)
        return registry.try_acquire(entry.key) or await state.acquire(entry.key)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
    async def tokenize(body: dict, request: Request):
        # vLLM's two shapes: {prompt} or {messages} (a union would name the wrong one's fields in errors)
        try:
            body = (TokenizeChatRequest if "messages" in body else TokenizeCompletionRequest).model_validate(body)
        except ValidationError as e:  # answered as FastAPI's own validation errors are: a 400 naming the field
            raise RequestValidationError(e.errors()) from None
        lease = await lease_for(body.model, request)
        try:
            tokenizer = lease.model.tokenizer
            if isinstance(body, TokenizeChatRequest):
                ids = await asyncio.to_thread(state.encode_chat, tokenizer, body)
            else:
                ids = await asyncio.to_thread(tokenizer.encode, body.prompt, body.add_special_tokens)
            return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=lease.driver.max_sequence)
        finally:
            lease.release()

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
    async def detokenize(body: DetokenizeRequest, request: Request):
        lease = await lease_for(body.model, request)
        try:
            model = lease.model
            vocab = model.manifest.model.vocab if model.manifest is not None else getattr(model, "vocab_size", None)
            bad = next((t for t in body.tokens if not t < vocab), None) if vocab else None
            if bad is not None:
                raise ParamError(f"token id {bad} is outside the model's vocabulary [0, {vocab})", param="tokens")
            return DetokenizeResponse(prompt=await asyncio.to_thread(model.tokenizer.decode, body.tokens))
        finally:
            lease.release()

    # -- embeddings (encoder artifacts: task feature-extraction) -------------------------------------------
    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERROR_RESPONSES)
    async def embeddings(body: EmbeddingRequest):
        import base64

        from ...embedding import EmbeddingModel

        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts:
            raise ParamError("input must hold at least one text", param="input")
        lease = await state.acquire(body.model)
        try:
            model = lease.model
            if not isinstance(model, EmbeddingModel) or model.info.output != "embedding":
                raise ParamError(f"model {body.model!r} does not return embeddings", param="model")
            if body.dimensions is not None and body.dimensions != model.dim:
                raise ParamError(f"dimensions {body.dimensions} is not supported: {body.model!r} returns {model.dim}",
                                 param="dimensions")
            try:
                prompt, _ = model.prompt_for(body.prompt_name)
            except RequestError as e:
                raise ParamError(str(e), param="prompt_name") from None
            vectors = await anyio.to_thread.run_sync(partial(model.embed, texts, prompt_name=body.prompt_name))
            tokens = int(model.tokenize(texts, prompt)["attention_mask"].sum())
        finally:
            lease.release()
        data = [Embedding(index=i, embedding=base64.b64encode(v.astype("<f4").tobytes()).decode()
                          if body.encoding_format == "base64" else v.tolist()) for i, v in enumerate(vectors)]
        return EmbeddingResponse(data=data, model=body.model, usage=EmbeddingUsage(prompt_tokens=tokens,
                                                                                   total_tokens=tokens))
