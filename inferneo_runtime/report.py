"""`inferneo inspect ARTIFACT --html report.html`: one self-contained HTML page about an artifact.

The manifest summary, each target (format, precision, files with sizes and sha256), the validation results
and chart, and the goldens (prompts, token ids, decoded text). Every string from the artifact is escaped;
the validation chart goes in as a base64 `data:` image (an <img> runs no script, whatever the file holds), and
only when its sha256 matches the manifest's. Needs nothing beyond the base install.
"""
from __future__ import annotations

import base64
import json
from html import escape
from pathlib import Path
from typing import Iterable, Optional

from .manifest import VALIDATION_NAME, Manifest, sha256_file

CHART_NAME = "validation.svg"  # = charts.VALIDATION_CHART_NAME (charts imports matplotlib lazily; this needs none)

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#212529;padding:0 1em}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #dee2e6;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0 1em}th,td{border:1px solid #dee2e6;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f1f3f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px}
.passed,.valid{color:#2b8a3e;font-weight:600}.failed{color:#c92a2a;font-weight:600}.skipped{color:#e67700;font-weight:600}
.muted{color:#868e96}img.chart{max-width:100%;border:1px solid #dee2e6}
.ids{max-width:40em;word-break:break-all}
"""


def _e(value) -> str:
    return escape("" if value is None else str(value), quote=True)


def _table(header: Iterable[str], rows: Iterable[Iterable[str]], cls: str = "") -> str:
    """Rows of already-escaped HTML cells."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _num(value, fmt: str = "{:.3g}") -> str:
    return "-" if value is None else _e(fmt.format(value))


def _status(value: str) -> str:
    return f'<span class="{_e(value)}">{_e(value)}</span>'


def _chart(root: Path, m: Manifest) -> str:
    entry = next((f for f in m.root_files if f.path == CHART_NAME), None)
    path = root / CHART_NAME
    if entry is None or not path.is_file():
        return '<p class="muted">No validation chart in this artifact (built without matplotlib: ' \
               "<code>pip install 'inferneo[plot]'</code>).</p>"
    if path.stat().st_size != entry.size or sha256_file(path) != entry.sha256:
        return f'<p class="failed">{_e(CHART_NAME)} does not match its sha256 in the manifest; not shown.</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img class="chart" alt="validation chart" src="data:image/svg+xml;base64,{data}">'


def _decoder(root: Path, m: Manifest):
    """A decode(ids) -> text function from the artifact's tokenizer, or None when it cannot be read."""
    try:
        from .tokenizer import Tokenizer

        tok = Tokenizer(root, listed=m.listed_root_files())
        return lambda ids: tok.decode(ids, skip_special_tokens=False)
    except Exception:
        return None


def _goldens_table(goldens, decode) -> str:
    rows = []
    for g in goldens:
        text = "-" if decode is None else _e(_safe(decode, g.tokens))
        rows.append([_e(g.prompt), f'<span class="mono ids">{_e(g.prompt_ids)}</span>',
                     f'<span class="mono ids">{_e(g.tokens)}</span>', text])
    return _table(["prompt", "prompt token ids", "greedy token ids", "greedy text"], rows, "goldens")


def _safe(decode, ids) -> str:
    try:
        return decode(ids)
    except Exception as e:
        return f"(not decodable: {type(e).__name__})"


def html_report(root: Path, m: Manifest) -> str:
    root = Path(root)
    parts: list[str] = []
    add = parts.append
    d = m.model
    add(f"<h1>{_e(m.name)}</h1>")
    add(f'<p class="muted">Inferneo artifact · {_e(m.task)} · {_e(m.architecture)} · built {_e(m.built_at)} with '
        f"inferneo {_e(m.inferneo_version)} · schema {_e(m.schema_version)}</p>")

    add("<h2>Model</h2>")
    src = m.source
    rows = [("family", d.family), ("model type", d.model_type), ("layers", d.num_layers), ("hidden", d.hidden),
            ("heads / kv heads", f"{d.heads} / {d.kv_heads}"), ("head dim", d.head_dim), ("vocab", d.vocab),
            ("max positions", d.max_positions),
            *([("experts (per token)", f"{d.experts} ({d.experts_per_token})")] if d.experts else []),
            ("source", f"{src.kind}:{src.uri}" + (f"@{src.revision}" if src.revision else "")),
            ("weights sha256", src.weights_sha256), ("recipe sha256", m.recipe_sha256), ("build key", m.build_key),
            ("eos token ids", m.generation.eos_token_ids)]
    add(_table(["field", "value"], [[_e(k), _e(v)] for k, v in rows], "summary"))
    if src.adapters:
        add(_table(["LoRA adapter", "sha256", "rank", "alpha", "modules"],
                   [[_e(a.path), f'<code>{_e(a.sha256[:12])}…</code>', _e(a.rank), _e(a.alpha),
                     _e(", ".join(a.target_modules))] for a in src.adapters]))
    if m.encoder is not None:
        e = m.encoder
        add(_table(["encoder output", "dim", "pooling", "normalize", "max length", "labels"],
                   [[_e(e.output), _e(e.dim), _e(e.pooling or "-"), _e(e.normalize), _e(e.max_length),
                     _e(", ".join(e.labels or []) or "-")]]))

    add("<h2>Targets</h2>")
    rows = []
    for name, t in m.targets.items():
        files = "<br>".join(f"<code>{_e(f.path)}</code> {_e(_size(f.size))} <code>{_e(f.sha256[:12])}…</code>"
                            for f in t.files) or '<span class="muted">none</span>'
        shapes = f"batch ≤ {t.shapes.max_batch}, sequence ≤ {t.shapes.max_sequence}" if t.shapes else "-"
        rows.append([f"<b>{_e(name)}</b>", _e(t.format), _e(t.precision or "fp32"), _e(t.dtype), _status(t.status),
                     _e(shapes), f'<span class="num">{_e(_size(sum(f.size for f in t.files)))}</span>', files])
    add(_table(["target", "format", "precision", "dtype", "status", "shapes", "size", "files (size, sha256)"], rows,
               "targets"))
    add(_table(["root file", "size", "sha256"],
               [[f"<code>{_e(f.path)}</code>", _e(_size(f.size)), f"<code>{_e(f.sha256[:12])}…</code>"]
                for f in m.root_files], "root-files"))

    add("<h2>Validation</h2>")
    rows = []
    for name, t in m.targets.items():
        v, tol = t.validation, t.validation.tolerance
        limits = []
        if v.logits_atol is not None:
            limits.append(f"logits_atol {v.logits_atol:g}")
        if tol is not None:
            limits += [f"{k} {val:g}" for k, val in tol.model_dump(exclude_none=True).items()]
        rows.append([f"<b>{_e(name)}</b>", _status(v.status), _e(v.criterion or "-"), _num(v.max_abs_logits_error),
                     "-" if v.token_match is None else _e("match" if v.token_match else "diverge"),
                     _num(v.top1_agreement, "{:.4f}"), _num(v.mean_kl, "{:.4g}"),
                     _num(v.perplexity_delta, "{:+.2%}"), _num(v.min_cosine, "{:.6f}"), _e(", ".join(limits) or "-"),
                     _e(v.reason or "")])
    add(_table(["target", "status", "criterion", "max abs logits err", "greedy tokens", "top-1 agreement",
                "mean KL", "Δ perplexity", "min cosine", "thresholds", "reason"], rows, "validation"))
    report = _validation_json(root, m)
    if report is not None and report.get("reference"):
        add(f'<p class="muted">Reference: {_e(report["reference"])}'
            + (f"; {_e(report['max_new_tokens'])} new tokens per prompt" if report.get("max_new_tokens") else "")
            + ".</p>")
    add(_chart(root, m))

    add("<h2>Goldens</h2>")
    decode = _decoder(root, m) if m.goldens or any(t.goldens for t in m.targets.values()) else None
    if m.goldens:
        add("<p>The PyTorch reference's greedy continuations; every float32 target reproduces them.</p>")
        add(_goldens_table(m.goldens, decode))
    for name, t in m.targets.items():
        if t.goldens:
            add(f"<h3>{_e(name)}'s own greedy continuations ({_e(t.precision)})</h3>")
            add(_goldens_table(t.goldens, decode))
    if m.encoder is not None and m.encoder.goldens:
        add(_table(["text", "reference output (first values)"],
                   [[_e(g.text), f'<span class="mono">{_e(", ".join(f"{x:.5g}" for x in g.values[:8]))}'
                     f'{" …" if len(g.values) > 8 else ""}</span>'] for g in m.encoder.goldens], "goldens"))
    if not (m.goldens or m.encoder):
        add('<p class="muted">No goldens.</p>')

    add("<h2>Toolchain</h2>")
    add(_table(["package", "version"], [[_e(k), _e(v)] for k, v in m.toolchain.items()], "toolchain"))
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(m.name)} · Inferneo artifact</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def _validation_json(root: Path, m: Manifest) -> Optional[dict]:
    entry = next((f for f in m.root_files if f.path == VALIDATION_NAME), None)
    path = root / VALIDATION_NAME
    if entry is None or not path.is_file() or path.stat().st_size != entry.size:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_html_report(root: Path, m: Manifest, out: Path) -> Path:
    out = Path(out)
    out.write_text(html_report(root, m), encoding="utf-8")
    return out
