"""Latency benchmark against a running server: `inferneo bench --url http://… --requests N --concurrency C`
(also `python -m inferneo_runtime.bench_server --url …`).

Three runs, each streamed so the time to first token is seen:
  single      N requests one after another
  batched     requests of C prompts each (the server batches them in one engine), N prompts in all
  concurrent  N requests from C clients at once (the server's continuous batching)
Each reports latency mean / median / p95 / p99 (per request), time to first token (mean, median, p95),
tokens/s (completion tokens over the run's wall time) and errors.
"""
from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np

PROMPTS = ["The quick brown fox", "Hello world, this is", "Inferneo compiles models ahead of time and",
           "Once upon a time", "def fibonacci(n):", "The capital of France is"]


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "median": None, "p95": None, "p99": None}
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99))}


def _one(client, model: Optional[str], prompts: list[str], max_tokens: int) -> tuple[float, Optional[float], int]:
    """(latency, time to first token, completion tokens) of one streamed request."""
    t0 = time.perf_counter()
    first = None
    tokens = 0
    prompt = prompts[0] if len(prompts) == 1 else prompts
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return time.perf_counter() - t0, first, tokens


def _run(name: str, jobs: list[list[str]], workers: int, url: str, model: Optional[str], max_tokens: int) -> dict:
    from .client import InferneoClient

    latencies, ttfts, tokens, errors = [], [], 0, []

    def job(prompts):
        with InferneoClient(url) as client:
            return _one(client, model, prompts, max_tokens)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(job, p) for p in jobs]:
            try:
                latency, ttft, n = future.result()
            except Exception as e:  # noqa: BLE001 - a benchmark reports failures, it does not stop on them
                errors.append(str(e)[:200])
                continue
            latencies.append(latency)
            if ttft is not None:
                ttfts.append(ttft)
            tokens += n
    wall = time.perf_counter() - t0
    ttft = _stats(ttfts)
    return {"run": name, "requests": len(jobs), "prompts": sum(len(j) for j in jobs), "workers": workers,
            "latency_s": _stats(latencies), "ttft_s": {k: ttft[k] for k in ("mean", "median", "p95")},
            "completion_tokens": tokens, "tokens_per_s": tokens / wall if wall > 0 else None, "wall_s": wall,
            "errors": len(errors), "first_error": errors[0] if errors else None}


def run_bench(url: str, requests: int = 20, concurrency: int = 4, model: Optional[str] = None,
              max_tokens: int = 32, prompts: Optional[list[str]] = None) -> dict:
    """The three runs against `url`; `model` None lets the server route (its only or default model)."""
    prompts = prompts or PROMPTS
    items = [prompts[i % len(prompts)] for i in range(requests)]
    batches = [items[i:i + concurrency] for i in range(0, requests, concurrency)]
    runs = [_run("single", [[p] for p in items], 1, url, model, max_tokens),
            _run("batched", batches, 1, url, model, max_tokens),
            _run("concurrent", [[p] for p in items], concurrency, url, model, max_tokens)]
    return {"url": url, "model": model, "max_tokens": max_tokens, "runs": runs}


def format_report(report: dict) -> str:
    def ms(x):
        return "-" if x is None else f"{x * 1000:.1f}"

    lines = [f"{report['url']} model={report['model'] or '(routed)'} max_tokens={report['max_tokens']}",
             f"{'run':<11} {'reqs':>5} {'mean ms':>9} {'median':>9} {'p95':>9} {'p99':>9} {'ttft ms':>9} "
             f"{'ttft p95':>9} {'tok/s':>9} {'errors':>6}"]
    for r in report["runs"]:
        lat, ttft = r["latency_s"], r["ttft_s"]
        tps = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.1f}"
        lines.append(f"{r['run']:<11} {r['requests']:>5} {ms(lat['mean']):>9} {ms(lat['median']):>9} "
                     f"{ms(lat['p95']):>9} {ms(lat['p99']):>9} {ms(ttft['mean']):>9} {ms(ttft['p95']):>9} "
                     f"{tps:>9} {r['errors']:>6}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="inferneo bench --url", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--model", default=None)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--json", action="store_true", dest="as_json")
    a = p.parse_args(argv)
    if a.requests < 1 or a.concurrency < 1 or a.max_tokens < 1:
        p.error("--requests, --concurrency and --max-tokens must be >= 1")
    report = run_bench(a.url, a.requests, a.concurrency, a.model, a.max_tokens)
    print(json.dumps(report) if a.as_json else format_report(report))
    return 1 if any(r["errors"] for r in report["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())


def cli_bench_url(url: str, requests: int, concurrency: int, model: Optional[str], as_json: bool, console) -> None:
    """`inferneo bench --url`: run, print (JSON or a table), and fail (exit 1) if any request failed."""
    report = run_bench(url, requests, concurrency, model)
    if as_json:
        print(json.dumps({"ok": not any(r["errors"] for r in report["runs"]), **report}))
    else:
        console.print(format_report(report), highlight=False, markup=False)
    failed = [r for r in report["runs"] if r["errors"]]
    if failed:
        from .errors import InferneoError

        raise InferneoError(f"{sum(r['errors'] for r in failed)} request(s) failed; first: {failed[0]['first_error']}")
