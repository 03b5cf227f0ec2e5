"""`inferneo bench --workloads`: what speculation, prefix caching and chunked prefill buy, on one target.

Each workload runs the same requests with the feature off and on, alternating round by round (so a busy
moment on a shared machine hits both alike), and reports medians and their ratio:
- copy: a copy-heavy task (edit a given passage of code): single-stream tokens/s, plain vs n-gram speculation,
  and whether their greedy tokens are identical;
- chat: free chat, the same comparison (speculation must back off when its drafts are rejected);
- chat_draft: free chat, plain vs speculation drafted by a smaller model: `draft`, else the artifact's int4 (or
  int8) target when the measured one is fp32 (skipped when there is none);
- prefix: time to first token of a question after a shared ~1,000-token system prompt, uncached vs cached;
- interleave: inter-token latency (p50, p99) of running streams alone, while a ~2,000-token prompt arrives
  prefilled whole, and while it arrives in chunks of `prefill_chunk` tokens; where the target runs a chunk in
  the decode step's forward (onnx's mixed-step graph), also with each chunk as a forward of its own.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .generation import Engine
from .model_sources.artifact import precision_of
from .prefix_cache import PrefixCache
from .sampling import SamplingParams
from .speculative import SpeculationStats, SpeculativeConfig

CODE = '''def load_users(path):
    users = []
    with open(path) as f:
        for line in f:
            name, email, age = line.strip().split(",")
            users.append({"name": name, "email": email, "age": int(age)})
    return users


def adults(users):
    return [u for u in users if u["age"] >= 18]
'''
COPY = [{"role": "user", "content": "Rewrite this Python code exactly, but rename the function load_users to "
                                    "read_users. Output only the code.\n\n" + CODE}]
CHAT = [{"role": "user", "content": "Explain in a few sentences why the sky is blue."}]
SYSTEM_LINE = ("You are a careful assistant for a hardware store. Answer questions about tools, paint, garden "
               "supplies and opening hours politely and briefly, and never invent prices. ")


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _tokens_per_s(model, ids: list[int], n_new: int, spec) -> tuple[float, float, list[int], SpeculationStats]:
    """Greedy single-stream tokens/s (prefill included), the same after the first step (decode only: all that
    speculation changes), the tokens, and the drafting counts (spec None: plain)."""
    stats = SpeculationStats()
    engine = Engine(model.backend, model.eos_ids, model.tokenizer, speculative=spec, spec_stats=stats,
                    draft_backend=model.draft_backend)
    t0 = time.perf_counter()
    request = engine.add(ids, SamplingParams(max_new_tokens=n_new))
    first = len(engine.step())  # the prefill and the first decode step
    t1 = time.perf_counter()
    while engine.has_work:
        engine.step()
    end, tokens = time.perf_counter(), request.out.token_ids
    decode = (len(tokens) - first) / (end - t1) if len(tokens) > first else 0.0  # (done in one step: none to time)
    return len(tokens) / (end - t0), decode, tokens, stats


def speculation(model, messages, n_new: int, runs: int, spec: SpeculativeConfig, limit: int) -> dict:
    n_new = min(n_new, limit // 2)
    ids = model.tokenizer.encode_chat(messages)[-(limit - n_new):]  # (cut from the left for a small artifact)
    _tokens_per_s(model, ids, n_new, None)  # warm-up
    _tokens_per_s(model, ids, n_new, spec)  # and a draft model's loading, outside the timed runs
    plain, fast, plain_decode, fast_decode, same, drafted, accepted = [], [], [], [], True, 0, 0
    for _ in range(runs):
        tps, decode, base_tokens, _ = _tokens_per_s(model, ids, n_new, None)
        plain.append(tps)
        plain_decode.append(decode)
        tps, decode, tokens, stats = _tokens_per_s(model, ids, n_new, spec)
        fast.append(tps)
        fast_decode.append(decode)
        same &= tokens == base_tokens
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    return {"prompt_tokens": len(ids), "new_tokens": len(base_tokens), "plain_tok_s": round(_median(plain), 1),
            "speculative_tok_s": round(_median(fast), 1), "ratio": round(_median(fast) / _median(plain), 2),
            "plain_decode_tok_s": round(_median(plain_decode), 1),
            "speculative_decode_tok_s": round(_median(fast_decode), 1),
            "decode_ratio": round(_median(fast_decode) / _median(plain_decode), 2) if _median(plain_decode) else None,
            "identical_tokens": same, "acceptance_rate": round(accepted / drafted, 3) if drafted else 0.0}


def draft_target(manifest, target: str) -> Optional[str]:
    """A smaller target of the same artifact to draft for an fp32 `target`: int4 first, then int8 (onnx first)."""
    if precision_of(manifest.targets[target]) != "fp32":
        return None
    valid = manifest.valid_targets()
    for precision in ("int4", "int8"):
        found = [n for n in valid if precision_of(manifest.targets[n]) == precision]
        if found:
            return min(found, key=lambda n: manifest.targets[n].format != "onnx")
    return None


def drafted_chat(model, n_new: int, runs: int, spec: SpeculativeConfig, limit: int, draft: Optional[str]) -> dict:
    """Free chat, plain vs drafted by the smaller model `draft` (None: skipped)."""
    if draft is None:
        return {"skipped": f"no int4 or int8 target to draft for {model.target!r} (--speculative-model names one)"}
    spec = replace(spec, method="draft", draft=draft)
    return {"draft": draft, **speculation(model, CHAT, n_new, runs, spec, limit)}


def _ttft(model, ids, prefix_cache) -> float:
    engine = Engine(model.backend, model.eos_ids, model.tokenizer, prefix_cache=prefix_cache)
    req = engine.add(ids, SamplingParams(max_new_tokens=1))
    t0 = time.perf_counter()
    while not req.out.token_ids:
        engine.step()
    return time.perf_counter() - t0


def prefix(model, prefix_tokens: int, runs: int) -> dict:
    tok = model.tokenizer
    line = tok.encode(SYSTEM_LINE, add_special_tokens=False)
    system = (line * (prefix_tokens // len(line) + 1))[:prefix_tokens]
    questions = [tok.encode(f" Question {i}: when do you open on Sunday?", add_special_tokens=False)
                 for i in range(runs + 1)]
    cache = PrefixCache(max_bytes=1 << 30)
    _ttft(model, system + questions[0], cache)  # warms the backend and stores the shared prefix
    uncached, cached = [], []
    for q in questions[1:]:
        uncached.append(_ttft(model, system + q, None))
        cached.append(_ttft(model, system + q, cache))
    return {"prefix_tokens": prefix_tokens, "uncached_ttft_ms": round(1e3 * _median(uncached), 1),
            "cached_ttft_ms": round(1e3 * _median(cached), 1), "ratio": round(_median(cached) / _median(uncached), 3)}


def _intervals(model, streams: list[list[int]], long_ids: Optional[list[int]], chunk: Optional[int],
               steps: int, mixed: bool = True) -> tuple[list[float], Optional[float]]:
    """Seconds between consecutive tokens of the running streams while `long_ids` (if any) arrives, and the
    long prompt's own time to first token (the streams keep running until it has it). `mixed=False`: each
    chunk runs as its own forward even where the backend can run it in the decode step's."""
    engine = Engine(model.backend, model.eos_ids, model.tokenizer, prefill_chunk=chunk, mixed_steps=mixed)
    chunks = -(-len(long_ids) // chunk) if long_ids is not None and chunk else 0
    # the streams run until the long prompt is in (on a small artifact they may end first)
    new_tokens = min(2 * steps + 4 + chunks, engine.max_sequence - max(map(len, streams)))
    running = [engine.add(s, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)) for s in streams]
    while len(engine.active) < len(running):
        engine.step()
    engine.step()
    if long_ids is None:
        late, arrived = None, None
    else:
        late, arrived = engine.add(long_ids, SamplingParams(max_new_tokens=1, ignore_eos=True)), time.perf_counter()
    gaps, last, ttft = [], time.perf_counter(), None
    for _ in range(steps):
        events = engine.step()
        now = time.perf_counter()
        if any(e.request_id == running[0].id for e in events):
            gaps.append(now - last)
            last = now
        if late is not None and late.finished:
            ttft = ttft or now - arrived
            if len(gaps) >= steps // 2:
                break
    while late is not None and not late.finished:
        engine.step()
        ttft = time.perf_counter() - arrived  # the last one is the step that gave it its token
    return gaps, ttft


def interleave(model, long_tokens: int, chunk: int, steps: int, runs: int) -> dict:
    tok = model.tokenizer
    streams = [tok.encode_chat(CHAT)[-16:], tok.encode_chat(COPY)[-16:]]  # short prompts, long answers
    line = tok.encode(SYSTEM_LINE, add_special_tokens=False)
    long_ids = (line * (long_tokens // len(line) + 1))[:long_tokens]
    model.backend.prepare_mixed_steps()
    # where the backend runs a chunk in the decode step's forward, the same chunks as forwards of their own too
    conditions = ["alone", "whole", "chunked"] + (["chunked_apart"] if model.backend.mixes_steps else [])
    settings = {"alone": (None, None, True), "whole": (long_ids, None, True), "chunked": (long_ids, chunk, True),
                "chunked_apart": (long_ids, chunk, False)}
    gaps = {c: [] for c in conditions}
    ttfts = {c: [] for c in conditions}
    for _ in range(runs):
        for c in conditions:
            prompt, size, mixed = settings[c]
            g, ttft = _intervals(model, streams, prompt, size, steps, mixed)
            gaps[c] += g
            ttfts[c].append(ttft)

    def pct(c, q):
        return round(1e3 * float(np.percentile(gaps[c], q)), 1)

    report = {"long_prompt_tokens": long_tokens, "prefill_chunk": chunk, "streams": len(streams),
              "mixed_steps": model.backend.mixes_steps}
    for c, key in (("alone", "alone_ms"), ("whole", "whole_prefill_ms"), ("chunked", "chunked_prefill_ms"),
                   ("chunked_apart", "chunked_apart_ms")):
        if c in gaps:
            report[key] = {"p50": pct(c, 50), "p99": pct(c, 99)}
        if c != "alone" and c in gaps:
            report[f"p99_ratio_{c}"] = round(pct(c, 99) / pct("alone", 99), 2)
    # what the chunks cost the long prompt itself, with the streams running beside it
    report["long_prompt_ttft_ms"] = {c: round(1e3 * _median(ttfts[c]), 1) for c in conditions if c != "alone"}
    return report


def run_workloads(artifact: Path, target: Optional[str] = None, runs: int = 3, new_tokens: int = 128,
                  prefix_tokens: int = 1000, long_tokens: int = 1900, prefill_chunk: int = 16,
                  spec: SpeculativeConfig = SpeculativeConfig(), threads: Optional[int] = None,
                  draft: Optional[str] = None, log: Callable[[str], None] = lambda _: None) -> dict:
    from . import load
    from .bench import require_decoder

    with load(artifact, target=target, threads=threads) as model:
        require_decoder(model.manifest)  # an encoder artifact generates no tokens to time
        bounds = model.backend.target.shapes
        limit = bounds.max_sequence if bounds else model.backend.dims.max_positions
        prefix_tokens, long_tokens = min(prefix_tokens, limit - 40), min(long_tokens, limit - 8)
        draft = draft or draft_target(model.manifest, model.target)
        if draft is not None:
            model.draft_backend(draft)  # a bad draft model fails now, not after minutes of benchmarking
        report = {"artifact": model.name, "target": model.target, "runs": runs,
                  "speculative": {"method": spec.method, "num_tokens": spec.num_tokens}}
        log("copy-heavy task: plain vs n-gram speculation")
        report["copy"] = speculation(model, COPY, new_tokens, runs, spec, limit)
        log("free chat: plain vs n-gram speculation")
        report["chat"] = speculation(model, CHAT, new_tokens, runs, spec, limit)
        log("free chat: plain vs draft-model speculation")
        report["chat_draft"] = drafted_chat(model, new_tokens, runs, spec, limit, draft)
        log(f"shared {prefix_tokens}-token system prompt: TTFT uncached vs cached")
        report["prefix"] = prefix(model, prefix_tokens, runs)
        log(f"inter-token latency while a {long_tokens}-token prompt arrives")
        report["interleave"] = interleave(model, long_tokens, prefill_chunk, steps=min(24, limit // 4), runs=runs)
    return report


def print_workloads(report: dict, console) -> None:
    c, ch, p, i = report["copy"], report["chat"], report["prefix"], report["interleave"]
    console.print(f"{report['artifact']}/{report['target']}: workloads, medians of {report['runs']} alternating runs")
    for name, r in (("copy-heavy", c), ("free chat", ch)):
        console.print(f"  {name}: {r['plain_tok_s']} -> {r['speculative_tok_s']} tok/s with {report['speculative']['method']} "
                      f"speculation = {r['ratio']}x (after the first token: {r['decode_ratio']}x); identical tokens: "
                      f"{r['identical_tokens']}; acceptance {r['acceptance_rate']:.0%}")
    d = report.get("chat_draft", {})
    if "draft" in d:
        console.print(f"  free chat, drafted by {d['draft']}: {d['plain_tok_s']} -> {d['speculative_tok_s']} tok/s = "
                      f"{d['ratio']}x (after the first token: {d['decode_ratio']}x); identical tokens: {d['identical_tokens']}; "
                      f"acceptance {d['acceptance_rate']:.0%}")
    elif d:
        console.print(f"  free chat, drafted by a smaller model: skipped ({d['skipped']})")
    console.print(f"  shared {p['prefix_tokens']}-token prefix: TTFT {p['uncached_ttft_ms']} ms uncached, "
                  f"{p['cached_ttft_ms']} ms cached = {p['ratio']:.1%}")
    console.print(f"  inter-token p99 of {i['streams']} streams: {i['alone_ms']['p99']} ms alone, "
                  f"{i['whole_prefill_ms']['p99']} ms while a {i['long_prompt_tokens']}-token prompt prefills whole "
                  f"({i['p99_ratio_whole']}x), {i['chunked_prefill_ms']['p99']} ms in chunks of {i['prefill_chunk']} "
                  f"({i['p99_ratio_chunked']}x); the long prompt's own TTFT {i['long_prompt_ttft_ms']['whole']} ms whole, "
                  f"{i['long_prompt_ttft_ms']['chunked']} ms in chunks")
    if "chunked_apart_ms" in i:
        console.print(f"  (each chunk in the decode step's forward; as a forward of its own: p99 "
                      f"{i['chunked_apart_ms']['p99']} ms = {i['p99_ratio_chunked_apart']}x, the long prompt's "
                      f"TTFT {i['long_prompt_ttft_ms']['chunked_apart']} ms)")
