"""Peers for `inferneo bench --compare`: the same prompt, greedy, on the artifact's own source checkpoint.

    transformers  AutoModelForCausalLM.generate (torch, fp32)
    optimum       optimum-onnx ORTModelForCausalLM (its ONNX export, cached under $INFERNEO_CACHE_DIR/bench)
    genai         onnxruntime-genai with a model from its own builder (fp32, cpu; cached likewise)
    genai-int4    the same with the builder's int4 (MatMulNBits) model: the peer of an `onnx-int4` target

A peer that is not installed is skipped with a note. onnxruntime-genai's builder needs transformers 5: in an
environment with transformers 5 (inside the build extra's range), `pip install onnxruntime-genai` there and the
genai peer runs with this interpreter; under transformers 4 point INFERNEO_GENAI_PYTHON at another
environment's python (it needs onnxruntime-genai and, to build the model once, transformers >= 5 and torch).

Each peer is a child process like the targets, driven by the same commands and measured the same way: TTFT
is a one-token request, decode tokens/s counts the tokens after the first over the time they took, peak RSS
is the child's own. The child half of this file imports nothing from inferneo, so it runs under any interpreter.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

_MARK = "@@inferneo-bench@@"  # = inferneo_runtime.bench.RESULT_MARK (this half imports nothing from inferneo)


# -- parent side ------------------------------------------------------------------------------------------
def checkpoint_for(manifest) -> Path:
    """The HF checkpoint directory an artifact was built from, as this host has it."""
    from .gguf_source import gguf_conversion_dir
    from .source_errors import SourceError

    src = manifest.source
    if src.kind == "path":
        directory = Path(src.uri)
    elif src.kind == "gguf":  # converted once by inferneo_build.gguf_source.convert_gguf, keyed by the GGUF's sha256
        directory = gguf_conversion_dir(src.weights_sha256)
    elif src.kind == "hf":
        from huggingface_hub import snapshot_download

        directory = Path(snapshot_download(src.uri, revision=src.revision, local_files_only=True))
    else:
        raise SourceError(f"source kind {src.kind!r} has no local checkpoint; pass --checkpoint DIR")
    if not (directory / "config.json").is_file():
        raise SourceError(f"the artifact's source checkpoint is not on this host ({directory}); "
                          f"build the recipe here once or pass --checkpoint DIR")
    return directory


def _available(peer: str) -> tuple[list[str] | None, str]:
    """(interpreter command, "") when the peer can run, else (None, why not)."""
    import importlib.util

    if peer == "transformers":
        ok = importlib.util.find_spec("transformers") and importlib.util.find_spec("torch")
        return ([sys.executable], "") if ok else (None, "transformers/torch not installed")
    if peer == "optimum":
        ok = importlib.util.find_spec("optimum") and importlib.util.find_spec("optimum.onnxruntime")
        return ([sys.executable], "") if ok else (None, "optimum-onnx not installed (pip install optimum-onnx)")
    python = os.environ.get("INFERNEO_GENAI_PYTHON") or sys.executable
    try:
        ok = subprocess.run([python, "-c", "import onnxruntime_genai"], capture_output=True).returncode == 0
    except OSError:
        ok = False
    if not ok:
        return None, (f"onnxruntime-genai not importable by {python} (set INFERNEO_GENAI_PYTHON to an "
                      "environment that has it)")
    return [python], ""


def spawn_peers(names, manifest, checkpoint, prompt_ids: list[int], settings: dict, timeout: float, log) -> dict:
    """Start one child per peer (each loads, then waits for commands); a peer that cannot run gets a reason."""
    from inferneo_runtime.bench import Child

    from .source import cache_root

    try:
        ckpt = Path(checkpoint) if checkpoint else checkpoint_for(manifest)
    except Exception as e:  # every peer is skipped with the reason
        return {n: {"skipped": str(e)} for n in names}
    out: dict = {}
    for name in names:
        interpreter, why = _available(name)
        if interpreter is None:
            out[name] = {"skipped": why}
            continue
        log(f"loading peer {name}")
        job = {"peer": name, "checkpoint": str(ckpt), "prompt_ids": prompt_ids, "settings": settings,
               "cache": str(cache_root() / "bench" / f"{name}-{manifest.source.weights_sha256[:16]}")}
        out[name] = Child(name, [*interpreter, str(Path(__file__).resolve()), json.dumps(job)], timeout)
        out[name].reply = _with_checkpoint(out[name].reply, str(ckpt))
    return out


def _with_checkpoint(reply, ckpt: str):
    """The first reply (ready) also names the checkpoint the peer ran."""
    first = [True]

    def wrapped():
        r = reply()
        if first[0]:
            first[0] = False
            r = {**r, "checkpoint": ckpt}
        return r

    return wrapped


# -- child side (no inferneo imports) ---------------------------------------------------------------------
def _rss_mb():
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class _Stamps:
    """A transformers streamer that records when each new token comes out (the first put() is the prompt)."""

    def __init__(self):
        self.start, self.times, self._prompt = time.perf_counter(), [], True

    def put(self, value):
        if self._prompt:
            self._prompt = False
        else:
            self.times.append(time.perf_counter() - self.start)

    def end(self):
        pass


def _hf_generate(model, prompt_ids, n_new):
    import torch

    ids = torch.tensor([prompt_ids])
    stamps = _Stamps()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                             eos_token_id=None, pad_token_id=0, streamer=stamps)
    return stamps.times, out[0, len(prompt_ids):].tolist()


def _load_transformers(job):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(job["settings"]["threads"])
    model = AutoModelForCausalLM.from_pretrained(job["checkpoint"], dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # run every requested token, as the targets do (ignore_eos)
    return lambda ids, n: _hf_generate(model, ids, n)


def _load_optimum(job):
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM

    cache = Path(job["cache"])
    if not (cache / "model.onnx").is_file():  # export once (minutes), outside the timed load
        ORTModelForCausalLM.from_pretrained(job["checkpoint"], export=True).save_pretrained(cache)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = job["settings"]["threads"]
    t = time.perf_counter()
    model = ORTModelForCausalLM.from_pretrained(cache, session_options=opts, use_cache=True)
    job["load_s"] = time.perf_counter() - t
    model.generation_config.eos_token_id = None
    return lambda ids, n: _hf_generate(model, ids, n)


def _load_genai(job):
    import onnxruntime_genai as og

    cache = Path(job["cache"])
    if not (cache / "genai_config.json").is_file():  # build once with genai's own builder, outside the timed load
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", job["checkpoint"], "-o",
                        str(cache), "-p", job["peer"].partition("-")[2] or "fp32", "-e", "cpu", "-c", str(cache.with_name(cache.name + ".work"))],
                       check=True, capture_output=True)
    config_path = cache / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = job["settings"]["threads"]
    config_path.write_text(json.dumps(config, indent=4))
    t = time.perf_counter()
    model = og.Model(str(cache))
    job["load_s"] = time.perf_counter() - t

    def generate(prompt_ids, n_new):
        params = og.GeneratorParams(model)
        total = len(prompt_ids) + n_new
        # genai cannot ignore EOS; min_length masks it instead (tokens may then differ where EOS was the argmax)
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        generator = og.Generator(model, params)
        start, times = time.perf_counter(), []
        generator.append_tokens(prompt_ids)
        while not generator.is_done():
            generator.generate_next_token()
            times.append(time.perf_counter() - start)
        return times, [int(t) for t in generator.get_sequence(0)][len(prompt_ids):]

    return generate


class _PeerSession:
    """The child protocol of inferneo_runtime.bench.serve: ready, ttft, decode, final."""

    def __init__(self, job):
        self.settings, self.prompt_ids = job["settings"], job["prompt_ids"]
        t = time.perf_counter()
        load = {"transformers": _load_transformers, "optimum": _load_optimum, "genai": _load_genai,
                "genai-int4": _load_genai}[job["peer"]]
        self.generate = load(job)
        self.load_s = job.get("load_s", time.perf_counter() - t)
        self.tokens = None

    def _one_token(self):
        t = time.perf_counter()
        self.generate(self.prompt_ids, 1)
        return time.perf_counter() - t

    def ready(self):
        first = self._one_token()
        return {"load_s": round(self.load_s, 3), "first_token_s": round(first, 3),
                "load_plus_first_token_s": round(self.load_s + first, 3)}

    def ttft(self):
        return {"ms": self._one_token() * 1e3}

    def decode(self):
        times, self.tokens = self.generate(self.prompt_ids, self.settings["new_tokens"])
        return {"tok_s": (len(times) - 1) / (times[-1] - times[0])}

    def final(self):
        return {"peak_rss_generation_mb": _rss_mb(), "tokens": self.tokens}


def _serve(job):
    def reply(obj):
        print(_MARK + json.dumps(obj), flush=True)

    try:
        session = _PeerSession(job)
        reply(session.ready())
    except Exception as e:  # reported as this peer's row; the bench goes on
        reply({"error": f"{type(e).__name__}: {e}"})
        return
    for line in sys.stdin:
        command = line.strip()
        try:
            reply(getattr(session, command)())
        except Exception as e:
            reply({"error": f"{type(e).__name__}: {e}"})
        if command == "final":
            return


if __name__ == "__main__":
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)  # run as a script: keep this package's modules (build, source, ...) off the import path
    _serve(json.loads(sys.argv[1]))
