"""One-command device check (issue 22): build real model shapes for a device, check greedy parity against
transformers on that device, and measure decode against the memory-bandwidth roofline, beside transformers.

    python -m inferneo_build.gpu_check OUT_DIR [--device cuda] [--models smollm2-135m,qwen3-0.6b]

For each model: a random-weight checkpoint from the model's real config (decode speed does not depend on weight
values, and the GPU host has no Hub), an artifact with the device's targets (`pt2` compiled for the device and
`torchscript`; bf16 on CUDA, float32 on the CPU), then on the device:
  - parity: each target's greedy tokens against transformers' `generate` on the same device and dtype;
  - batch-1 decode tok/s, time to first token, aggregate tok/s at each --concurrency, peak device memory;
  - the measured bandwidth (a device-to-device copy on CUDA, threaded reads on the CPU) and the roofline it
    implies (bandwidth / bytes of weights read per token), each target's share of it;
  - transformers `generate` beside it: eager, and (CUDA by default) with a static cache + torch.compile.
It writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md and prints the table. `--device cpu --models tiny` is
what CI runs, so the whole path is exercised on every change.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from inferneo_runtime.errors import error_summary

# Real configs (the published config.json values that shape decode), so the shapes and byte counts are the models'.
CONFIGS: dict[str, dict] = {
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645),
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128009,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # CI's: small enough to build, compare and measure on a 2-core CPU in well under a minute
    "tiny": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0,
                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
}
PROMPT_TOKENS = 128  # the measured prompt's length (ids drawn from the vocabulary, fixed seed)


def make_checkpoint(config_fields: dict, out_dir: Path, seed: int = 0) -> Path:
    """A random-weight checkpoint of `config_fields` plus a small byte-level BPE tokenizer, saved in out_dir.
    Matrices are widened (x5) so that greedy decoding is not one repeated token and parity means something."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    fields = dict(config_fields)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(5.0)
    model.save_pretrained(out_dir)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(config.vocab_size, 1024), special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["Inferneo compiles models ahead of time and serves them with a KV cache."] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(out_dir)
    return Path(out_dir)


def device_targets(device: str, names: list[str]) -> list[dict]:
    """Recipe targets for the device: bf16 on CUDA (what GPUs decode in), float32 on the CPU."""
    cuda = device.startswith("cuda")
    out = []
    for name in names:
        if name == "pt2":
            out.append({"format": "pt2", "device": "cuda" if cuda else "cpu", "precision": "bf16" if cuda else "fp32"})
        elif name == "torchscript":
            out.append({"format": "torchscript", "precision": "bf16" if cuda else "fp32"})
        else:
            raise ValueError(f"--targets: {name!r} is not a device target here (pt2, torchscript)")
    return out


def measure_bandwidth(device: str) -> dict:
    """Bytes per second the device moves: a device-to-device copy (read + write) on CUDA, threaded reads on the CPU."""
    from inferneo_runtime.bench import measure_bandwidth as cpu_bandwidth
    from inferneo_runtime.bench import measure_device_bandwidth

    if device.startswith("cuda"):
        got = measure_device_bandwidth(device)
        return {"gb_s": got["read_gb_s"], "method": got["method"]}
    got = cpu_bandwidth()
    return {"gb_s": got["read_gb_s"], "method": f"threaded reads of {got['buffer_mib']} MiB, best of 7"}


def _median_time(fn: Callable[[], object], runs: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(runs):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def measure_target(artifact: Path, target: str, device: str, prompt: list[int], new_tokens: int,
                   concurrency: list[int], runs: int, cuda_graphs: bool = True) -> dict:
    import inferneo_runtime
    from inferneo_runtime import SamplingParams

    if not cuda_graphs:  # this child only: decode steps launched kernel by kernel, to show what the graphs buy
        os.environ["INFERNEO_CUDA_GRAPHS"] = "0"
    peak = _reset_peak(device)
    t = time.perf_counter()
    model = inferneo_runtime.load(artifact, target=target, device=device)
    load_s = time.perf_counter() - t
    try:
        def run(prompts, n):
            return _synced(device, model.generate_ids(prompts, SamplingParams(max_new_tokens=n, ignore_eos=True)))

        run([prompt], 4)  # warm-up: first-call allocation and kernel selection
        ttft, _ = _median_time(lambda: run([prompt], 1), runs)
        full, out = _median_time(lambda: run([prompt], new_tokens), runs)
        aggregate = {}
        for c in concurrency:
            # distinct prompts (a different last token each), so nothing is shared between the requests
            batch = [prompt[:-1] + [(prompt[-1] + i) % model.manifest.model.vocab] for i in range(c)]
            run(batch, new_tokens)  # warm-up: requests join one prefill a step: each batch bucket is captured
            secs, _ = _median_time(lambda: run(batch, new_tokens), max(1, runs // 2))
            aggregate[str(c)] = round(c * new_tokens / secs, 1)
        # sampled decode: the draw runs where the logits are; keep_logits brings every step's logits to the
        # host sampler instead, and the same seed must give the same tokens
        sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, temperature=0.8, top_p=0.95, seed=0)
        sampled_s, sampled = _median_time(lambda: _synced(device, model.generate_ids([prompt], sampling)), runs)
        host_drawn = model.generate_ids([prompt], sampling, keep_logits=True)
        graphs = getattr(model.backend, "decode_graphs", None)  # the torch targets' (decode_graph.py)
        return {"load_s": round(load_s, 2), "ttft_ms": round(ttft * 1e3, 2),
                "decode_tok_s": round((new_tokens - 1) / max(full - ttft, 1e-9), 1),
                "sampled_decode_tok_s": round((new_tokens - 1) / max(sampled_s - ttft, 1e-9), 1),
                "sampled_tokens_equal_host_draw": sampled[0].token_ids == host_drawn[0].token_ids,
                "aggregate_tok_s": aggregate, "peak_device_memory_gb": peak(), "tokens": out[0].token_ids,
                "decode_graphs": None if graphs is None else {"mode": graphs.mode, "captured": graphs.captured,
                                                              "error": graphs.error}}
    finally:
        model.close()


def _synced(device: str, result):
    _sync(device)
    return result


def _reset_peak(device: str) -> Callable[[], Optional[float]]:
    if not device.startswith("cuda"):
        from inferneo_runtime.bench import peak_rss_mb

        return lambda: round(peak_rss_mb() / 1024, 2)  # the process's peak RSS: the CPU's "device memory"
    import torch

    torch.cuda.reset_peak_memory_stats(device)
    return lambda: round(torch.cuda.max_memory_allocated(device) / 1e9, 2)


def measure_transformers(checkpoint: Path, device: str, dtype_name: str, prompt: list[int], new_tokens: int,
                         runs: int, compiled: bool) -> dict:
    """transformers `generate` on the same device: eager, then static cache + torch.compile (when `compiled`)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype_name)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
    ids = torch.tensor([prompt], device=device)
    mask = torch.ones_like(ids)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def gen(n, **kw):
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=pad, **kw)
        _sync(device)
        return out[0, len(prompt):].tolist()

    result = {}
    variants = [("eager", {})]
    if compiled:
        variants.append(("static_compile", {"cache_implementation": "static"}))
    for name, kw in variants:
        try:
            if name == "static_compile":
                model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
                gen(new_tokens, **kw)  # compiles (prefill and decode shapes)
            gen(4, **kw)
            ttft, _ = _median_time(lambda: gen(1, **kw), runs)
            full, tokens = _median_time(lambda: gen(new_tokens, **kw), runs)
        except Exception as e:  # the compiled peer failing on this host's torch is a finding, not the end of the check
            if name == "eager":
                raise  # the parity reference
            result[name] = {"error": error_summary(e)}
            continue
        result[name] = {"ttft_ms": round(ttft * 1e3, 2),
                        "decode_tok_s": round((new_tokens - 1) / max(full - ttft, 1e-9), 1), "tokens": tokens}
    return result  # the model (and its GPU memory) goes with this frame


def first_divergence(a: list[int], b: list[int]) -> Optional[int]:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def check_model(name: str, work: Path, device: str, targets: list[str], new_tokens: int, concurrency: list[int],
                runs: int, compiled: bool, log: Callable[[str], None]) -> dict:
    import numpy as np

    from inferneo_build.recipe import Recipe
    from inferneo_runtime.manifest import read_manifest

    config = CONFIGS[name]
    t = time.perf_counter()
    checkpoint = make_checkpoint(config, work / name / "checkpoint")
    log(f"{name}: random-weight checkpoint in {time.perf_counter() - t:.1f}s")
    fields = {
        "name": f"check-{name}", "source": {"path": str(checkpoint)},
        "targets": device_targets(device, targets),
        "shapes": {"max_batch": max([1, *concurrency]), "max_sequence": max(512, PROMPT_TOKENS + new_tokens + 64)},
        "validation": {"prompts": ["Inferneo compiles models", "ahead of time"], "max_new_tokens": 16},
        "output": str(work / name / "artifact")}
    Recipe.model_validate(fields)  # a bad field is reported here, before a child process starts
    t = time.perf_counter()
    artifact = Path(_in_child(_build, fields))
    build_s = time.perf_counter() - t
    log(f"{name}: artifact built and validated in {build_s:.1f}s")
    manifest = read_manifest(artifact)
    rng = np.random.default_rng(0)
    prompt = [int(x) for x in rng.integers(3, config["vocab_size"], PROMPT_TOKENS)]

    dtype_name = "bfloat16" if device.startswith("cuda") else "float32"
    peers = _in_child(measure_transformers, checkpoint, device, dtype_name, prompt, new_tokens, runs, compiled)
    log(f"{name}: transformers " + ", ".join(f"{k} {v.get('decode_tok_s', v.get('error'))}" for k, v in peers.items()))
    weight_bytes = _weight_bytes(checkpoint, 2 if dtype_name == "bfloat16" else 4)
    bandwidth = measure_bandwidth(device)
    roofline = bandwidth["gb_s"] * 1e9 / weight_bytes
    measured = {}
    for target in manifest.targets:
        entry = manifest.targets[target]
        if entry.status != "valid":
            measured[target] = {"skipped": entry.validation.reason}
            continue
        try:
            m = _in_child(measure_target, artifact, target, device, prompt, new_tokens, concurrency, runs)
        except Exception as e:  # recorded for this target; the others are still measured
            measured[target] = {"error": error_summary(e)}
            log(f"{name}/{target}: failed: {measured[target]['error']}")
            continue
        tokens = m.pop("tokens")
        reference = peers["eager"]["tokens"]
        m["parity"] = {"tokens_equal": tokens == reference, "first_divergence": first_divergence(tokens, reference),
                       "compared_tokens": len(reference)}
        if (m["decode_graphs"] or {}).get("captured"):  # the same decode, each step launched kernel by kernel
            plain = _in_child(measure_target, artifact, target, device, prompt, new_tokens, [], runs, False)
            m["decode_tok_s_without_graphs"] = plain["decode_tok_s"]
        m["share_of_roofline"] = round(m["decode_tok_s"] / roofline, 3)
        m["vs_transformers"] = {k: round(m["decode_tok_s"] / v["decode_tok_s"], 2) for k, v in peers.items()
                                if "decode_tok_s" in v}
        if concurrency:
            top = str(max(concurrency))
            m["aggregate_vs_single"] = round(m["aggregate_tok_s"][top] / m["decode_tok_s"], 2)
        measured[target] = m
        log(f"{name}/{target}: {m['decode_tok_s']} tok/s ({m['share_of_roofline']:.0%} of roofline), "
            f"parity {'ok' if m['parity']['tokens_equal'] else 'diverges at ' + str(m['parity']['first_divergence'])}")
    for v in peers.values():
        v.pop("tokens", None)
    return {"config": {k: v for k, v in config.items() if k != "rope_scaling"}, "build_s": round(build_s, 1),
            "weight_bytes": weight_bytes, "bandwidth": bandwidth, "roofline_tok_s": round(roofline, 1),
            "prompt_tokens": PROMPT_TOKENS, "new_tokens": new_tokens, "targets": measured, "transformers": peers}


def _in_child(fn: Callable, *args):
    """fn(*args) in a fresh process: every build and every measurement starts from a process that has loaded
    nothing else, as a server does. (On the CPU, a TorchScript target measured in a process that had run a .pt2
    package ran several times slower, and the other way round after a build had compiled one.)"""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def _build(recipe_fields: dict) -> str:
    from inferneo_build import build
    from inferneo_build.recipe import Recipe

    return str(build(Recipe.model_validate(recipe_fields)).output)


def _weight_bytes(checkpoint: Path, itemsize: int) -> int:
    """Bytes of weights one decode step reads: every parameter once (a tied head is the embedding, counted once)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(checkpoint).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                total += _numel(st.get_slice(key).get_shape())
    return total * itemsize


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def host_facts(device: str) -> dict:
    import torch
    import transformers

    facts = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
             "device": device, "machine": platform.machine()}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        facts |= {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}",
                  "gpu_memory_gb": round(props.total_memory / 1e9, 1), "cuda": torch.version.cuda}
    else:
        from inferneo_runtime.bench import _cpu_model

        facts["cpu"] = _cpu_model()
    return facts


def markdown(report: dict) -> str:
    host = report["host"]
    lines = [f"# Inferneo device check: {host.get('gpu') or host.get('cpu')} ({host['device']})", "",
             f"torch {host['torch']}, transformers {host['transformers']}, Python {host['python']}; "
             f"`{report['command']}`", "",
             "| model | target | decode tok/s | share of roofline | vs transformers eager | vs static+compile | "
             "TTFT ms | aggregate tok/s | parity | peak memory GB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in report["models"].items():
        if "error" in m:
            lines.append(f"| {name} | | failed: {m['error']} | | | | | | | |")
            continue
        for target, t in m["targets"].items():
            if "skipped" in t or "error" in t:
                why = f"skipped: {t['skipped']}" if "skipped" in t else f"failed: {t['error']}"
                lines.append(f"| {name} | {target} | {why} | | | | | | | |")
                continue
            agg = ", ".join(f"{c}: {v}" for c, v in t["aggregate_tok_s"].items())
            parity = "equal" if t["parity"]["tokens_equal"] else f"diverges at {t['parity']['first_divergence']}"
            decode, graphs = str(t["decode_tok_s"]), t.get("decode_graphs") or {}
            if "decode_tok_s_without_graphs" in t:
                decode += f" ({t['decode_tok_s_without_graphs']} without CUDA graphs)"
            elif graphs.get("error"):
                decode += f" (CUDA graph capture failed: {graphs['error']})"
            decode += (f"; sampled {t['sampled_decode_tok_s']}"
                       f"{'' if t['sampled_tokens_equal_host_draw'] else ' (NOT the host sampler tokens)'}")
            lines.append(f"| {name} | {target} | {decode} | {t['share_of_roofline']:.1%} | "
                         f"{t['vs_transformers'].get('eager', '')}x | {t['vs_transformers'].get('static_compile', '-')}"
                         f"{'x' if 'static_compile' in t['vs_transformers'] else ''} | {t['ttft_ms']} | {agg} | "
                         f"{parity} | {t['peak_device_memory_gb']} |")
        peers = ", ".join(f"{k} {v['decode_tok_s']} tok/s" if "decode_tok_s" in v else f"{k} failed: {v['error']}"
                          for k, v in m["transformers"].items())
        lines.append(f"| {name} | transformers | {peers} | | | | | | | |")
    lines += ["", "Roofline: measured bandwidth / bytes of weights per token. " + "; ".join(
        f"{name}: {m['bandwidth']['gb_s']} GB/s ({m['bandwidth']['method']}), {m['weight_bytes'] / 1e9:.2f} GB "
        f"-> {m['roofline_tok_s']} tok/s" for name, m in report["models"].items() if "error" not in m), ""]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inferneo_build.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for gpu_check.json, gpu_check.md and the work files")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when torch sees a GPU)")
    parser.add_argument("--models", default="smollm2-135m,qwen3-0.6b", help=f"comma-separated: {', '.join(CONFIGS)}")
    parser.add_argument("--targets", default="pt2,torchscript", help="comma-separated: pt2, torchscript")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--concurrency", default="8,32", help="comma-separated concurrent requests to measure")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per figure (medians)")
    parser.add_argument("--compile-peer", choices=("auto", "yes", "no"), default="auto",
                        help="transformers with a static cache + torch.compile (auto: on CUDA only)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the checkpoints and artifacts (default: OUT/work; GBs for the real configs)")
    args = parser.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in CONFIGS]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: torch {torch.__version__} sees no CUDA device")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    try:
        device_targets(device, targets)
        concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError as e:
        parser.error(str(e) if str(e).startswith("--") else f"--concurrency: {e}")
    compiled = args.compile_peer == "yes" or (args.compile_peer == "auto" and device.startswith("cuda"))
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or args.out / "work"

    def log(message: str) -> None:
        print(f"[gpu_check] {message}", file=sys.stderr, flush=True)

    report = {"command": "python -m inferneo_build.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:]),
              "host": host_facts(device), "models": {}}
    for name in models:
        try:
            report["models"][name] = check_model(name, work, device, targets, args.new_tokens, concurrency, args.runs,
                                                 compiled, log)
        except Exception as e:  # recorded; the next model is still checked (a device session has minutes, not hours)
            report["models"][name] = {"error": error_summary(e)}
            log(f"{name}: failed: {report['models'][name]['error']}")
        # both kept after each model, so a run stopped at its time limit keeps what it measured
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    failed = any("error" in m or any("error" in t for t in m.get("targets", {}).values())
                 for m in report["models"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
