"""The `inferneo` command. Thin: parse, call the Python API, print, map errors to exit codes.

Runtime commands live here so a runtime-only host has them; build-side commands import `inferneo_build`
only when they run.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Inferneo: compile Hugging Face checkpoints into validated artifacts and run them.")
out = Console()
err = Console(stderr=True, soft_wrap=True)

EXIT_CODES = """Exit codes: 0 ok; 1 unexpected error; 2 bad input (recipe, arguments, request); 3 bad or unreadable
manifest; 4 integrity failure (checksum/size); 5 missing extra or toolchain; 6 goldens do not reproduce;
7 validation failed at build (nothing published); 8 S3 error (missing bucket/key, access denied);
9 signature missing, untrusted or invalid."""


def _fail(e: BaseException, as_json: bool) -> "typer.Exit":
    code = getattr(e, "exit_code", 1)
    message = str(e) or type(e).__name__
    if as_json:
        payload = {"ok": False, "error": type(e).__name__, "message": message, "exit_code": code}
        if getattr(e, "details", None) is not None:
            payload["details"] = e.details
        print(json.dumps(payload))
    else:
        err.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    if code == 1 and os.environ.get("INFERNEO_DEBUG"):
        raise e
    return typer.Exit(code)


def _run(fn, as_json: bool):
    try:
        return fn()
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]")
        raise typer.Exit(130)
    except Exception as e:  # every error reaches the user as one line and an exit code
        raise _fail(e, as_json) from None


TRUSTED_KEY_HELP = "Ed25519 public key the manifest must be signed with (repeatable; default $INFERNEO_TRUSTED_KEYS)"


@app.command()
def generate(
    artifact: Path = typer.Argument(..., help="artifact directory or s3://bucket/prefix"),
    prompt: str = typer.Argument(..., help="prompt text (with --chat: the user message)"),
    target: Optional[str] = typer.Option(None, help="target to run (default: onnx if present)"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    seed: Optional[int] = typer.Option(None, help="sampling seed (same seed, same tokens)"),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="stop string (repeatable)"),
    chat: bool = typer.Option(False, "--chat", help="render PROMPT as a user message with the chat template"),
    system: Optional[str] = typer.Option(None, "--system", help="system message (with --chat)"),
    stream: bool = typer.Option(False, "--stream", help="print text as it is generated"),
    speculative: Optional[str] = typer.Option(None, "--speculative", help="ngram: draft tokens from earlier text "
                                              "and verify them in one step (same output, fewer passes)"),
    speculative_tokens: int = typer.Option(4, "--speculative-tokens", min=1, max=16,
                                           help="with --speculative: most tokens drafted per step"),
    device: str = typer.Option("cpu", help="cpu or cuda[:N]"),
    threads: Optional[int] = typer.Option(None, help="intra-op threads (default: physical cores)"),
    trusted_key: Optional[list[Path]] = typer.Option(None, "--trusted-key", help=TRUSTED_KEY_HELP),
    as_json: bool = typer.Option(False, "--json", help="print a JSON object"),
):
    """Generate a completion from an artifact."""

    def go():
        from . import load

        from .speculative import SpeculativeConfig

        spec = SpeculativeConfig(speculative, speculative_tokens) if speculative else None  # checked before loading
        params = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                      stop=tuple(stop or ()))
        t0 = time.perf_counter()
        with load(artifact, target=target, device=device, threads=threads, trusted_keys=trusted_key) as model:
            t_load = time.perf_counter() - t0
            source = model.backend.session_source
            load_note = f"load {t_load:.2f}s" + (" (wrote this host's packed onnx copy; later loads map it)"
                                                 if source == "created" else "")
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            ids = model.tokenizer.encode_chat(messages) if chat else model.encode(prompt)
            t1 = time.perf_counter()
            if stream and not as_json:
                for delta in model.stream(messages if chat else prompt, speculative=spec, **params):
                    sys.stdout.write(delta)
                    sys.stdout.flush()
                sys.stdout.write("\n")
                err.print(f"[dim]{model.name}/{model.target}: {time.perf_counter() - t1:.2f}s, {load_note}[/dim]")
                return
            from .sampling import SamplingParams

            c = model.completion(model.generate_ids([ids], SamplingParams(**params), speculative=spec)[0])
            t_gen = time.perf_counter() - t1
            if as_json:
                extra = {"speculative_drafted": model.spec_stats.drafted,
                         "speculative_accepted": model.spec_stats.accepted} if spec else {}
                print(json.dumps({"ok": True, "model": model.name, "target": model.target, "text": c.text,
                                  "token_ids": c.token_ids, "prompt_tokens": len(c.prompt_ids),
                                  "finish_reason": c.finish_reason, "load_seconds": round(t_load, 3),
                                  "session_source": source, "generate_seconds": round(t_gen, 3), **extra}))
            else:
                out.print(c.text, highlight=False, markup=False)
                err.print(f"[dim]{model.name}/{model.target}: {len(c.token_ids)} tokens in {t_gen:.2f}s, "
                          f"finish_reason={c.finish_reason}, {load_note}[/dim]")

    _run(go, as_json)


@app.command()
def keygen(
    path: Path = typer.Argument(..., help="where to write the private key; the public key goes to PATH.pub"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON object"),
):
    """Create an Ed25519 key pair for signing artifacts (build/push --sign, load --trusted-key)."""

    def go():
        from .signing import generate_keypair

        private, public, kid = generate_keypair(path)
        if as_json:
            print(json.dumps({"ok": True, "private_key": str(private), "public_key": str(public), "key_id": kid}))
        else:
            out.print(f"key {kid}: private {private} (keep it secret), public {public} (give it to hosts)")

    _run(go, as_json)


@app.command()
def inspect(
    artifact: Path = typer.Argument(..., help="artifact directory"),
    as_json: bool = typer.Option(False, "--json", help="print the manifest as JSON"),
    check: bool = typer.Option(False, "--check", help="say whether each target can run on this host (versions, GPU, "
                               "extras, memory) without loading it; exit 5 unless every valid target can"),
    device: str = typer.Option("cpu", help="with --check: cpu or cuda[:N]"),
    html: Optional[Path] = typer.Option(None, "--html", help="write a self-contained HTML report (manifest, "
                                        "targets, validation and its chart, goldens) to this file"),
):
    """Show an artifact's manifest: model, targets, validation results, toolchain."""

    def go():
        from .manifest import read_manifest

        m = read_manifest(artifact)
        if html is not None:
            from .report import write_html_report

            path = write_html_report(artifact, m, html)
            if as_json:
                print(json.dumps({"ok": True, "artifact": str(artifact), "html": str(path)}))
            else:
                out.print(f"[green]wrote[/green] {escape(str(path))} ({m.name}: {len(m.targets)} targets)",
                          highlight=False)
            return
        if check:
            return _print_check(m, device, as_json)
        if as_json:
            print(m.to_json(), end="")
            return
        out.print(f"[bold]{m.name}[/bold]  {m.task} · {m.architecture} · {m.model.num_layers} layers · hidden "
                  f"{m.model.hidden} · vocab {m.model.vocab} · source {m.source.kind}:{m.source.uri}", highlight=False)
        for a in m.source.adapters:
            out.print(f"  LoRA adapter {a.path} (sha256 {a.sha256[:12]}…, r={a.rank}, alpha={a.alpha:g}, "
                      f"{', '.join(a.target_modules)}) merged", highlight=False)
        if m.encoder is not None:
            e = m.encoder
            how = (f"{e.pooling} pooling{', L2-normalized' if e.normalize else ''}" if e.output == "embedding"
                   else f"labels {', '.join(e.labels or [])}")
            out.print(f"  {e.output} [{e.dim}] · {how} · max_length {e.max_length}", highlight=False)
        table = Table("target", "prec.", "status", "size", "validation", "max-abs err", "tokens")
        table.columns[0].no_wrap = True
        for name, t in m.targets.items():
            v = t.validation
            size = sum(f.size for f in t.files)
            table.add_row(name, t.precision or "fp32", t.status, f"{size / 1e6:.1f} MB", v.status,
                          "-" if v.max_abs_logits_error is None else f"{v.max_abs_logits_error:.2e}",
                          "-" if v.token_match is None else ("match" if v.token_match else "diverge"))
        out.print(table)
        judged = {n: t for n, t in m.targets.items() if t.validation.criterion == "tolerance"}
        if judged:  # reduced precisions and encoders: each metric next to the threshold it had to meet
            def metric(value, limit, fmt, sign):
                if value is None:
                    return "-"
                return fmt.format(value) + ("" if limit is None else f" {sign}{fmt.format(limit)}")

            if m.encoder is not None:
                acc = Table("target", "texts", "min cosine", "max-abs err", title="agreement with the PyTorch reference")
                for name, t in judged.items():
                    v, tol = t.validation, t.validation.tolerance
                    acc.add_row(name, str(v.prompts), metric(v.min_cosine, tol and tol.cosine, "{:.6f}", "≥"),
                                "-" if v.max_abs_logits_error is None else f"{v.max_abs_logits_error:.2e}")
            else:
                acc = Table("target", "positions", "top-1 agreement", "mean KL", "ppl (ref)", "Δ ppl",
                            title="teacher-forced vs the float32 reference: value, threshold")
                for name, t in judged.items():
                    v, tol = t.validation, t.validation.tolerance
                    ppl = "-" if v.perplexity is None else f"{v.perplexity:.2f} ({v.reference_perplexity:.2f})"
                    acc.add_row(name, str(v.positions or "-"),
                                metric(v.top1_agreement, tol and tol.top1_agreement, "{:.3f}", "≥"),
                                metric(v.mean_kl, tol and tol.mean_kl, "{:.4f}", "≤"), ppl,
                                metric(v.perplexity_delta, tol and tol.perplexity_delta, "{:+.1%}", "≤"))
            acc.columns[0].no_wrap = True
            out.print(acc)
        out.print(f"built {m.built_at} · schema {m.schema_version} · goldens {len(m.goldens)} · "
                  f"torch {m.toolchain.get('torch')} · onnxruntime {m.toolchain.get('onnxruntime')}")

    _run(go, as_json)


def _print_check(m, device: str, as_json: bool) -> None:
    from .preflight import check_all

    verdicts = check_all(m, device)
    usable = [v for v in verdicts.values() if v.skipped is None]
    ok = bool(usable) and all(v.ok for v in usable)
    if as_json:
        print(json.dumps({"ok": ok, "artifact": m.name, "device": device,
                          "targets": {name: v.to_dict() for name, v in verdicts.items()}}))
    else:
        mark = {"ok": "[green]✓[/green]", "incompatible": "[red]✗[/red]", "skipped": "[yellow]-[/yellow]"}
        for name, v in verdicts.items():
            facts = ", ".join(f"{k} {v.facts[k]}" for k in ("tensorrt", "gpu", "compute_capability") if v.facts.get(k))
            out.print(f"{mark[v.status]} {name} ({v.format}) on {device}: {v.status}"
                      + (f" [dim]({facts})[/dim]" if facts else ""), highlight=False)
            if v.skipped is not None:
                out.print(f"    skipped at build time: {v.skipped}", highlight=False, markup=False)
            for f in v.findings:
                out.print(f"    {f.level}: {f.message}", highlight=False, markup=False)
    if not ok:
        raise typer.Exit(5)


@app.command()
def validate(
    artifact: Path = typer.Argument(..., help="artifact directory"),
    target: Optional[str] = typer.Option(None, help="only this target"),
    device: str = typer.Option("cpu", help="cpu or cuda[:N]"),
    trusted_key: Optional[list[Path]] = typer.Option(None, "--trusted-key", help=TRUSTED_KEY_HELP),
    as_json: bool = typer.Option(False, "--json", help="print a JSON report"),
):
    """Re-check the signature (when keys are set), every checksum, and the build's goldens on this host.

    Each target first passes preflight (versions, GPU, extras, memory); one this host cannot run is reported
    as unavailable with the reason, and fails the command only when it was asked for with --target."""

    def go():
        from . import preflight
        from .artifact import Model, check_signature
        from .backends import backend_class
        from .errors import GoldenMismatch, MissingExtraError
        from .manifest import read_manifest, verify_files
        from .s3 import TransferBar  # rich bars with bytes and rate; drawn only on a terminal
        from .tokenizer import Tokenizer

        signed_by = check_signature(artifact, trusted_key)
        m = read_manifest(artifact)
        names = [target] if target else m.valid_targets()
        if target and target not in m.targets:
            raise ValueError(f"artifact {m.name!r} has no target {target!r}; it has: {', '.join(m.targets)}")
        verify_files(artifact, m.root_files)
        report, failed = {}, None
        for name in names:
            try:
                preflight.check(m, name, device).raise_for_errors()  # before any of the target's files is read
                files = m.targets[name].files
                with TransferBar(not as_json, f"sha256 {name}", sum(f.size for f in files)) as bar:
                    verify_files(artifact, files, on_bytes=bar.advance)
                model = _open_for_goldens(artifact, m, name, device, backend_class, Model, Tokenizer)
            except (MissingExtraError, preflight.IncompatibleHost) as e:
                report[name] = {"status": "unavailable", "reason": str(e)}
                if target:  # asked for by name: this host cannot vouch for it
                    failed = failed or e
                continue
            with model:
                try:
                    report[name] = {"status": "passed", **_golden_summary(m, name, model.check_goldens())}
                except GoldenMismatch as e:
                    report[name] = {"status": "failed", "reason": str(e)}
                    failed = failed or e
        if as_json:
            print(json.dumps({"ok": failed is None, "artifact": str(artifact), "checksums": "verified",
                              "signed_by": signed_by, "targets": report}))
        else:
            checked = [n for n, r in report.items() if r["status"] != "unavailable"]
            out.print(f"[green]✓[/green] checksums verified ({len(m.root_files)} root files, targets: "
                      f"{', '.join(checked) or 'none'})")
            for name, r in report.items():
                mark = {"passed": "[green]✓[/green]", "failed": "[red]✗[/red]"}.get(r["status"], "[yellow]-[/yellow]")
                detail = r.get("reason") or _describe_goldens(r)
                out.print(f"{mark} {name}: {r['status']} ({detail})", highlight=False)
        if failed:
            raise typer.Exit(failed.exit_code)

    _run(go, as_json)


def _golden_summary(m, name: str, results: list[dict]) -> dict:
    """What `validate` reports for a target whose goldens held; reduced precisions add their tolerance figures."""
    summary = {"goldens": len(results)}
    if results and "positions" in results[0]:
        from .cpu_kernels import quantized_kernel_path

        positions = sum(r["positions"] for r in results)
        summary.update(criterion="tolerance", positions=positions,
                       top1_agreement=sum(r["agree"] for r in results) / max(positions, 1),
                       min_top1_agreement=m.targets[name].validation.tolerance.top1_agreement,
                       exact_goldens=sum(r["match"] for r in results), kernel_path=quantized_kernel_path(),
                       build_kernel_path=m.targets[name].validation.kernel_path)
    return summary


def _describe_goldens(r: dict) -> str:
    if r.get("criterion") != "tolerance":
        return f"{r.get('goldens')} goldens"
    return (f"top-1 agreement {r['top1_agreement']:.4f} ≥ {r['min_top1_agreement']:g} over {r['positions']} "
            f"teacher-forced positions of {r['goldens']} goldens; {r['exact_goldens']} reproduce exactly; "
            f"kernel path {r['kernel_path']} (build: {r['build_kernel_path'] or 'not recorded'})")


def _open_for_goldens(root: Path, m, name: str, device: str, backend_class, Model, Tokenizer):
    """A loaded model with `check_goldens()`: the generation loop for decoders, the embedder for encoders."""
    if m.task != "text-generation":
        from .embedding import EmbeddingModel

        return EmbeddingModel.open(root, m, name, device=device)
    entry = m.targets[name]
    # the artifact's own files, not this host's packed copy of them: validate judges what was shipped
    backend = backend_class(entry.format)(root, entry, m.model, device=device, host_cache=False).load()
    return Model(root, m, name, backend, Tokenizer(root, listed=m.listed_root_files()))


@app.command()
def serve(
    artifacts: Optional[list[str]] = typer.Argument(
        None, help="artifact directories or s3:// URIs (default: artifacts/smollm2-135m if built)"),
    model: Optional[list[str]] = typer.Option(
        None, "--model", help="model to serve (repeatable): artifact directory, s3:// URI, HF checkpoint directory or "
        "hub id (compiled on demand, needs inferneo\\[build]), or model.onnx / model.pt / model.plan"),
    model_type: Optional[str] = typer.Option(None, "--model-type", help="onnx|torchscript|tensorrt: the target "
                                             "format to serve (artifacts), build (checkpoints) or read (model files)"),
    model_class: Optional[str] = typer.Option(None, "--model-class", help="module:Class, a subclass of "
                                              "inferneo_runtime.models.CustomModel"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="tokenizer directory for bare model files"),
    host: Optional[str] = typer.Option(None, help="address to bind (default 127.0.0.1)"),
    port: Optional[int] = typer.Option(None, help="port (default 8000)"),
    log_level: Optional[str] = typer.Option(None, "--log-level", help="critical|error|warning|info|debug"),
    lazy: Optional[bool] = typer.Option(None, "--lazy/--eager", "--lazy-loading/--eager-loading",
                                        help="load each model on its first request"),
    max_models: Optional[int] = typer.Option(None, "--max-models", min=1, help="most models loaded at once"),
    memory_budget_gb: Optional[float] = typer.Option(None, "--memory-budget-gb",
                                                     help="weights + KV caches of loaded models, in GB (1e9 bytes)"),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", help="most tokens per sequence: checkpoints "
                                                "are compiled for it, artifacts capped to it (not above their build)"),
    max_batch_size: Optional[int] = typer.Option(None, "--max-batch-size", help="most sequences per engine step"),
    speculative: Optional[str] = typer.Option(None, "--speculative", help="ngram: draft tokens from earlier text and "
                                              "verify them in one step (same output)"),
    speculative_tokens: Optional[int] = typer.Option(None, "--speculative-tokens", min=1, max=16,
                                                     help="most tokens drafted per step (default 4)"),
    prefix_cache_mb: Optional[float] = typer.Option(None, "--prefix-cache-mb", min=0, help="memory per model for "
                                                    "reused prompt prefixes' keys/values (default 0: off)"),
    prefill_chunk: Optional[int] = typer.Option(None, "--prefill-chunk", min=1, help="most prompt tokens prefilled "
                                                "per engine step (default: whole prompts)"),
    max_concurrent_requests: Optional[int] = typer.Option(None, "--max-concurrent-requests",
                                                          help="most requests in flight; more get 429"),
    gpu_memory_utilization: Optional[float] = typer.Option(None, "--gpu-memory-utilization", help="share of the CUDA "
                                                           "device's memory for weights + KV caches (none on CPU)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="auto|half|bfloat16|float32: pick the target of that "
                                        "precision (artifacts) or build it (checkpoints)"),
    quantization: Optional[str] = typer.Option(None, "--quantization", help="int8|int4: pick (or build) a quantized "
                                               "ONNX target"),
    adapter: Optional[list[str]] = typer.Option(None, "--adapter", help="LoRA adapter directory (repeatable): merged "
                                                "when a checkpoint is compiled; an artifact must carry it already"),
    adapter_type: Optional[str] = typer.Option(None, "--adapter-type", help="lora (the one kind supported)"),
    enable_metrics: Optional[bool] = typer.Option(None, "--enable-metrics/--disable-metrics",
                                                  help="Prometheus metrics on /metrics (default on)"),
    tensor_parallel_size: Optional[int] = typer.Option(None, "--tensor-parallel-size", min=1,
                                                       help="accepted; above 1 is refused (no backend shards)"),
    pipeline_parallel_size: Optional[int] = typer.Option(None, "--pipeline-parallel-size", min=1,
                                                         help="accepted; above 1 is refused (no backend shards)"),
    registry: Optional[str] = typer.Option(None, "--registry", help="JSON file the model registry is saved to and "
                                           "restored from"),
    trusted_key: Optional[list[str]] = typer.Option(None, "--trusted-key", help=TRUSTED_KEY_HELP),
    device: Optional[str] = typer.Option(None, help="cpu or cuda[:N] (default cpu)"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML settings file (flags and INFERNEO_* env win)"),
    threads: Optional[int] = typer.Option(None, min=1, help="intra-op threads per model (default: physical cores)"),
    max_queue: Optional[int] = typer.Option(None, "--max-queue", min=1,
                                            help="most sequences in flight; more get 429 (default 256)"),
    drain_timeout: Optional[float] = typer.Option(None, "--drain-timeout", min=0, help="on SIGTERM: /ready turns "
                                                  "503 and running requests get this many seconds to finish; then "
                                                  "they end with a 503 (default 30)"),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="require `Authorization: Bearer KEY` on the "
                                          "inference endpoints (or INFERNEO_API_KEY; /health and /metrics stay open)"),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name", help="the name the model is served "
                                                    "under in /v1/models and requests, instead of its own"),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help="Jinja chat template file used "
                                                "instead of the model's own"),
    tool_call_parser: Optional[str] = typer.Option(None, "--tool-call-parser", help="tool-call format: hermes, "
                                                   "llama3_json or mistral (default: detected from the chat "
                                                   "template)"),
    ray: bool = typer.Option(False, "--ray", help="run replicas on Ray Serve: a local cluster, or RAY_ADDRESS's "
                             "(needs inferneo\\[ray])"),
    replicas: Optional[str] = typer.Option(None, "--replicas", help="with --ray: replica count (2), or a range to "
                                           "autoscale in (1-4)"),
):
    """Serve models over an OpenAI-compatible HTTP API (needs inferneo\\[serve])."""

    def go():
        import importlib

        from .errors import MissingExtraError

        for module in ("fastapi", "uvicorn", "prometheus_client"):
            try:
                importlib.import_module(module)
            except ImportError:
                raise MissingExtraError("`inferneo serve`", "serve", module) from None
        from .server.lifecycle import run_server
        from .server.config import load_server_config

        settings = load_server_config(config, overrides=dict(
            artifacts=artifacts, models=model, model_type=model_type, model_class=model_class, tokenizer=tokenizer,
            host=host, port=port, log_level=log_level, lazy=lazy, max_models=max_models,
            memory_budget_gb=memory_budget_gb, max_model_len=max_model_len, max_batch_size=max_batch_size,
            speculative=speculative, speculative_tokens=speculative_tokens, prefix_cache_mb=prefix_cache_mb,
            prefill_chunk=prefill_chunk, max_concurrent_requests=max_concurrent_requests, gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype, quantization=quantization, adapters=adapter, adapter_type=adapter_type,
            enable_metrics=enable_metrics, tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size, registry_path=registry, trusted_keys=trusted_key,
            device=device, threads=threads, max_queue=max_queue, graceful_timeout_s=drain_timeout,
            api_key=api_key, served_model_name=served_model_name, chat_template=chat_template,
            tool_call_parser=tool_call_parser))
        if ray or replicas:  # many replicas on Ray Serve, same app (inferneo_runtime/integrations/ray_serve.py)
            from .integrations.ray_serve import serve_on_ray
            return serve_on_ray(settings, replicas)
        run_server(settings)

    _run(go, as_json=False)


@app.command()
def build(
    recipe: Path = typer.Argument(..., help="recipe YAML file, or a directory of them (each is built)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="artifact directory (default: the recipe's "
                                          "output); for a directory of recipes: the folder for <name>/ outputs"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON summary on stdout"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output"),
    force: bool = typer.Option(False, "--force", help="rebuild even when the output is up to date, and replace an "
                               "output that is not an artifact"),
    cache: Optional[str] = typer.Option(None, "--cache", envvar="INFERNEO_BUILD_CACHE",
                                        help="s3://bucket/prefix build cache shared between CI jobs"),
    sign: Optional[Path] = typer.Option(None, "--sign", help="Ed25519 private key: sign the manifest"),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="require `Authorization: Bearer KEY` on the "
                                          "inference endpoints (or INFERNEO_API_KEY; /health and /metrics stay open)"),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name", help="the name the model is served "
                                                    "under in /v1/models and requests, instead of its own"),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help="Jinja chat template file used "
                                                "instead of the model's own"),
    ray: bool = typer.Option(False, "--ray", help="one Ray task per recipe and per target, on a local cluster or "
                             "RAY_ADDRESS's (needs inferneo\\[ray])"),
):
    r"""Build a recipe into a validated artifact (needs inferneo\[build])."""

    def go():
        try:
            from inferneo_build.cli import run_build
        except ImportError as e:
            from .errors import MissingExtraError

            raise MissingExtraError("`inferneo build`", "build", getattr(e, "name", None) or "inferneo_build") from None
        if recipe.is_dir() or ray:  # many recipes and/or Ray tasks: inferneo_build/fanout.py
            return _print_fanout(recipe, output, as_json=as_json, quiet=quiet, force=force, cache=cache, sign=sign,
                                 ray=ray)
        summary = run_build(recipe, output, quiet=quiet or as_json, force=force, cache=cache, sign_key=sign)
        if as_json:
            print(json.dumps(summary))
        else:
            verb = "up to date" if summary["cached"] == "output" else ("from cache" if summary["cached"] else "built")
            out.print(f"[green]{verb}[/green] {summary['output']} in {summary['seconds']:.1f}s: "
                      + ", ".join(f"{t} {s['status']}" for t, s in summary["targets"].items()))

    _run(go, as_json)


def _print_fanout(path: Path, output: Optional[Path], *, as_json: bool, quiet: bool, force: bool,
                  cache: Optional[str], sign: Optional[Path], ray: bool) -> None:
    from inferneo_build.fanout import run_fanout

    summary = run_fanout(path, output, quiet=quiet or as_json, force=force, cache=cache, sign_key=sign, use_ray=ray)
    if as_json:
        print(json.dumps(summary))
    else:
        for r in summary["recipes"]:
            if not r["ok"]:
                err.print(f"[red]failed[/red] {r['recipe']}: {escape(r['message'])}", highlight=False)
                continue
            verb = "up to date" if r["cached"] == "output" else ("from cache" if r["cached"] else "built")
            out.print(f"[green]{verb}[/green] {r['output']} in {r['seconds']:.1f}s: "
                      + ", ".join(f"{t} {s['status']}" for t, s in r["targets"].items()), highlight=False)
        out.print(f"{len(summary['recipes'])} recipe(s): {summary['built']} built, {summary['cached']} cached, "
                  f"{summary['failed']} failed in {summary['seconds']:.1f}s" + (" (Ray)" if ray else ""))
    if not summary["ok"]:
        raise typer.Exit(summary["exit_code"])


@app.command()
def push(
    artifact: Path = typer.Argument(..., help="artifact directory"),
    uri: str = typer.Argument(..., help="s3://bucket/prefix"),
    jobs: int = typer.Option(8, "--jobs", "-j", min=1, help="parallel uploads"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON summary on stdout"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    sign: Optional[Path] = typer.Option(None, "--sign", help="Ed25519 private key: sign the manifest before pushing"),
):
    """Publish an artifact to S3: files, then the manifest, then LATEST (needs inferneo\\[build,s3])."""

    def go():
        try:
            from inferneo_build.push import push as run_push
        except ImportError as e:
            from .errors import MissingExtraError

            raise MissingExtraError("`inferneo push`", "build", getattr(e, "name", None) or "inferneo_build") from None
        if sign:
            from .signing import sign_artifact

            sign_artifact(artifact, sign)
        summary = run_push(artifact, uri, jobs=jobs, progress=not (quiet or as_json))
        if summary["not_pushed"] and not as_json:
            err.print(f"[yellow]warning:[/yellow] not in the manifest, so not pushed: {', '.join(summary['not_pushed'])}",
                      highlight=False)
        if as_json:
            print(json.dumps(summary))
        elif summary["uploaded"] == 0 and not summary["latest_updated"]:
            out.print(f"nothing to upload: {summary['uri']} already publishes {summary['name']} version "
                      f"{summary['version'][:12]} ({summary['files']} files verified)", highlight=False)
        else:
            out.print(f"[green]published[/green] {summary['name']} version {summary['version'][:12]} at {summary['uri']}: "
                      f"uploaded {summary['uploaded']} of {summary['files']} files "
                      f"({summary['bytes_uploaded'] / 1e6:.1f} MB) in {summary['seconds']:.1f}s", highlight=False)

    _run(go, as_json)


@app.command()
def pull(
    uri: str = typer.Argument(..., help="s3://bucket/prefix (LATEST) or s3://bucket/prefix/versions/<sha256>"),
    dest: Path = typer.Argument(..., help="directory to write the artifact to"),
    force: bool = typer.Option(False, "--force", help="replace DEST if it holds something else"),
    jobs: int = typer.Option(8, "--jobs", "-j", min=1, help="parallel downloads"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON summary on stdout"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
):
    """Download an artifact from S3 into the verified cache and copy it to DEST (needs inferneo\\[s3])."""

    def go():
        from .s3 import pull as run_pull

        summary = run_pull(uri, dest, force=force, progress=not (quiet or as_json), jobs=jobs)
        if as_json:
            print(json.dumps(summary))
        else:
            how = "already up to date" if summary["up_to_date"] else "verified and written"
            src = "downloaded" if summary["downloaded"] else "from cache"
            out.print(f"[green]{how}[/green] {summary['dest']}: {summary['name']} version {summary['version'][:12]} "
                      f"({summary['files']} files, {summary['bytes'] / 1e6:.1f} MB, {src})", highlight=False)

    _run(go, as_json)


@app.command()
def bench(
    artifact: Optional[Path] = typer.Argument(None, help="artifact directory (or --url: a running server)"),
    target: Optional[list[str]] = typer.Option(None, help="only this target (repeatable; default: all valid)"),
    compare: Optional[str] = typer.Option(None, help="peers on the same checkpoint: transformers,optimum,genai,genai-int4"),
    checkpoint: Optional[Path] = typer.Option(None, help="HF checkpoint for the peers (default: the manifest's source)"),
    runs: int = typer.Option(5, min=1, help="timed runs per measurement (medians, with min and max)"),
    threads: Optional[int] = typer.Option(None, min=1, help="intra-op threads (default: physical cores)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    url: Optional[str] = typer.Option(None, "--url", help="benchmark a running server instead: latency, "
                                      "TTFT, tokens/s of single, batched and concurrent requests"),
    requests: int = typer.Option(20, "--requests", min=1, help="with --url: requests per run"),
    concurrency: int = typer.Option(4, "--concurrency", min=1, help="with --url: clients at once / prompts per batch"),
    model: Optional[str] = typer.Option(None, "--model", help="with --url: model to ask for (default: routed)"),
    workloads: bool = typer.Option(False, "--workloads", help="instead: copy-heavy and chat tokens/s with n-gram "
                                   "speculation, TTFT with a cached 1,000-token prefix, inter-token latency while a "
                                   "long prompt arrives (one target: --target, default onnx)"),
    prefill_chunk: int = typer.Option(128, "--prefill-chunk", min=1, help="with --workloads: the chunk size"),
    speculative_tokens: int = typer.Option(4, "--speculative-tokens", min=1, max=16,
                                           help="with --workloads: most tokens drafted per step"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="also write charts (SVG and PNG) into this directory: "
                                        "decode step ms by position, tokens/s by concurrency, share of the roofline "
                                        "(needs inferneo\\[plot])"),
):
    """Measure load time, TTFT, decode tokens/s, long-position cost, batching and peak RSS per target."""
    if plot is not None and (workloads or url is not None):
        raise typer.BadParameter("--plot charts the artifact bench; it does not go with --workloads or --url")
    if workloads:
        if artifact is None:
            raise typer.BadParameter("--workloads needs an ARTIFACT directory")

        def go_workloads():
            from .bench_workloads import print_workloads, run_workloads
            from .speculative import SpeculativeConfig

            log = (lambda _: None) if as_json else (lambda m: err.print(f"[dim]{m}[/dim]", highlight=False))
            report = run_workloads(artifact, target=target[0] if target else None, runs=runs, threads=threads,
                                   prefill_chunk=prefill_chunk, spec=SpeculativeConfig(num_tokens=speculative_tokens),
                                   log=log)
            if as_json:
                print(json.dumps({"ok": True, **report}))
            else:
                print_workloads(report, out)

        return _run(go_workloads, as_json)
    if url is not None:
        from .bench_server import cli_bench_url

        return _run(lambda: cli_bench_url(url, requests, concurrency, model, as_json, out), as_json)
    if artifact is None:
        raise typer.BadParameter("give an ARTIFACT directory, or --url of a running server")

    def go():
        from .bench import BenchSettings, print_report, run_bench

        peers = tuple(p.strip() for p in compare.split(",") if p.strip()) if compare else ()
        if plot is not None:  # before minutes of benchmarking, not after
            from .charts import require

            require("`inferneo bench --plot`")
        log = (lambda _: None) if as_json else (lambda m: err.print(f"[dim]{m}[/dim]", highlight=False))
        report = run_bench(artifact, targets=target, compare=peers, checkpoint=checkpoint,
                           settings=BenchSettings(runs=runs, threads=threads), log=log)
        if plot is not None:
            from .charts import write_bench_charts

            report["charts"] = [str(p) for p in write_bench_charts(report, plot)]
            log(f"charts: {', '.join(report['charts'])}")
        if as_json:
            print(json.dumps({"ok": True, **report}))
        else:
            print_report(report, out)

    _run(go, as_json)


# -- deploy bundles (inferneo_build/deploy.py) -------------------------------------------------------------
deploy_app = typer.Typer(no_args_is_help=True, help="Write an artifact as another serving engine's bundle: a "
                         "Triton model repository, an LMI serving.properties, a KServe InferenceService.")
app.add_typer(deploy_app, name="deploy")


def _deploy(fn, as_json: bool, **kwargs) -> None:
    def go():
        try:
            from inferneo_build import deploy
        except ImportError as e:
            from .errors import MissingExtraError

            missing = getattr(e, "name", None) or "inferneo_build"
            raise MissingExtraError("`inferneo deploy`", "build", missing) from None
        summary = getattr(deploy, fn)(**kwargs)
        if as_json:
            print(json.dumps({k: v for k, v in summary.items() if k != "yaml" or kwargs.get("out") is None}))
        elif fn == "write_kserve" and kwargs.get("out") is None:
            sys.stdout.write(summary["yaml"])
        else:
            where = summary.get("repository") or summary.get("output")
            out.print(f"[green]wrote[/green] {summary['engine']} bundle for {summary['model']} "
                      f"({summary.get('target') or summary.get('storage_uri')}) at {where}", highlight=False)

    _run(go, as_json)


@deploy_app.command("triton")
def deploy_triton(
    artifact: str = typer.Argument(..., help="artifact directory (copied in) or s3:// URI (referenced, pinned)"),
    out_dir: Path = typer.Argument(..., help="model repository directory (other models in it are kept)"),
    target: Optional[str] = typer.Option(None, help="target to serve (default: the preferred valid one)"),
    instances: int = typer.Option(1, "--instances", min=1, help="model instances (instance_group count)"),
    device: Optional[str] = typer.Option(None, help="cuda: KIND_GPU instances (tensorrt targets always are)"),
    threads: Optional[int] = typer.Option(None, min=1, help="intra-op threads per instance"),
    default_max_tokens: Optional[int] = typer.Option(None, "--default-max-tokens", min=1),
    force: bool = typer.Option(False, "--force", help="replace this model's folder if it exists"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON summary"),
):
    """Triton model repository: config.pbtxt (python backend, decoupled streaming) + 1/model.py."""
    _deploy("write_triton", as_json, artifact=artifact, out=out_dir, target=target, instances=instances,
            device=device, threads=threads, default_max_tokens=default_max_tokens, force=force)


@deploy_app.command("lmi")
def deploy_lmi(
    artifact: str = typer.Argument(..., help="s3:// URI (serving.properties points at its version prefix) or a "
                                   "directory (copied into OUT)"),
    out_dir: Path = typer.Argument(..., help="directory for serving.properties, model.py, requirements.txt"),
    target: Optional[str] = typer.Option(None, help="target to serve (default: the preferred valid one)"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda[:N]"),
    threads: Optional[int] = typer.Option(None, min=1, help="intra-op threads"),
    force: bool = typer.Option(False, "--force", help="replace OUT if it is not empty"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON summary"),
):
    """SageMaker / DJL LMI: serving.properties for the artifact's S3 prefix, with a python handler."""
    _deploy("write_lmi", as_json, artifact=artifact, out=out_dir, target=target, device=device, threads=threads,
            force=force)


@deploy_app.command("kserve")
def deploy_kserve(
    artifact: str = typer.Argument(..., help="s3:// URI of a pushed artifact (pinned to its current version)"),
    out_file: Optional[Path] = typer.Argument(None, help="YAML file or directory (default: print it)"),
    image: str = typer.Option(..., "--image", help="container image with inferneo[kserve] installed"),
    server: str = typer.Option("kserve", "--server", help="kserve (KServe v1/v2 protocols) or openai "
                               "(inferneo serve's OpenAI-compatible API)"),
    target: Optional[str] = typer.Option(None, help="target to serve (default: the preferred valid one)"),
    name: Optional[str] = typer.Option(None, help="InferenceService name (default: from the model name)"),
    namespace: Optional[str] = typer.Option(None, help="Kubernetes namespace"),
    service_account: Optional[str] = typer.Option(None, "--service-account", help="service account with the "
                                                  "S3 credentials"),
    min_replicas: int = typer.Option(1, "--min-replicas", min=0),
    max_replicas: Optional[int] = typer.Option(None, "--max-replicas", min=1),
    cpu: str = typer.Option("1", help="CPU request and limit"),
    memory: str = typer.Option("2Gi", help="memory request and limit"),
    gpus: int = typer.Option(0, "--gpus", min=0, help="nvidia.com/gpu per replica (tensorrt targets: at least 1)"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON summary"),
):
    """KServe InferenceService whose predictor serves the S3 artifact (downloaded to /mnt/models)."""
    _deploy("write_kserve", as_json, artifact=artifact, out=out_file, image=image, server=server, target=target,
            name=name, namespace=namespace, service_account=service_account, min_replicas=min_replicas,
            max_replicas=max_replicas, cpu=cpu, memory=memory, gpus=gpus)


def _print_version(as_json: bool) -> None:
    from . import toolchain

    info = toolchain.report()
    if as_json:
        print(json.dumps(info))
        return
    ort = info["onnxruntime"]
    if ort["distribution"] is None:
        ort_line = "not installed (pip install 'inferneo[cpu]', or 'inferneo[gpu]' on an NVIDIA host)"
    else:
        found = ", ".join(ort.get("providers", [])) or f"none: {ort.get('error', 'unknown')}"
        ort_line = f"{ort['version']} ({ort['distribution']}; providers: {found})"
    out.print(f"inferneo {info['inferneo']} (Python {info['python']})", highlight=False)
    for name, value in (("torch", info["torch"]), ("transformers", info["transformers"]), ("onnxruntime", ort_line),
                        ("tensorrt", info["tensorrt"]), ("onnxruntime-genai", info["onnxruntime_genai"])):
        out.print(f"  {name:<18} {value or 'not installed'}", highlight=False, soft_wrap=True)


@app.callback(invoke_without_command=True, epilog=EXIT_CODES)
def _main(ctx: typer.Context,
          version: bool = typer.Option(False, "--version", help="print Inferneo's version and the toolchain it sees"),
          as_json: bool = typer.Option(False, "--json", help="with --version: print a JSON object")):
    if version:
        _print_version(as_json)
        raise typer.Exit(0)
    if as_json:  # a --json meant for a command, written before it
        err.print("[red]error:[/red] --json before a command applies only to --version; write it after the command")
        raise typer.Exit(2)
    if ctx.invoked_subcommand is None:
        out.print(ctx.get_help())


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
