"""`inferneo bench`: how fast each target of an artifact runs on this machine, and against what limit.

For every target: load time, time to first token (TTFT), decode tokens/s (median of several greedy runs,
with min and max), the cost of one decode step at short and long positions, aggregate tokens/s with
several concurrent requests through the batching Engine, and peak RSS. Next to them: this machine's
memory read bandwidth, measured here, and the decode roofline it implies (every weight but the embedding
table is streamed once per token). With `compare`, peers (`inferneo_build.bench_peers`) run the same
prompt on the same checkpoint in the same run, and the report gives ratios. With `device="cuda"` the targets
run on the GPU (the torch targets; an onnx target is reported as failing to load, with the reason) against the
device's bandwidth (`read_gb_s` is then a device copy's read + write rate), with their peak device memory; peers
are skipped there.

Every target and peer is a child process of its own, so peak RSS is its own and an ONNX child can show
that it never imported torch. Children load one after another, then answer commands over stdin: the parent
interleaves their timed runs round by round, in an order that flips every round, so a busy moment on a shared
machine hits every contender alike instead of whichever happened to run then.
"""
from __future__ import annotations

import json
import os
import platform
import queue
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .backends.base import is_mixed_graph, physical_cores
from .errors import InferneoError
from .manifest import read_manifest

# SmolLM2's chat template turns this into 41 tokens; other tokenizers give other lengths (reported).
PROMPT = [{"role": "user", "content": "Explain in a few sentences why the sky is blue."}]
NEW_TOKENS = 128
CONCURRENCY = (1, 4, 8)
PEERS = ("transformers", "optimum", "genai", "genai-int4")  # run by inferneo_build.bench_peers
QUANTIZED_PEERS = ("genai-int4",)  # no float32 roofline applies to them
LONG_ROUNDS, LONG_STEPS = 6, 4  # decode-step timing: rounds over the positions, steps per position per round
SESSION_SOURCES = {"cache": "mapped this host's packed copy (written by an earlier load)",
                   "created": "loaded from the artifact and wrote this host's packed copy (later loads map it)",
                   "artifact": "loaded from the artifact (host copy off, the default, or unwritable)"}
RESULT_MARK = "@@inferneo-bench@@"  # a child's reply is the one stdout line starting with this


class BenchError(InferneoError):
    """A bench argument names something that does not exist (target, peer)."""

    exit_code = 2


@dataclass(frozen=True)
class BenchSettings:
    runs: int = 5  # timed runs per measurement (after one cold run)
    new_tokens: int = NEW_TOKENS
    threads: Optional[int] = None  # intra-op threads; default: physical cores
    concurrency: tuple[int, ...] = CONCURRENCY
    timeout_s: float = 900.0  # for any one child reply (a peer's first load may export or build a model)
    device: str = "cpu"  # cpu or cuda[:N]: where the targets run (peers run on the CPU only)


# -- statistics ------------------------------------------------------------------------------------------
def spread(values: list[float], digits: int = 2) -> dict:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "n": len(values)}


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


# -- memory bandwidth --------------------------------------------------------------------------------------
def measure_bandwidth(threads: Optional[int] = None, mib: int = 512, repeats: int = 7) -> dict:
    """Read bandwidth of main memory: `threads` threads each reduce their share of a buffer far larger than
    any cache (numpy reductions release the GIL). Best of `repeats`, so a busy moment does not count."""
    threads = threads or physical_cores()
    buf = np.ones(mib * 2 ** 20 // 4, dtype=np.float32)  # written once, so every page is real memory
    parts = np.array_split(buf, threads)
    best: dict[str, float] = {}
    for name, kernel in (("max", np.max), ("dot", lambda a: np.dot(a, a))):
        for _ in range(repeats):
            workers = [threading.Thread(target=kernel, args=(p,)) for p in parts]
            t = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            best[name] = max(best.get(name, 0.0), buf.nbytes / (time.perf_counter() - t) / 1e9)
    return {"read_gb_s": round(max(best.values()), 1), "threads": threads, "buffer_mib": mib,
            "kernels_gb_s": {k: round(v, 1) for k, v in best.items()}}


def measure_device_bandwidth(device: str) -> dict:
    """Bytes per second a CUDA device moves: a 1 GiB device-to-device copy (read + write), best of 10."""
    import torch

    n = 2 ** 30
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = 0.0
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        best = max(best, 2 * n / (start.elapsed_time(end) / 1e3) / 1e9)
    del src, dst
    return {"read_gb_s": round(best, 1), "method": "1 GiB device-to-device copy (read + write), best of 10",
            "device": torch.cuda.get_device_name(device)}


def require_decoder(manifest) -> None:
    """A BenchError (exit 2) for an artifact the bench cannot measure: it times text generation, and an encoder
    artifact (feature-extraction, text-classification) generates none."""
    if manifest.task != "text-generation":
        raise BenchError(f"artifact {manifest.name!r} is a {manifest.task} model: `inferneo bench` measures text "
                         "generation (decode tokens/s, TTFT), which an encoder does not do")


def check_device(device: str) -> None:
    """A bench `device` this host can run, or a BenchError naming it (before any child starts): the torch
    backends' own device check (a host without torch gets the missing extra named)."""
    if device == "cpu":
        return
    from .backends.torchscript import _torch_device

    try:
        _torch_device(device)
    except InferneoError as e:
        raise BenchError(f"--device: {e}") from None


# -- a child: one target, driven over stdin ----------------------------------------------------------------
# `structured` row: a small nested schema, bounded so any model (random weights too) completes it
BENCH_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "size", "tags", "meta"],
                "properties": {"name": {"type": "string", "maxLength": 16},
                               "size": {"type": "integer", "minimum": 0, "maximum": 9999},
                               "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]},
                                        "maxItems": 4},
                               "meta": {"type": "object", "additionalProperties": False, "required": ["ok"],
                                        "properties": {"ok": {"type": "boolean"}}}}}


class TargetSession:
    """One artifact target in this process: `ready()` after load, then `ttft`, `decode`, `extras`, `final`."""

    def __init__(self, job: dict):
        from . import load
        from .generation import Engine
        from .sampling import SamplingParams

        self._engine, self._params = Engine, SamplingParams
        self.settings, self.prompt_ids, self.target = job["settings"], job["prompt_ids"], job["target"]
        t1 = time.perf_counter()
        self.device = self.settings.get("device", "cpu")
        self.model = load(job["artifact"], target=self.target, threads=self.settings["threads"], verify=False,
                          device=self.device)
        self.t_load = time.perf_counter() - t1
        self.backend = self.model.backend
        self.reference: Optional[list[int]] = None
        self.runs_agree = True
        self.rss_generation: Optional[float] = None

    def generate(self, prompts: list[list[int]], n_new: int) -> tuple[float, list[list[float]], list[list[int]]]:
        """Run prompts through one Engine; per request, the time (from start) each token came out."""
        engine = self._engine(self.backend, self.model.eos_ids)
        params = self._params(max_new_tokens=n_new, ignore_eos=True)
        requests = [engine.add(p, params) for p in prompts]
        stamps: list[list[float]] = [[] for _ in prompts]
        start = time.perf_counter()
        while engine.has_work:
            events = engine.step()
            now = time.perf_counter() - start
            for e in events:
                stamps[e.request_id - requests[0].id].append(now)
        return time.perf_counter() - start, stamps, [r.out.token_ids for r in requests]

    # TTFT is a one-token request: prompt in, first token out (when more tokens are wanted, the Engine's
    # first step also runs the first decode step). The first request after load is the cold one.
    def ready(self) -> dict:
        first = self.generate([self.prompt_ids], 1)[0]
        out = {"load_s": round(self.t_load, 3), "first_token_s": round(first, 3),
               "load_plus_first_token_s": round(self.t_load + first, 3)}
        if self.backend.session_source:  # onnx: was the host's packed copy used or written?
            out["session_source"] = self.backend.session_source
        return out

    def verify(self) -> dict:
        """What load(verify=True), the default, adds: the sha256 of every file the target uses."""
        from .artifact import verify_artifact

        t = time.perf_counter()
        verify_artifact(self.model.root, self.model.manifest, [self.target])
        return {"verify_s": round(time.perf_counter() - t, 3)}

    def ttft(self) -> dict:
        return {"ms": self.generate([self.prompt_ids], 1)[0] * 1e3}

    def decode(self) -> dict:
        _, stamps, tokens = self.generate([self.prompt_ids], self.settings["new_tokens"])
        s = stamps[0]
        after_first = sum(1 for x in s if x > s[0])  # tokens that came out after the first step
        if self.reference is None:
            self.reference = tokens[0]
        self.runs_agree &= tokens[0] == self.reference
        return {"tok_s": after_first / (s[-1] - s[0])}

    def extras(self) -> dict:
        self.rss_generation = peak_rss_mb()  # everything so far was plain generation
        out = {"long": long_positions(self.backend), "concurrency": []}
        shapes = self.backend.target.shapes
        max_batch = shapes.max_batch if shapes else 1
        for n in self.settings["concurrency"]:
            if n > max_batch:
                out["concurrency"].append({"requests": n, "skipped": f"artifact max_batch is {max_batch}"})
                continue
            wall, stamps, _ = self.generate([self.prompt_ids] * n, self.settings["new_tokens"])
            produced = sum(len(s) for s in stamps)
            out["concurrency"].append({"requests": n, "tok_s": round(produced / wall, 1), "wall_s": round(wall, 2)})
        out["structured"] = self.structured()
        return out

    def structured(self) -> dict:
        """Structured outputs' cost: one JSON-schema-constrained request's tok/s, and the grammar mask's time per
        token (compute the mask, apply it to a logits row, advance), replayed over the same tokens."""
        import numpy as np

        try:
            from .structured import make_constraint, sequence_constraint

            constraint = make_constraint(guided_json=BENCH_SCHEMA)
        except Exception as e:  # llguidance not installed (the `structured` extra)
            return {"skipped": str(e)}
        tok = self.model.tokenizer
        engine = self._engine(self.backend, self.model.eos_ids, tokenizer=tok)
        req = engine.add(self.prompt_ids, self._params(max_new_tokens=self.settings["new_tokens"], ignore_eos=True,
                                                       constraint=constraint))
        start = time.perf_counter()
        while engine.has_work:
            engine.step()
        wall = time.perf_counter() - start
        tokens = req.out.token_ids
        seq, row = sequence_constraint(constraint, tok, self.model.eos_ids), np.zeros(tok.vocab_size, np.float32)
        start = time.perf_counter()
        for t in tokens:
            row[~seq.allowed(row.size)] = -np.inf
            seq.advance(t)
        mask_s = (time.perf_counter() - start) / max(len(tokens), 1)
        return {"tokens": len(tokens), "tok_s": round(len(tokens) / wall, 1), "mask_us_per_token": round(mask_s * 1e6, 1)}

    def final(self) -> dict:
        out = {"peak_rss_generation_mb": self.rss_generation or peak_rss_mb(), "peak_rss_mb": peak_rss_mb(),
               "torch_imported": "torch" in sys.modules, "tokens": self.reference, "runs_agree": self.runs_agree}
        if self.device != "cpu":
            import torch

            out["peak_device_memory_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2 ** 20, 1)
        self.model.close()
        return out


def long_positions(backend) -> list[dict]:
    """Median time of one decode step with P tokens cached, for P from short to the artifact's maximum.

    Positions are visited in interleaved rounds, so drift in machine load does not bias the long/short
    ratio. The cache is filled with real (non-zero-page) memory; its values do not change the work done."""
    shapes = backend.target.shapes
    max_seq = shapes.max_sequence if shapes else backend.dims.max_positions
    positions = sorted({min(64, max_seq // 4), max_seq // 2, max_seq - LONG_STEPS})
    cache = backend.allocate_cache(1, max_seq)
    cache.data[...] = 0.01
    times: dict[int, list[float]] = {p: [] for p in positions}
    for r in range(LONG_ROUNDS + 1):
        for p in positions:
            for k in range(LONG_STEPS):
                t = time.perf_counter()
                backend.forward(cache, 0, np.array([[100 + k]], dtype=np.int64), np.array([p + k], dtype=np.int64))
                if r:  # round 0 warms up
                    times[p].append(time.perf_counter() - t)
    out = []
    for p in positions:
        step = statistics.median(times[p]) * 1e3
        out.append({"position": p, "step_ms": round(step, 2), "tok_s": round(1e3 / step, 1)})
    return out


def serve(make_session: Callable[[], object]) -> None:
    """A child's main loop: build the session, reply `ready`, then one reply per command line on stdin."""
    def reply(obj):
        print(RESULT_MARK + json.dumps(obj), flush=True)

    try:
        session = make_session()
        reply(session.ready())
    except Exception as e:  # reported in the table; the other contenders still run
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


# -- the parent ------------------------------------------------------------------------------------------
class Child:
    """A bench child process and its replies (read on a thread, so a stuck child times out)."""

    def __init__(self, name: str, argv: list[str], timeout: float, env: Optional[dict] = None):
        self.name, self.timeout, self.error = name, timeout, None
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                      text=True, bufsize=1, env=env)
        self._replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            if line.startswith(RESULT_MARK):
                self._replies.put(json.loads(line[len(RESULT_MARK):]))
        self._replies.put(None)  # the child exited

    def reply(self) -> dict:
        if self.error:
            return {"error": self.error}
        try:
            r = self._replies.get(timeout=self.timeout)
        except queue.Empty:
            r = {"error": f"no reply within {self.timeout:.0f}s"}
        if r is None:
            self._stderr.seek(0)
            tail = " | ".join(self._stderr.read().strip().splitlines()[-3:])
            r = {"error": f"exited with code {self._proc.wait()}: {tail}"}
        if "error" in r:
            self.error = r["error"]
            self.close()
        return r

    def ask(self, command: str) -> dict:
        if self.error:
            return {"error": self.error}
        try:
            self._proc.stdin.write(command + "\n")
            self._proc.stdin.flush()
        except OSError:
            pass  # the reader reports the exit
        return self.reply()

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
        if not self._stderr.closed:
            self._stderr.close()


def _target_streamed_bytes(manifest, name: str) -> int:
    """Bytes a decode step of target `name` reads: its files less the embedding table where only its rows are
    read (float32 in every ONNX target, the compute dtype in a reduced TorchScript one). A tied model's table is
    also its output head, read whole every step: float32 ONNX and the torch targets store it once and read it
    both ways; reduced ONNX targets quantize a head of their own. Quantized targets stream fewer bytes per
    token, so each is measured against its own roofline. A mixture of experts' token reads only the experts it is
    routed to (batch 1)."""
    t = manifest.targets[name]
    element = 2 if t.dtype in ("float16", "bfloat16") else 4
    dims = manifest.model
    weights = sum(f.size for f in t.files if not is_mixed_graph(f.path))  # a graph beside the weights
    head_is_table = dims.tied_embeddings and not (t.format == "onnx" and t.precision is not None)
    unread = 0 if head_is_table else dims.vocab * dims.hidden * element
    if dims.expert_parameters:  # one token reads experts_per_token of each sparse layer's experts
        per_parameter = float(t.toolchain.get("expert_bytes_per_parameter", element))  # quantized: their bits
        unread += int(dims.expert_parameters * per_parameter * (dims.experts - dims.experts_per_token) / dims.experts)
    return max(0, weights - unread)


def _roofline_for(group: str, name: str, manifest, read_gb_s: Optional[float],
                  float32_roofline: Optional[float]) -> Optional[float]:
    """The decode roofline a contender is judged by: a reduced-precision target's from its own bytes; float32
    targets and peers stream the float32 model's; a quantized peer's bytes are not known here, so none."""
    if group == "peers":
        return None if name in QUANTIZED_PEERS else float32_roofline
    own = _target_streamed_bytes(manifest, name) if manifest.targets[name].precision is not None else 0
    if read_gb_s and own:  # with or without a float32 target beside it
        return round(read_gb_s * 1e9 / own, 1)
    return float32_roofline


def _streamed_bytes(manifest) -> int:
    """Bytes a decode step of the float32 model reads: those of the smallest float32 target, whose files hold
    every weight once plus the embedding table."""
    sizes = [_target_streamed_bytes(manifest, name) for name, t in manifest.targets.items()
             if t.status == "valid" and t.dtype == "float32" and t.files]
    return min(sizes, default=0)


def run_bench(artifact: Path, targets: Optional[list[str]] = None, compare: tuple[str, ...] = (),
              checkpoint: Optional[Path] = None, settings: BenchSettings = BenchSettings(),
              log: Callable[[str], None] = lambda _: None, spawn_peers: Optional[Callable] = None) -> dict:
    """Every valid target (or `targets`) of `artifact`, each in its own process, and the peers named in `compare`
    beside them. `spawn_peers` starts the peers: the builder's `inferneo_build.bench_peers.spawn_peers`, given by
    the caller (the runtime does not import the builder); without it each peer is reported skipped."""
    from .tokenizer import Tokenizer

    artifact = Path(artifact).resolve()
    manifest = read_manifest(artifact)
    require_decoder(manifest)
    names = list(dict.fromkeys(targets or manifest.valid_targets()))  # a name given twice is measured once
    compare = tuple(dict.fromkeys(compare))
    if not names:
        raise BenchError(f"artifact {manifest.name!r} has no valid target to bench"
                         + (f" (targets: {', '.join(f'{n} {t.status}' for n, t in manifest.targets.items())})"
                            if manifest.targets else ""))
    unknown = [n for n in names if n not in manifest.targets]
    if unknown:
        raise BenchError(f"artifact {manifest.name!r} has no target {', '.join(unknown)}; it has: "
                         f"{', '.join(manifest.targets)}")
    bad = [p for p in compare if p not in PEERS]
    if bad:
        raise BenchError(f"unknown peer {', '.join(bad)}; known: {', '.join(PEERS)}")
    check_device(settings.device)
    tokenizer = Tokenizer(artifact, listed=manifest.listed_root_files())
    prompt_ids = tokenizer.encode_chat(PROMPT) if tokenizer.chat_template else tokenizer.encode(PROMPT[0]["content"])
    threads = settings.threads or physical_cores()
    bounds = [t.shapes.max_sequence for t in manifest.targets.values() if t.shapes]
    max_sequence = min(bounds) if bounds else manifest.model.max_positions
    new_tokens = min(settings.new_tokens, max_sequence - len(prompt_ids))  # small artifacts get fewer
    if new_tokens < 2:
        raise BenchError(f"the bench prompt ({len(prompt_ids)} tokens) leaves no room in max_sequence {max_sequence}")
    child_settings = {**asdict(settings), "threads": threads, "new_tokens": new_tokens}

    def bandwidth() -> dict:
        c = Child("bandwidth", [sys.executable, "-m", __name__, "bandwidth", str(threads), settings.device],
                  settings.timeout_s)
        r = c.reply()
        c.close()
        return r

    log(f"measuring memory bandwidth ({settings.device if settings.device != 'cpu' else f'{threads} threads'})")
    bw_before = bandwidth()
    report = {
        "artifact": str(artifact), "model": manifest.name,
        "machine": {"cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "physical_cores": physical_cores(),
                    "threads": threads, "python": platform.python_version(), "device": settings.device},
        "prompt_tokens": len(prompt_ids), "new_tokens": new_tokens, "runs": settings.runs,
        "targets": {}, "peers": {}, "ratios": {},
    }

    # load every contender, one at a time (load times are not contended by each other)
    children: dict[tuple[str, str], Child] = {}
    results: dict[tuple[str, str], dict] = {}
    for name in names:
        entry = manifest.targets[name]
        if entry.status != "valid":
            results[("targets", name)] = {"format": entry.format, "skipped": f"target is {entry.status}"}
            continue
        log(f"loading target {name}")
        job = {"artifact": str(artifact), "target": name, "prompt_ids": prompt_ids, "settings": child_settings}
        t = time.perf_counter()
        child = Child(name, [sys.executable, "-m", __name__, "target", json.dumps(job)], settings.timeout_s)
        ready = child.reply()
        # a fresh process's wait for its first token: interpreter start, imports, load, first token
        ready.setdefault("process_to_first_token_s", round(time.perf_counter() - t, 3))
        results[("targets", name)] = {"format": entry.format, **ready, **child.ask("verify")}
        children[("targets", name)] = child
    if compare and settings.device != "cpu":
        for p in compare:  # the device check (inferneo_build.gpu_check) runs transformers beside them on a GPU
            results[("peers", p)] = {"skipped": f"peers run on the cpu, the targets on {settings.device}"}
    elif compare and spawn_peers is None:
        for p in compare:
            results[("peers", p)] = {"skipped": "peers need inferneo[build] (inferneo_build.bench_peers)"}
    elif compare:
        for p, spawn in spawn_peers(compare, manifest, checkpoint, prompt_ids, child_settings,
                                    settings.timeout_s, log).items():
            if isinstance(spawn, Child):
                results[("peers", p)] = spawn.reply()
                children[("peers", p)] = spawn
            else:
                results[("peers", p)] = spawn
    live = {k: c for k, c in children.items() if "error" not in results[k]}

    # timed runs, interleaved: every contender's run r happens in the same stretch of time, after one untimed
    # decode each (the first after load pays for cold caches). The order flips every round, so going first or
    # last (on a host whose speed drifts as it stays busy) is no one's advantage.
    samples: dict[tuple[str, str], dict[str, list[float]]] = {k: {"ttft": [], "decode": []} for k in live}
    log("warm-up decode")
    for c in live.values():
        c.ask("decode")
    for r in range(settings.runs):
        order = list(live.items()) if r % 2 == 0 else list(reversed(live.items()))
        log(f"round {r + 1}/{settings.runs}: {', '.join(name for (_, name), _ in order)}")
        for command, field, key in (("ttft", "ms", "ttft"), ("decode", "tok_s", "decode")):
            for k, c in order:
                reply = c.ask(command)
                if field in reply:
                    samples[k][key].append(reply[field])
    for k, c in children.items():
        res = results[k]
        if k in live and samples[k]["decode"]:
            res["ttft_ms"] = spread(samples[k]["ttft"], 1)
            res["decode_tok_s"] = spread(samples[k]["decode"], 1)
        if k[0] == "targets" and k in live:
            log(f"long positions and concurrency: {k[1]}")
            res.update(c.ask("extras"))
        res.update(c.ask("final"))
        c.close()

    bw_after = bandwidth()
    bw = max((b for b in (bw_before, bw_after) if "read_gb_s" in b), key=lambda b: b["read_gb_s"], default=bw_before)
    streamed = _streamed_bytes(manifest)
    report["machine"]["bandwidth"] = {**bw, "runs_gb_s": [b.get("read_gb_s") for b in (bw_before, bw_after)]}
    report["weights_streamed_mb"] = round(streamed / 1e6, 1)
    report["weights_streamed_bytes"] = streamed
    report["roofline_tok_s"] = round(bw["read_gb_s"] * 1e9 / streamed, 1) if streamed and "read_gb_s" in bw else None
    for (group, name), res in results.items():
        roofline = _roofline_for(group, name, manifest, bw.get("read_gb_s"), report["roofline_tok_s"])
        if group == "targets" and roofline != report["roofline_tok_s"]:
            res["roofline_tok_s"] = roofline
        if roofline and "decode_tok_s" in res:
            res["roofline_fraction"] = round(res["decode_tok_s"]["median"] / roofline, 3)
        report[group][name] = res
    report["ratios"] = _ratios(report)
    return report


def _ratios(report: dict) -> dict:
    """target / peer for decode tokens/s and peer / target for TTFT (both: higher is better for the target)."""
    out: dict = {}
    for name, t in report["targets"].items():
        if "decode_tok_s" not in t:
            continue
        row = {}
        for peer, p in report["peers"].items():
            if "decode_tok_s" in p:
                row[peer] = {"decode": round(t["decode_tok_s"]["median"] / p["decode_tok_s"]["median"], 2),
                             "ttft": round(p["ttft_ms"]["median"] / t["ttft_ms"]["median"], 2),
                             "same_tokens": p.get("tokens") == t.get("tokens")}
        if row:
            out[name] = row
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# -- child entry points ------------------------------------------------------------------------------------
def _child(argv: list[str]) -> None:
    if argv[0] == "bandwidth":
        device = argv[2] if len(argv) > 2 else "cpu"
        got = measure_bandwidth(int(argv[1])) if device == "cpu" else measure_device_bandwidth(device)
        print(RESULT_MARK + json.dumps(got), flush=True)
    elif argv[0] == "target":
        job = json.loads(argv[1])
        serve(lambda: TargetSession(job))
    else:
        raise SystemExit(f"unknown bench child command {argv[0]!r}")


if __name__ == "__main__":
    _child(sys.argv[1:])
