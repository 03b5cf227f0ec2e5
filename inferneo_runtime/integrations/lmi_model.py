"""DJL Serving / SageMaker LMI python handler over an Inferneo artifact (`inferneo deploy lmi`).

`inferneo deploy lmi ARTIFACT OUT` writes OUT/serving.properties (engine=Python, option.entryPoint=model.py,
option.model_id=<the artifact's S3 version prefix>), this file as OUT/model.py and a requirements.txt.
An LMI container loads it with `djl_python` on the path and calls `handle(inputs)` per request batch.

Requests use LMI's (and TGI's) schema: {"inputs": "prompt", "parameters": {"max_new_tokens": 32,
"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 1, "stop": ["\\n"], "do_sample": false}}; answers
{"generated_text": "...", "details": {"finish_reason": ..., "generated_tokens": n}}. With
`option.enable_streaming=true` (and "stream": true in a request) tokens stream as JSON lines.

The artifact: `option.model_id` (an s3:// URI is fetched once into Inferneo's verified cache; a directory
that LMI already downloaded is used as is), else the model directory. `option.inferneo_target` picks the
target, `option.inferneo_device` cpu or cuda[:N], `option.inferneo_threads` the intra-op threads.
"""
from __future__ import annotations

import json
import threading

try:  # inside DJL Serving's python engine
    from djl_python import Input, Output
except ImportError:  # imported elsewhere (tests build their own stand-in)
    Input = Output = None

_lock = threading.Lock()
_model = None

PARAMETER_NAMES = {"max_new_tokens": int, "temperature": float, "top_p": float, "top_k": int, "seed": int,
                   "repetition_penalty": float, "min_new_tokens": int}


def _artifact(properties: dict) -> str:
    for key in ("model_id", "model_dir"):
        value = properties.get(key)
        if value:
            return str(value)
    raise ValueError("serving.properties needs option.model_id (the artifact's S3 prefix or directory)")


def _load(properties: dict):
    global _model
    with _lock:
        if _model is None:
            from inferneo_runtime.integrations.common import LoadedModel

            threads = properties.get("inferneo_threads")
            _model = LoadedModel(_artifact(properties), target=properties.get("inferneo_target") or None,
                                 device=properties.get("inferneo_device") or "cpu",
                                 threads=int(threads) if threads else None)
    return _model


def sampling_params(parameters: dict):
    from inferneo_runtime.sampling import SamplingParams

    values = {name: kind(parameters[name]) for name, kind in PARAMETER_NAMES.items()
              if parameters.get(name) is not None}
    if parameters.get("do_sample") is False:
        values["temperature"] = 0.0
    elif parameters.get("do_sample") and "temperature" not in values:
        values["temperature"] = 1.0  # LMI's (and TGI's) default temperature when sampling; ours is 0 (greedy)
    stop = parameters.get("stop")
    if stop:
        values["stop"] = tuple([stop] if isinstance(stop, str) else stop)
    return SamplingParams(**values)


def _generate(model, prompt: str, parameters: dict) -> dict:
    """One prompt through the engine driver (batched with the other requests in flight)."""
    ids = model.tokenizer.encode(prompt)
    params = sampling_params(parameters)
    model.driver.check(ids, params)
    done = threading.Event()
    out = {"text": [], "ids": [], "finish_reason": None, "error": None}

    def sink(item) -> None:
        if isinstance(item, BaseException):
            out["error"] = item
            done.set()
            return
        out["text"].append(item.text)
        out["ids"].append(item.token_id)
        if item.finish_reason is not None:
            out["finish_reason"] = item.finish_reason
            done.set()

    model.driver.submit(ids, params, sink)
    done.wait()
    if out["error"] is not None:
        raise out["error"]
    return {"generated_text": "".join(out["text"]),
            "details": {"finish_reason": out["finish_reason"], "generated_tokens": len(out["ids"]),
                        "prompt_tokens": len(ids)}}


def _stream(model, prompt: str, parameters: dict):
    """JSON lines, one per text delta: {"token": {"id", "text"}, "generated_text": null|full text}."""
    import queue

    ids = model.tokenizer.encode(prompt)
    params = sampling_params(parameters)
    model.driver.check(ids, params)
    events: queue.Queue = queue.Queue()
    model.driver.submit(ids, params, events.put)
    text = []
    while True:
        item = events.get()
        if isinstance(item, BaseException):
            yield json.dumps({"error": str(item)}) + "\n"
            return
        text.append(item.text)
        final = item.finish_reason is not None
        yield json.dumps({"token": {"id": item.token_id, "text": item.text},
                          "generated_text": "".join(text) if final else None,
                          "details": {"finish_reason": item.finish_reason} if final else None}) + "\n"
        if final:
            return


def handle(inputs):
    """DJL's entry point: a batch of requests in, one Output (a batch of answers) out."""
    model = _load(inputs.get_properties())
    if inputs.is_empty():  # DJL's load-time call: the model is loaded (and warmed up) above
        return None
    batch = inputs.get_batches() if hasattr(inputs, "get_batches") else [inputs]
    outputs = Output()
    results: list = [None] * len(batch)

    def run(i: int, item) -> None:
        try:
            data = item.get_as_json()
            prompt = data["inputs"]
            parameters = data.get("parameters") or {}
            if data.get("stream") or parameters.get("stream"):
                results[i] = ("stream", _stream(model, prompt, parameters))
            else:
                results[i] = ("json", _generate(model, prompt, parameters))
        except Exception as e:  # noqa: BLE001 - one bad request does not fail its batch
            results[i] = ("error", str(e) or type(e).__name__)

    threads = [threading.Thread(target=run, args=(i, item)) for i, item in enumerate(batch)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (kind, value) in enumerate(results):
        if kind == "stream":
            outputs.add_stream_content(value, output_formatter=None)
        elif kind == "json":
            outputs.add_as_json(value, batch_index=i)
        else:
            outputs.add_as_json({"error": value}, batch_index=i)
            if len(batch) == 1:
                outputs.set_code(400)
    return outputs
