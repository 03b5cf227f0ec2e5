"""How the CLI shows what the API returns: rich tables and one-line summaries for people (`--json` prints the
objects themselves). Nothing here decides anything; it only draws. Text that comes from elsewhere (names, paths,
reasons such as "pip install 'inferneo[torchscript]'") is escaped, or rich would read its brackets as markup."""
from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

MARKS = {"ok": "[green]✓[/green]", "passed": "[green]✓[/green]", "incompatible": "[red]✗[/red]",
         "failed": "[red]✗[/red]", "skipped": "[yellow]-[/yellow]", "unavailable": "[yellow]-[/yellow]"}


def show_manifest(m, out: Console) -> None:
    """`inspect`: the model, its adapters or encoder head, one row per target, and the tolerance figures."""
    experts = f" · {m.model.experts} experts, {m.model.experts_per_token} per token" if m.model.experts else ""
    out.print(f"[bold]{escape(m.name)}[/bold]  {m.task} · {m.architecture} · {m.model.num_layers} layers · hidden "
              f"{m.model.hidden}{experts} · vocab {m.model.vocab} · source {m.source.kind}:{escape(str(m.source.uri))}",
              highlight=False)
    for a in m.source.adapters:
        out.print(f"  LoRA adapter {escape(str(a.path))} (sha256 {a.sha256[:12]}…, r={a.rank}, alpha={a.alpha:g}, "
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
        out.print(_tolerance_table(judged, encoder=m.encoder is not None))
    mixed = {n: t.validation.mixed_step_max_abs_error for n, t in m.targets.items()
             if t.validation.mixed_step_max_abs_error is not None}
    if mixed:  # chunked prefill in the decode step's forward (onnx's mixed-step graph)
        out.print("mixed decode + prefill step, max-abs difference from its two forwards: "
                  + ", ".join(f"{n} {e:.2g}" for n, e in mixed.items()), highlight=False)
    goldens = len(m.goldens) + (len(m.encoder.goldens) if m.encoder is not None else 0)  # an encoder's are its own
    out.print(f"built {m.built_at} · schema {m.schema_version} · goldens {goldens} · "
              f"torch {m.toolchain.get('torch')} · onnxruntime {m.toolchain.get('onnxruntime')}")


def _metric(value, limit, fmt: str, sign: str) -> str:
    if value is None:
        return "-"
    return fmt.format(value) + ("" if limit is None else f" {sign}{fmt.format(limit)}")


def _tolerance_table(judged: dict, encoder: bool) -> Table:
    if encoder:
        table = Table("target", "texts", "min cosine", "max-abs err", title="agreement with the PyTorch reference")
        for name, t in judged.items():
            v, tol = t.validation, t.validation.tolerance
            table.add_row(name, str(v.prompts), _metric(v.min_cosine, tol and tol.cosine, "{:.6f}", "≥"),
                          "-" if v.max_abs_logits_error is None else f"{v.max_abs_logits_error:.2e}")
    else:
        table = Table("target", "positions", "top-1 agreement", "mean KL", "ppl (ref)", "Δ ppl",
                      title="teacher-forced vs the float32 reference: value, threshold")
        for name, t in judged.items():
            v, tol = t.validation, t.validation.tolerance
            ppl = "-" if v.perplexity is None else f"{v.perplexity:.2f} ({v.reference_perplexity:.2f})"
            table.add_row(name, str(v.positions or "-"),
                          _metric(v.top1_agreement, tol and tol.top1_agreement, "{:.3f}", "≥"),
                          _metric(v.mean_kl, tol and tol.mean_kl, "{:.4f}", "≤"), ppl,
                          _metric(v.perplexity_delta, tol and tol.perplexity_delta, "{:+.1%}", "≤"))
    table.columns[0].no_wrap = True
    return table


def show_preflight(verdicts: dict, device: str, out: Console) -> None:
    """`inspect --check`: one line per target, with its findings."""
    if not verdicts:
        out.print(f"[red]✗[/red] no targets in this artifact: nothing to run on {escape(device)}", highlight=False)
    for name, v in verdicts.items():
        facts = ", ".join(f"{k} {v.facts[k]}" for k in ("tensorrt", "gpu", "compute_capability") if v.facts.get(k))
        out.print(f"{MARKS[v.status]} {escape(name)} ({v.format}) on {escape(device)}: {v.status}"
                  + (f" [dim]({facts})[/dim]" if facts else ""), highlight=False)
        if v.skipped is not None:
            out.print(f"    skipped at build time: {v.skipped}", highlight=False, markup=False)
        for f in v.findings:
            out.print(f"    {f.level}: {f.message}", highlight=False, markup=False)


def show_validation(report, out: Console) -> None:
    """`validate`: the checksums, then one line per target."""
    from .validate import describe_result

    checked = [n for n, r in report.targets.items() if r["status"] != "unavailable"]
    out.print(f"[green]✓[/green] checksums verified ({report.root_files} root files, targets: "
              f"{escape(', '.join(checked) or 'none')})")
    for name, r in report.targets.items():
        out.print(f"{MARKS[r['status']]} {escape(name)}: {r['status']} ({escape(describe_result(r))})", highlight=False)


def show_built(summary: dict, out: Console) -> None:
    """`build`: one line per recipe built, from cache, or already up to date."""
    verb = "up to date" if summary["cached"] == "output" else ("from cache" if summary["cached"] else "built")
    out.print(f"[green]{verb}[/green] {escape(str(summary['output']))} in {summary['seconds']:.1f}s: "
              + escape(", ".join(f"{t} {s['status']}" for t, s in summary["targets"].items())), highlight=False)


def show_versions(info: dict, out: Console) -> None:
    """`--version`: Inferneo's version and the toolchain it sees."""
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
