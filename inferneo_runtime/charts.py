"""Charts of what Inferneo measures (needs the `plot` extra: matplotlib): the build's validation against the
reference (`validation.svg` in every artifact built where matplotlib is installed) and `inferneo bench --plot`
(with or without `--workloads`).

Matplotlib is imported only inside the functions here, so the runtime imports without it. Every plotted series
carries an SVG group id (`<kind>--<name>`, see `series_id`) so tests and tools can find the data in the file.
Figures are drawn on `matplotlib.figure.Figure` directly (no pyplot, no global backend state), with text kept
as text and fixed ids, so the same numbers give the same SVG bytes.
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Optional

from .errors import MissingExtraError

VALIDATION_CHART_NAME = "validation.svg"
PLOT_INSTALL = "pip install 'inferneo[plot]'"
ERROR_FLOOR = 1e-10  # a logits error of exactly 0 is drawn here (log scale)
PASS, FAIL, LIMIT = "#2b8a3e", "#c92a2a", "#495057"


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def require(what: str) -> None:
    """Raise MissingExtraError (exit 5, naming `pip install 'inferneo[plot]'`) when matplotlib is absent."""
    if not available():
        raise MissingExtraError(what, "plot", "matplotlib")


def series_id(kind: str, name: str = "") -> str:
    """The SVG group id of one plotted series: `kind--name`, other characters than [A-Za-z0-9_.-] as `_`."""
    return kind + ("--" + re.sub(r"[^A-Za-z0-9_.-]", "_", name) if name else "")


@contextmanager
def _style():
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "inferneo", "path.simplify": False,
                                "font.size": 9, "axes.titlesize": 10, "axes.titleweight": "bold",
                                "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
                                "grid.alpha": 0.3, "legend.fontsize": 8, "legend.frameon": False}):
        yield


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path: Path) -> Path:
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    metadata = {"Date": None} if fmt == "svg" else ({"Software": None} if fmt == "png" else None)
    fig.savefig(path, format=fmt, metadata=metadata, dpi=150)
    return path


# -- validation (inferneo build) -------------------------------------------------------------------------------
def _step_series(target: dict) -> list[float]:
    """Per generated token k: the largest logits error over the prompts whose greedy inputs still agreed at k."""
    worst: list[Optional[float]] = []
    for p in target.get("prompts", []):
        for k, e in enumerate(p.get("step_logits_errors") or []):
            if k >= len(worst):
                worst.append(None)
            if e is not None:
                worst[k] = e if worst[k] is None else max(worst[k], e)
    return [math.nan if e is None else max(e, ERROR_FLOOR) for e in worst]


def validation_figure(report: dict, name: str = ""):
    """The figure of a validation.json report: per target, the logits error of each generated token against
    logits_atol (float32 targets are held to it); top-1 agreement and mean KL against their thresholds for
    reduced-precision targets; cosine similarity per text for encoders."""
    targets = report.get("targets", [])
    decoders = [t for t in targets if t.get("target_kind") != "encoder" and any(
        p.get("step_logits_errors") for p in t.get("prompts", []))]
    judged = [t for t in targets if t.get("criterion") == "tolerance" and t.get("target_kind") != "encoder"]
    encoders = [t for t in targets if t.get("target_kind") == "encoder"]
    bars = 0.9 + 0.4 * len(judged)
    heights = [3.8] * bool(decoders) + [bars, bars] * bool(judged) + [3.6] * bool(encoders)
    if not heights:
        return None
    fig = _figure(8, 0.4 + sum(heights))
    axes = iter(fig.subplots(len(heights), 1, squeeze=False, height_ratios=heights)[:, 0])
    fig.suptitle(f"{name + ': ' if name else ''}validation against the PyTorch float32 reference", fontweight="bold")

    if decoders:
        ax = next(axes)
        for i, t in enumerate(decoders):
            ys = _step_series(t)
            exact = t.get("criterion", "exact") == "exact"
            label = t["target"] + ("" if exact else f" ({t.get('precision')}: judged by top-1 and KL, below)")
            (line,) = ax.plot(range(len(ys)), ys, marker="o", markersize=2.5, linewidth=1.2,
                              linestyle="-" if exact else "--", label=label, color=f"C{i}")
            line.set_gid(series_id("logits-error", t["target"]))
        atols = sorted({t["logits_atol"] for t in decoders if t.get("criterion", "exact") == "exact"})
        for atol in atols:
            ax.axhline(atol, color=FAIL, linestyle=":", linewidth=1.2, label=f"logits_atol {atol:g} (float32 limit)",
                       gid=series_id("logits-atol", f"{atol:g}"))
        ax.set_yscale("log")
        ax.set_title("max |logit − reference| per generated token (worst over the prompts)")
        ax.set_xlabel("generated token (0: chosen from the prompt's prefill; stops where greedy tokens diverge)")
        ax.set_ylabel("max abs logits error (log)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)

    if judged:
        names = [t["target"] for t in judged]
        for kind, key, limit_key, better, fmt in (
                ("top1", "top1_agreement", "top1_agreement", "min", "{:.4f}"),
                ("kl", "mean_kl", "mean_kl", "max", "{:.4g}")):
            ax = next(axes)
            values = [t.get(key) or 0.0 for t in judged]
            colors = [PASS if t.get("passed") else FAIL for t in judged]
            drawn = ax.barh(names, values, color=colors, height=0.5)
            for bar, t, v in zip(drawn, judged, values):
                bar.set_gid(series_id(kind, t["target"]))
                limit = (t.get("tolerance") or {}).get(limit_key)
                text = fmt.format(v) + ("" if limit is None else f" ({better} {limit:g})")
                ax.annotate(text, (v, bar.get_y() + bar.get_height() / 2), xytext=(3, 0),
                            textcoords="offset points", va="center", fontsize=8)
                if limit is not None:
                    y0, h = bar.get_y(), bar.get_height()
                    ax.plot([limit, limit], [y0 - 0.15 * h, y0 + 1.15 * h], color=LIMIT, linewidth=2,
                            gid=series_id(f"{kind}-{better}", t["target"]))
            ax.invert_yaxis()
            if kind == "top1":
                lows = [v for v in values] + [(t.get("tolerance") or {}).get(limit_key, 1.0) for t in judged]
                ax.set_xlim(max(0.0, min(lows) - 0.05), 1.005)
                ax.set_title("top-1 agreement, teacher-forced (higher is better; bar: minimum required)")
                ax.set_xlabel("share of positions whose argmax equals the reference's")
            else:
                ax.set_title("mean KL(reference ‖ target) (lower is better; bar: maximum allowed)")
                ax.set_xlabel("nats per position")
            ax.grid(axis="y", visible=False)

    if encoders:
        ax = next(axes)
        for i, t in enumerate(encoders):
            ys = [max(1.0 - c, ERROR_FLOOR) for c in t.get("cosine", [])]
            (line,) = ax.plot(range(len(ys)), ys, marker="o", markersize=3, label=t["target"], color=f"C{i}")
            line.set_gid(series_id("cosine-distance", t["target"]))
            limit = (t.get("tolerance") or {}).get("cosine")
            if limit is not None:
                ax.axhline(max(1.0 - limit, ERROR_FLOOR), color=FAIL, linestyle=":", linewidth=1.2,
                           label=f"{t['target']} limit (cosine ≥ {limit:g})", gid=series_id("cosine-min", t["target"]))
        ax.set_yscale("log")
        ax.set_title("1 − cosine similarity to the reference per validation text (lower is better)")
        ax.set_xlabel("validation text")
        ax.set_ylabel("1 − cosine (log)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    return fig


def write_validation_chart(report: dict, path: Path, name: str = "") -> Optional[Path]:
    """Write the validation chart of a validation.json `report` as SVG to `path`; None when there is nothing to
    chart. Raises MissingExtraError without matplotlib."""
    require("the validation chart")
    with _style():
        fig = validation_figure(report, name)
        if fig is None:
            return None
        return _save(fig, path)


# -- bench (inferneo bench --plot) -----------------------------------------------------------------------------
def _contenders(report: dict) -> Iterable[tuple[str, str, dict]]:
    for group in ("targets", "peers"):
        for name, r in report.get(group, {}).items():
            yield group, (name if group == "targets" else f"peer {name}"), r


def bench_figures(report: dict) -> dict:
    """{file stem: figure} for a `run_bench` report; only what was measured is drawn."""
    figures = {}
    model = report.get("model", "")
    roofline = report.get("roofline_tok_s")
    first = report.get("prompt_tokens", 0)
    last = first + report.get("new_tokens", 0)

    # 1. decode step time against position
    rows = list(_contenders(report))
    if any(r.get("long") or "decode_tok_s" in r for _, _, r in rows):
        fig = _figure(8, 5.2)
        ax = fig.subplots()
        for i, (group, label, r) in enumerate(rows):
            color = f"C{i}"
            if r.get("long"):
                xs = [p["position"] for p in r["long"]]
                ys = [p["step_ms"] for p in r["long"]]
                (line,) = ax.plot(xs, ys, marker="o", color=color, label=f"{label}: one step with N tokens cached")
                line.set_gid(series_id("decode-step", label))
            if "decode_tok_s" in r:
                ms = 1e3 / r["decode_tok_s"]["median"]
                ax.plot([first, last], [ms, ms], color=color, linestyle="--", linewidth=2, alpha=0.8,
                        label=f"{label}: mean step of the decode run", gid=series_id("decode-run", label))
            own = r.get("roofline_tok_s")
            if own:
                ax.axhline(1e3 / own, color=color, linestyle=":", linewidth=1,
                           label=f"{label}: roofline of its own weights ({1e3 / own:.2f} ms)",
                           gid=series_id("roofline", label))
        if roofline:
            ax.axhline(1e3 / roofline, color=LIMIT, linestyle=":", linewidth=1.5,
                       label=f"float32 roofline: weights at measured bandwidth ({1e3 / roofline:.2f} ms)",
                       gid=series_id("roofline"))
        ax.set_ylim(bottom=0)
        ax.set_title(f"{model}: decode step time by position (lower is better)")
        ax.set_xlabel("position (tokens already in the KV cache)")
        ax.set_ylabel("ms per decode step")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
        figures["decode_step_ms"] = fig

    # 2. aggregate tokens/s against concurrent requests
    conc = [(label, [c for c in r.get("concurrency", []) if "tok_s" in c]) for _, label, r in rows]
    conc = [(label, c) for label, c in conc if c]
    if conc:
        fig = _figure(7.5, 4.0)
        ax = fig.subplots()
        for i, (label, c) in enumerate(conc):
            (line,) = ax.plot([x["requests"] for x in c], [x["tok_s"] for x in c], marker="o", label=label,
                              color=f"C{i}")
            line.set_gid(series_id("concurrency", label))
        ax.set_xticks(sorted({x["requests"] for _, c in conc for x in c}))
        ax.set_ylim(bottom=0)
        ax.set_title(f"{model}: aggregate decode throughput by concurrency (higher is better)")
        ax.set_xlabel("concurrent requests (one batching engine)")
        ax.set_ylabel("tokens/s, all requests together")
        ax.legend(loc="best")
        figures["concurrency_tok_s"] = fig

    # 3. each contender's decode tokens/s as a share of its roofline
    fractions = [(label, r["roofline_fraction"]) for _, label, r in rows if r.get("roofline_fraction") is not None]
    if fractions:
        fig = _figure(7.5, 1.2 + 0.45 * len(fractions))
        ax = fig.subplots()
        labels = [label for label, _ in fractions]
        bars = ax.barh(labels, [f for _, f in fractions], color=[f"C{i}" for i in range(len(fractions))], height=0.55)
        for bar, (label, f) in zip(bars, fractions):
            bar.set_gid(series_id("roofline-fraction", label))
            ax.annotate(f"{100 * f:.0f}%" if f >= 0.1 else f"{100 * f:.1f}%", (f, bar.get_y() + bar.get_height() / 2), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=8)
        ax.axvline(1.0, color=LIMIT, linestyle=":", linewidth=1.5, label="roofline (100%)", gid=series_id("roofline"))
        ax.set_xlim(0, max(1.1, max(f for _, f in fractions) * 1.15))
        ax.invert_yaxis()
        ax.grid(axis="y", visible=False)
        ax.set_title(f"{model}: median decode tokens/s as a share of the memory-bandwidth roofline")
        ax.set_xlabel("share of roofline tokens/s (weights streamed once per token at measured bandwidth)")
        ax.legend(loc="lower right")
        figures["roofline_fraction"] = fig
    return figures


def _write_figures(make_figures, report: dict, directory: Path) -> list[Path]:
    """Write each of `make_figures(report)` as SVG and PNG into `directory` (created); the paths written."""
    require("`inferneo bench --plot`")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    with _style():
        for stem, fig in make_figures(report).items():
            for ext in ("svg", "png"):
                written.append(_save(fig, directory / f"{stem}.{ext}"))
    return written


def write_bench_charts(report: dict, directory: Path) -> list[Path]:
    """Write each bench chart as SVG and PNG into `directory` (created); the paths written."""
    return _write_figures(bench_figures, report, directory)


# -- workloads (inferneo bench --workloads --plot) -------------------------------------------------------------
SPEC_WORKLOADS = (("copy", "copy-heavy task"), ("chat", "free chat"), ("chat_draft", "free chat, draft model"))
ITL_CONDITIONS = (("alone", "alone_ms"), ("whole", "whole_prefill_ms"), ("chunked", "chunked_prefill_ms"),
                  ("chunked_apart", "chunked_apart_ms"))


def _bars(ax, xs, values, gids, texts, **kwargs):
    """Vertical bars, each with its series id (so the SVG names it) and a value label above it."""
    drawn = ax.bar(xs, values, **kwargs)
    for bar, gid in zip(drawn, gids):
        bar.set_gid(gid)
    ax.bar_label(drawn, labels=texts, padding=2, fontsize=8)
    return drawn


def _bar_axes(ax, title: str, ylabel: str, top: float) -> None:
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.3 * top)  # headroom for the two-line labels above the bars
    ax.grid(axis="x", visible=False)


def _speculation_rows(report: dict) -> list[tuple[str, str, dict]]:
    """(key, label, row) of each speculation workload the report measured (a skipped one has no tokens/s)."""
    return [(key, label, report[key]) for key, label in SPEC_WORKLOADS if "plain_tok_s" in report.get(key, {})]


def _speculation_figure(report: dict, name: str):
    rows = _speculation_rows(report)
    spec = report.get("speculative", {})
    fig = _figure(7, 4.6)
    ax = fig.subplots()
    xs, width = range(len(rows)), 0.38
    _bars(ax, [x - width / 2 for x in xs], [r["plain_tok_s"] for _, _, r in rows],
          [series_id("plain-tok-s", key) for key, _, _ in rows], [f"{r['plain_tok_s']:g}" for _, _, r in rows],
          width=width, color="C0", label="plain decoding")
    _bars(ax, [x + width / 2 for x in xs], [r["speculative_tok_s"] for _, _, r in rows],
          [series_id("speculative-tok-s", key) for key, _, _ in rows],
          [f"{r['speculative_tok_s']:g}\n{r['ratio']:g}× · {r['acceptance_rate']:.0%} accepted" for _, _, r in rows],
          width=width, color="C1",
          label=f"speculation (up to {spec.get('num_tokens', '?')} draft tokens)")
    # identical greedy tokens is what makes the speedup free: say so under each workload
    ax.set_xticks(list(xs), [f"{label}\n(tokens {'identical' if r['identical_tokens'] else 'DIFFER'})"
                             for _, label, r in rows])
    top = max(max(r["plain_tok_s"], r["speculative_tok_s"]) for _, _, r in rows)
    _bar_axes(ax, f"{name}: single-stream tokens/s\nwith and without speculation (higher is better)",
              "tokens/s (median, prefill included)", top)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    return fig


def _prefix_figure(report: dict, name: str):
    p = report["prefix"]
    fig = _figure(5.5, 3.8)
    ax = fig.subplots()
    values = [p["uncached_ttft_ms"], p["cached_ttft_ms"]]
    _bars(ax, [0, 1], values, [series_id("ttft", "uncached"), series_id("ttft", "cached")],
          [f"{values[0]:g} ms", f"{values[1]:g} ms\n({p['ratio']:.1%} of uncached)"],
          width=0.5, color=[LIMIT, PASS])
    ax.set_xticks([0, 1], ["uncached", "prefix cached"])
    _bar_axes(ax, f"{name}: time to first token after a shared\n{p['prefix_tokens']}-token system prompt "
              "(lower is better)", "ms to first token (median)", max(values))
    return fig


def _interleave_figure(report: dict, name: str):
    i = report["interleave"]
    ttft = i.get("long_prompt_ttft_ms", {})  # what the chunks cost the long prompt itself

    def first_token(c):
        return f" (its first token after {ttft[c] / 1e3:.1f} s)" if ttft.get(c) is not None else ""

    labels = {"alone": "streams alone",
              "whole": f"a {i['long_prompt_tokens']}-token prompt arrives, prefilled whole{first_token('whole')}",
              "chunked": f"the same prompt, prefilled in chunks of {i['prefill_chunk']}{first_token('chunked')}",
              "chunked_apart": f"the same chunks, each a forward of its own{first_token('chunked_apart')}"}
    ratios = {c: i.get(f"p99_ratio_{c}") for c in ("whole", "chunked", "chunked_apart")}
    conditions = [(c, i[key]) for c, key in ITL_CONDITIONS if key in i]
    fig = _figure(7.5, 4.8)
    ax = fig.subplots()
    width = 0.8 / len(conditions)
    for n, (c, ms) in enumerate(conditions):
        xs = [k + (n - (len(conditions) - 1) / 2) * width for k in range(2)]
        p99 = f"{ms['p99']:g}" + (f"\n{ratios[c]:g}×" if ratios.get(c) is not None else "")
        _bars(ax, xs, [ms["p50"], ms["p99"]], [series_id(f"itl-{c}", q) for q in ("p50", "p99")],
              [f"{ms['p50']:g}", p99], width=width, color=f"C{n}", label=labels[c])
    ax.set_xticks([0, 1], ["p50", "p99 (× alone)"])
    top = max(ms["p99"] for _, ms in conditions)
    low = min(ms["p50"] for _, ms in conditions)
    _bar_axes(ax, f"{name}: inter-token latency of\n{i['streams']} running streams (lower is better)",
              "ms between tokens", top)
    if low > 0 and top / low > 20:  # a whole prefill's stall would flatten every other bar to nothing
        ax.set_yscale("log")
        ax.set_ylim(low / 2, top * 4)
        ax.set_ylabel("ms between tokens (log scale)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1)
    return fig


def workload_figures(report: dict) -> dict:
    """{file stem: figure} for a `run_workloads` report; only the workloads it holds are drawn."""
    name = f"{report.get('artifact', '')}/{report.get('target', '')}"
    figures = {}
    if _speculation_rows(report):
        figures["speculation_tok_s"] = _speculation_figure(report, name)
    if "prefix" in report:
        figures["prefix_ttft_ms"] = _prefix_figure(report, name)
    if "interleave" in report:
        figures["interleave_itl_ms"] = _interleave_figure(report, name)
    return figures


def write_workload_charts(report: dict, directory: Path) -> list[Path]:
    """Write each workloads chart as SVG and PNG into `directory` (created); the paths written."""
    return _write_figures(workload_figures, report, directory)
