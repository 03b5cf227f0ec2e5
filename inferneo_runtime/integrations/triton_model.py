"""Triton Inference Server python-backend model over an Inferneo artifact (`inferneo deploy triton`).

`inferneo deploy triton ARTIFACT OUT` copies this file to OUT/<model>/1/model.py next to a config.pbtxt.
Triton's python backend imports it with `triton_python_backend_utils` (pb_utils) on the path; the model
needs `inferneo` installed in that Python (the artifact's own extras too: onnxruntime is in the base
install, torch for TorchScript, tensorrt for engines).

The model is decoupled (`model_transaction_policy { decoupled: true }`): `execute` hands each request to
the runtime's engine driver (continuous batching across requests) and returns at once; responses are sent
from the driver thread through each request's response sender. With `stream: true` every text delta is one
response; otherwise one response carries the whole completion. The last response of a request carries
TRITONSERVER_RESPONSE_COMPLETE_FINAL. A cancelled request (client gone) frees its engine slot.

Inputs (names follow Triton's vLLM/TensorRT-LLM backends, so `/v2/models/<model>/generate` works with
`{"text_input": "...", "max_tokens": 32, "stream": false}`):
  text_input        TYPE_STRING [1]   the prompt
  max_tokens        TYPE_INT32  [1]   optional (default: parameter `default_max_tokens`, else 64)
  temperature       TYPE_FP32   [1]   optional, 0 = greedy (default)
  top_p, top_k, seed, stream, stop (TYPE_STRING [-1]), sampling_parameters (JSON, vLLM backend style)
Outputs: text_output TYPE_STRING [-1], finish_reason TYPE_STRING [1] (empty until the last response),
         output_ids TYPE_INT32 [-1] (the tokens this response adds).

Parameters (config.pbtxt): artifact (directory relative to this version folder, absolute, or s3:// URI),
target, threads, default_max_tokens.
"""
from __future__ import annotations

import json
import os
import threading

import numpy as np

try:  # inside Triton's python backend
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported elsewhere (docs, tests build their own stand-in)
    pb_utils = None

DEFAULT_MAX_TOKENS = 64
SAMPLING_INPUTS = {"max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p",
                   "top_k": "top_k", "seed": "seed"}


def _parameters(model_config: dict) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in (model_config.get("parameters") or {}).items()}


def _scalar(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    value = np.asarray(tensor.as_numpy()).reshape(-1)
    if value.size == 0:
        return None
    item = value[0]
    if isinstance(item, bytes):
        return item.decode("utf-8")
    return item.item() if hasattr(item, "item") else item


def _strings(request, name: str) -> list[str]:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return []
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in np.asarray(tensor.as_numpy()).reshape(-1)]


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        from inferneo_runtime.integrations.common import LoadedModel

        self.model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(self.model_config):
            raise pb_utils.TritonModelException("this model streams: its config.pbtxt needs "
                                                "model_transaction_policy { decoupled: true }")
        params = _parameters(self.model_config)
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        artifact = params.get("artifact") or "artifact"
        if "://" not in artifact and not os.path.isabs(artifact):
            artifact = os.path.join(version_dir, artifact)
        device = "cpu"
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args.get('model_instance_device_id', 0)}"
        threads = int(params["threads"]) if params.get("threads") else None
        self.default_max_tokens = int(params.get("default_max_tokens") or DEFAULT_MAX_TOKENS)
        self.loaded = LoadedModel(artifact, target=params.get("target") or None, device=device, threads=threads)
        self.lock = threading.Lock()
        self.pending: dict[int, object] = {}  # id(ticket) -> ticket, for cancellation and finalize

    # -- requests ---------------------------------------------------------------------------------------
    def _params(self, request):
        from inferneo_runtime.sampling import SamplingParams

        values: dict = {}
        raw = _scalar(request, "sampling_parameters")
        if raw:
            given = json.loads(raw)
            for name, field in SAMPLING_INPUTS.items():
                if name in given:
                    values[field] = given[name]
            if "stop" in given:
                values["stop"] = tuple([given["stop"]] if isinstance(given["stop"], str) else given["stop"])
        for name, field in SAMPLING_INPUTS.items():
            value = _scalar(request, name)
            if value is not None:
                values[field] = value
        stop = _strings(request, "stop")
        if stop:
            values["stop"] = tuple(stop)
        values.setdefault("max_new_tokens", self.default_max_tokens)
        for field in ("max_new_tokens", "top_k", "seed"):
            if field in values:
                values[field] = int(values[field])
        for field in ("temperature", "top_p"):
            if field in values:
                values[field] = float(values[field])
        return SamplingParams(**values)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                prompt = _scalar(request, "text_input")
                if prompt is None:
                    raise ValueError("text_input is required")
                stream = bool(_scalar(request, "stream") or False)
                params = self._params(request)
                ids = self.loaded.tokenizer.encode(prompt)
                self.loaded.driver.check(ids, params)
            except Exception as e:  # noqa: BLE001 - a bad request gets its error; the others go on
                sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e))),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            self._submit(request, sender, ids, params, stream)
        return None  # decoupled: responses go through the senders

    def _submit(self, request, sender, ids, params, stream: bool) -> None:
        state = {"text": [], "ids": [], "ticket": None}

        def respond(text: str, token_ids: list[int], finish_reason: str, final: bool) -> None:
            outputs = [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
                       pb_utils.Tensor("finish_reason", np.array([finish_reason.encode("utf-8")], dtype=np.object_)),
                       pb_utils.Tensor("output_ids", np.array(token_ids, dtype=np.int32))]
            sender.send(pb_utils.InferenceResponse(output_tensors=outputs),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0)

        def sink(item) -> None:  # the driver thread
            final = isinstance(item, BaseException) or item.finish_reason is not None
            with self.lock:  # (submit holds it until the ticket is recorded)
                ticket = state["ticket"]
                if final:
                    self.pending.pop(id(ticket), None)
            try:
                if isinstance(item, BaseException):
                    from inferneo_runtime.drivers import Cancelled

                    if isinstance(item, Cancelled):
                        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    else:
                        error = pb_utils.TritonError(str(item) or type(item).__name__)
                        sender.send(pb_utils.InferenceResponse(output_tensors=[], error=error),
                                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    return
                if not final and request.is_cancelled():
                    self.loaded.driver.cancel(ticket)  # its slot is freed at the next step; Cancelled follows
                    return
                if stream:
                    if item.text or final:
                        respond(item.text, [item.token_id], item.finish_reason or "", final)
                    return
                state["text"].append(item.text)
                state["ids"].append(item.token_id)
                if final:
                    respond("".join(state["text"]), state["ids"], item.finish_reason, True)
            except Exception:  # noqa: BLE001 - e.g. the response sender is gone; never kill the driver thread
                self.loaded.driver.cancel(ticket)

        with self.lock:
            ticket = self.loaded.driver.submit(ids, params, sink)
            state["ticket"] = ticket
            self.pending[id(ticket)] = ticket

    def finalize(self) -> None:
        """Triton unloads the model: finish what is running (bounded), then close."""
        self.loaded.close(timeout=30.0)
