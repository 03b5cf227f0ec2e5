"""KServe: a `kserve.Model` predictor over the Inferneo runtime (needs `inferneo[kserve]`).

    python -m inferneo_runtime.integrations.kserve --model_name tiny --artifact /mnt/models --http_port 8080

runs KServe's own model server (`kserve.ModelServer`) with one InferneoModel. `inferneo deploy kserve`
writes an InferenceService whose container runs exactly this, on the artifact KServe's storage initializer
downloaded from S3 into /mnt/models (an s3:// URI also works here: it is fetched into the verified cache).

Protocols (KServe's, on the model server's routes):
- v1  POST /v1/models/<name>:predict  {"instances": ["prompt", {"prompt": "...", "max_tokens": 16, ...}],
      "parameters": {...defaults for every instance}} → {"predictions": [{"text", "token_ids",
      "finish_reason", "prompt_tokens"}]}
- v2  POST /v2/models/<name>/infer  input "text_input" (BYTES, one prompt per element), optional
      "max_tokens" (INT32), "temperature" (FP32) ... or request parameters → outputs "text_output" (BYTES)
      and "finish_reason" (BYTES). (The same tensor names as `inferneo deploy triton`.)
Readiness: KServe reports the model ready (GET /v1/models/<name>, /v2/models/<name>/ready) only after
`load()` has loaded the artifact and run a warm-up generation. Requests share the runtime's engine
driver, so concurrent requests are batched together (continuous batching).

OpenAI: KServe's SDK exposes /openai/v1/completions only for models built on its vLLM-typed
`OpenAIGenerativeModel` (the SDK imports vLLM's protocol classes for it). Without vLLM, deploy with
`inferneo deploy kserve --server openai`, whose container runs `inferneo serve` (the OpenAI-compatible
server) under the same InferenceService, or use Ray Serve.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import uuid
from typing import Any, Optional

import numpy as np

from ..errors import MissingExtraError, RequestError

try:
    import kserve
    from kserve.protocol.infer_type import InferOutput, InferResponse
except ImportError:  # the predictor needs the extra; the rest of the runtime does not
    kserve = None

logger = logging.getLogger("inferneo.integrations")

DEFAULT_MAX_TOKENS = 64
# request field -> SamplingParams field (OpenAI-style names, as `inferneo serve` and the Triton model take)
FIELDS = {"max_tokens": ("max_new_tokens", int), "max_new_tokens": ("max_new_tokens", int),
          "temperature": ("temperature", float), "top_p": ("top_p", float), "top_k": ("top_k", int),
          "seed": ("seed", int), "min_p": ("min_p", float), "repetition_penalty": ("repetition_penalty", float),
          "presence_penalty": ("presence_penalty", float), "frequency_penalty": ("frequency_penalty", float)}


def _require() -> None:
    if kserve is None:
        raise MissingExtraError("the KServe predictor", "kserve", "kserve")


def sampling_params(values: dict, default_max_tokens: int = DEFAULT_MAX_TOKENS):
    from ..sampling import SamplingParams

    kwargs: dict[str, Any] = {"max_new_tokens": default_max_tokens}
    for key, value in values.items():
        if key in FIELDS and value is not None:
            field, kind = FIELDS[key]
            kwargs[field] = kind(value.item() if hasattr(value, "item") else value)
    stop = values.get("stop")
    if stop:
        kwargs["stop"] = tuple([stop] if isinstance(stop, str) else stop)
    return SamplingParams(**kwargs)


class _Base:
    """The predictor's logic, independent of the kserve base class (so it reads on its own)."""

    def _init(self, name: str, artifact: str, target: Optional[str], device: str, threads: Optional[int],
              default_max_tokens: int) -> None:
        self.artifact = artifact
        self.target = target
        self.device = device
        self.threads = threads
        self.default_max_tokens = default_max_tokens
        self.loaded = None

    def load(self) -> bool:
        from .common import LoadedModel

        self.loaded = LoadedModel(self.artifact, target=self.target, device=self.device, threads=self.threads)
        self.ready = True
        logger.info("model %s ready (%s target %s)", self.name, self.loaded.name, self.loaded.model.target)
        return self.ready

    def stop(self) -> None:
        self.ready = False
        if self.loaded is not None:
            self.loaded.close()
            self.loaded = None

    async def _complete(self, prompt, params) -> dict:
        """One prompt (text or token ids) through the engine driver; the event loop waits, never blocks."""
        loaded = self.loaded
        ids = loaded.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        loaded.driver.check(ids, params)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        ticket = loaded.driver.submit(ids, params, lambda item: loop.call_soon_threadsafe(queue.put_nowait, item))
        text, token_ids = [], []
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                text.append(item.text)
                token_ids.append(item.token_id)
                if item.finish_reason is not None:
                    return {"text": "".join(text), "token_ids": token_ids, "finish_reason": item.finish_reason,
                            "prompt_tokens": len(ids)}
        except asyncio.CancelledError:
            loaded.driver.cancel(ticket)
            raise

    # -- v1: {"instances": [...]} -----------------------------------------------------------------------
    async def _predict_v1(self, payload: dict) -> dict:
        instances = payload.get("instances")
        if not isinstance(instances, list) or not instances:
            raise RequestError('v1 requests need "instances": a list of prompts or {"prompt": ..., ...} objects')
        defaults = payload.get("parameters") or {}
        jobs = []
        for inst in instances:
            fields = {"prompt": inst} if isinstance(inst, (str, list)) else dict(inst)
            if "prompt" not in fields:
                raise RequestError('each instance is a prompt string, or an object with "prompt"')
            jobs.append(self._complete(fields.pop("prompt"), sampling_params({**defaults, **fields},
                                                                             self.default_max_tokens)))
        return {"predictions": list(await asyncio.gather(*jobs))}

    # -- v2: text_input tensor ------------------------------------------------------------------------
    async def _predict_v2(self, request) -> Any:
        inputs = {i.name: i for i in request.inputs}
        if "text_input" not in inputs:
            raise RequestError('v2 requests need an input named "text_input" (BYTES)')
        prompts = [p.decode("utf-8") if isinstance(p, bytes) else str(p)
                   for p in np.asarray(inputs["text_input"].as_numpy()).reshape(-1)]
        values = dict(request.parameters or {})
        for name in FIELDS:
            if name in inputs:
                values[name] = np.asarray(inputs[name].as_numpy()).reshape(-1)[0]
        params = sampling_params(values, self.default_max_tokens)
        results = await asyncio.gather(*(self._complete(p, params) for p in prompts))
        texts = np.array([r["text"].encode("utf-8") for r in results], dtype=np.object_)
        reasons = np.array([r["finish_reason"].encode("utf-8") for r in results], dtype=np.object_)
        outputs = []
        for name, data in (("text_output", texts), ("finish_reason", reasons)):
            out = InferOutput(name=name, shape=list(data.shape), datatype="BYTES")
            out.set_data_from_numpy(data, binary_data=False)
            outputs.append(out)
        return InferResponse(response_id=request.id or str(uuid.uuid4()), model_name=self.name,
                             infer_outputs=outputs)

    async def predict(self, payload, headers: Optional[dict] = None, response_headers: Optional[dict] = None):
        if self.loaded is None:
            raise RuntimeError(f"model {self.name} is not loaded")
        try:
            if isinstance(payload, (bytes, str)):  # v1 sent without a JSON content type
                try:
                    payload = json.loads(payload)
                except ValueError:
                    raise RequestError("the request body is not JSON") from None
            if isinstance(payload, dict):
                return await self._predict_v1(payload)
            return await self._predict_v2(payload)
        except RequestError as e:
            from kserve.errors import InvalidInput

            raise InvalidInput(str(e)) from None


if kserve is not None:
    class InferneoModel(_Base, kserve.Model):
        """A KServe predictor serving one Inferneo artifact (directory or s3:// URI)."""

        def __init__(self, name: str, artifact: str, target: Optional[str] = None, device: str = "cpu",
                     threads: Optional[int] = None, default_max_tokens: int = DEFAULT_MAX_TOKENS):
            kserve.Model.__init__(self, name)
            self._init(name, artifact, target, device, threads, default_max_tokens)
else:
    InferneoModel = None


def parser() -> argparse.ArgumentParser:
    _require()
    from kserve.model_server import parser as kserve_parser

    p = argparse.ArgumentParser(parents=[kserve_parser], description="Inferneo predictor on KServe's model server")
    p.add_argument("--artifact", required=True, help="artifact directory (KServe: /mnt/models) or s3:// URI")
    p.add_argument("--target", default=None, help="target to serve (default: the preferred valid one)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads")
    p.add_argument("--default_max_tokens", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--host", default=None, help="address to bind (KServe's server binds 0.0.0.0)")
    return p


def _bind_host(host: str) -> None:
    """KServe's REST server always binds 0.0.0.0; rebind it (e.g. to 127.0.0.1 for a local run)."""
    from kserve import model_server
    from kserve.protocol.rest import server as rest

    base = model_server.RESTServer

    class _HostRESTServer(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.config.host = host
            self._server = type(self._server)(self.config)

    model_server.RESTServer = _HostRESTServer
    rest.RESTServer = _HostRESTServer


def main(argv: Optional[list[str]] = None) -> None:
    args, _ = parser().parse_known_args(argv)
    if args.host:
        _bind_host(args.host)
    model = InferneoModel(args.model_name, args.artifact, target=args.target, device=args.device,
                          threads=args.threads, default_max_tokens=args.default_max_tokens)
    model.load()
    kserve.ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, enable_grpc=args.enable_grpc,
                       workers=1).start([model])


if __name__ == "__main__":
    main()
