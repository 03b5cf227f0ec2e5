"""The `inferneo` command. Thin: parse, call the Python API, print, map errors to exit codes.

Runtime commands live here; `build`, `push`, `pull` and `deploy` in cli_build.py (importing `inferneo_build` only
when they run); `serve`'s flags come from its settings model (cli_serve.py); drawing is cli_views.py's.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from . import cli_build  # noqa: F401 - registers build, push, pull and deploy on the app
from .cli_base import EXIT_CODES, TRUSTED_KEY_HELP, app, err, log_to_stderr, needs_extra, out, run_command
from .cli_serve import serve
from .cli_views import show_manifest, show_preflight, show_validation, show_versions

app.command()(serve)


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
    speculative: Optional[str] = typer.Option(None, "--speculative", help="ngram: draft tokens from earlier text; "
                                              "draft: with --speculative-model; either way verified in one step "
                                              "(same output, fewer passes)"),
    speculative_tokens: int = typer.Option(4, "--speculative-tokens", min=1, max=16,
                                           help="with --speculative: most tokens drafted per step"),
    speculative_model: Optional[str] = typer.Option(None, "--speculative-model", help="the draft model (implies "
                                                    "--speculative draft): a target of this artifact, e.g. onnx-int4, "
                                                    "or another artifact with the same tokenizer"),
    device: str = typer.Option("cpu", help="cpu or cuda[:N]"),
    threads: Optional[int] = typer.Option(None, help="intra-op threads (default: physical cores)"),
    trusted_key: Optional[list[Path]] = typer.Option(None, "--trusted-key", help=TRUSTED_KEY_HELP),
    as_json: bool = typer.Option(False, "--json", help="print a JSON object"),
):
    """Generate a completion from an artifact."""

    def go():
        from . import load

        from .speculative import SpeculativeConfig

        method = speculative or ("draft" if speculative_model else None)
        spec = SpeculativeConfig(method, speculative_tokens, draft=speculative_model) if method else None  # checked early
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
                sys.stdout.write(c.text + "\n")  # the text as generated: no console wrapping, markup or emoji codes
                sys.stdout.flush()
                err.print(f"[dim]{model.name}/{model.target}: {len(c.token_ids)} tokens in {t_gen:.2f}s, "
                          f"finish_reason={c.finish_reason}, {load_note}[/dim]")

    run_command(go, as_json)


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

    run_command(go, as_json)


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

            if html.is_dir() or not html.parent.is_dir():
                raise typer.BadParameter(f"--html {html}: " + ("is a directory; name the file to write" if html.is_dir()
                                                               else f"no directory {html.parent} to write it in"))

            path = write_html_report(artifact, m, html)
            if as_json:
                print(json.dumps({"ok": True, "artifact": str(artifact), "html": str(path)}))
            else:
                out.print(f"[green]wrote[/green] {escape(str(path))} ({m.name}: {len(m.targets)} targets)",
                          highlight=False)
        elif check:
            _check_host(m, device, as_json)
        elif as_json:
            print(m.to_json(), end="")
        else:
            show_manifest(m, out)

    run_command(go, as_json)


def _check_host(m, device: str, as_json: bool) -> None:
    from .preflight import check_all

    verdicts = check_all(m, device)
    usable = [v for v in verdicts.values() if v.skipped is None]
    ok = bool(usable) and all(v.ok for v in usable)
    if as_json:
        print(json.dumps({"ok": ok, "artifact": m.name, "device": device,
                          "targets": {name: v.to_dict() for name, v in verdicts.items()}}))
    else:
        show_preflight(verdicts, device, out)
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
        from .validate import validate_artifact

        report = validate_artifact(artifact, target, device, trusted_key, show_progress=not as_json)
        if as_json:
            print(json.dumps(report.to_dict()))
        else:
            show_validation(report, out)
        if report.failure is not None:
            raise typer.Exit(report.failure.exit_code)

    run_command(go, as_json)


@app.command()
def bench(
    artifact: Optional[Path] = typer.Argument(None, help="artifact directory (or --url: a running server)"),
    target: Optional[list[str]] = typer.Option(None, help="only this target (repeatable; default: all valid)"),
    compare: Optional[str] = typer.Option(None, help="peers on the same checkpoint: transformers,optimum,genai,genai-int4"),
    checkpoint: Optional[Path] = typer.Option(None, help="HF checkpoint for the peers (default: the manifest's source)"),
    runs: int = typer.Option(5, min=1, help="timed runs per measurement (medians, with min and max)"),
    threads: Optional[int] = typer.Option(None, min=1, help="intra-op threads (default: physical cores)"),
    device: str = typer.Option("cpu", help="cpu or cuda[:N]: where the targets run (torch targets on a GPU; "
                               "peers stay on the CPU and are skipped)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    url: Optional[str] = typer.Option(None, "--url", help="benchmark a running server instead: latency, "
                                      "TTFT, tokens/s of single, batched and concurrent requests"),
    requests: int = typer.Option(20, "--requests", min=1, help="with --url: requests per run"),
    concurrency: int = typer.Option(4, "--concurrency", min=1, help="with --url: clients at once / prompts per batch"),
    model: Optional[str] = typer.Option(None, "--model", help="with --url: model to ask for (default: routed)"),
    workloads: bool = typer.Option(False, "--workloads", help="instead: copy-heavy and chat tokens/s with n-gram "
                                   "speculation, chat with a draft model, TTFT with a cached 1,000-token prefix, inter-token latency while a "
                                   "long prompt arrives (one target: --target, default onnx)"),
    prefill_chunk: int = typer.Option(16, "--prefill-chunk", min=1, help="with --workloads: the chunk size "
                                      "(smaller: the running streams wait less, the long prompt more)"),
    speculative_tokens: int = typer.Option(4, "--speculative-tokens", min=1, max=16,
                                           help="with --workloads: most tokens drafted per step"),
    speculative_model: Optional[str] = typer.Option(None, "--speculative-model", help="with --workloads: the draft "
                                                    "model of the draft-speculation row (default: the artifact's int4 "
                                                    "or int8 target when the measured one is fp32)"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="also write charts (SVG and PNG) into this directory: "
                                        "decode step ms by position, tokens/s by concurrency, share of the roofline; "
                                        "with --workloads: tokens/s with and without speculation, cached vs "
                                        "uncached TTFT, inter-token latency while a long prompt arrives "
                                        "(needs inferneo\\[plot])"),
):
    """Measure load time, TTFT, decode tokens/s, long-position cost, batching and peak RSS per target."""
    if plot is not None and url is not None:
        raise typer.BadParameter("--plot charts an artifact's bench; it does not go with --url")
    if device != "cpu" and (url is not None or workloads):
        raise typer.BadParameter("--device goes with an artifact's bench (not --url or --workloads)")
    if workloads:
        if artifact is None:
            raise typer.BadParameter("--workloads needs an ARTIFACT directory")
        if target and len(set(target)) > 1:
            raise typer.BadParameter(f"--workloads measures one target; --target names {', '.join(target)}")

        def go_workloads():
            from .bench_workloads import print_workloads, run_workloads
            from .speculative import SpeculativeConfig

            _require_plot(plot)
            log = log_to_stderr(as_json)
            report = run_workloads(artifact, target=target[0] if target else None, runs=runs, threads=threads,
                                   prefill_chunk=prefill_chunk, spec=SpeculativeConfig(num_tokens=speculative_tokens),
                                   draft=speculative_model, log=log)
            if plot is not None:
                from .charts import write_workload_charts

                report["charts"] = [str(p) for p in write_workload_charts(report, plot)]
                log(f"charts: {', '.join(report['charts'])}")
            if as_json:
                print(json.dumps({"ok": True, **report}))
            else:
                print_workloads(report, out)

        return run_command(go_workloads, as_json)
    if url is not None:
        from .bench_server import cli_bench_url

        return run_command(lambda: cli_bench_url(url, requests, concurrency, model, as_json, out), as_json)
    if artifact is None:
        raise typer.BadParameter("give an ARTIFACT directory, or --url of a running server")

    def go():
        from .bench import BenchSettings, run_bench
        from .bench_report import print_report

        peers = tuple(p.strip() for p in compare.split(",") if p.strip()) if compare else ()
        _require_plot(plot)
        log = log_to_stderr(as_json)
        report = run_bench(artifact, targets=target, compare=peers, checkpoint=checkpoint,
                           settings=BenchSettings(runs=runs, threads=threads, device=device), log=log,
                           spawn_peers=_peer_spawner() if peers else None)
        if plot is not None:
            from .charts import write_bench_charts

            report["charts"] = [str(p) for p in write_bench_charts(report, plot)]
            log(f"charts: {', '.join(report['charts'])}")
        if as_json:
            print(json.dumps({"ok": True, **report}))
        else:
            print_report(report, out)

    run_command(go, as_json)


def _require_plot(plot: Optional[Path]) -> None:
    """With --plot, fail on a missing matplotlib, or a directory that cannot be made (a file is there), before
    minutes of benchmarking, not after."""
    if plot is not None:
        from .charts import require

        require("`inferneo bench --plot`")
        try:
            plot.mkdir(parents=True, exist_ok=True)  # where the charts go, made now rather than after the runs
        except OSError as e:
            raise typer.BadParameter(f"--plot {plot}: cannot write charts into it ({e.strerror or e})") from None


def _peer_spawner():
    """The builder's peer runner for `bench --compare`; without inferneo[build], one that reports each peer skipped."""
    try:
        with needs_extra("bench --compare"):
            from inferneo_build.bench_peers import spawn_peers
        return spawn_peers
    except Exception as e:  # noqa: BLE001 - the missing extra, said per peer instead of failing the bench
        reason = str(e)
        return lambda compare, *_: {p: {"skipped": reason} for p in compare}



@app.callback(invoke_without_command=True, epilog=EXIT_CODES)
def _main(ctx: typer.Context,
          version: bool = typer.Option(False, "--version", help="print Inferneo's version and the toolchain it sees"),
          as_json: bool = typer.Option(False, "--json", help="with --version: print a JSON object")):
    if version:
        from . import toolchain

        info = toolchain.report()
        print(json.dumps(info)) if as_json else show_versions(info, out)
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
