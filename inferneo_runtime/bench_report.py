"""`inferneo bench`'s human report: the table of targets and peers, the notes under it, the decode-step and
concurrency table, and the ratios. The measuring is inferneo_runtime.bench; this only reads its report dict."""
from __future__ import annotations

from .bench import CONCURRENCY, SESSION_SOURCES


def print_report(report: dict, console) -> None:
    from rich.table import Table

    m = report["machine"]
    bw = m["bandwidth"]
    device = m.get("device", "cpu")
    where = f"{bw.get('device', device)} ({device})" if device != "cpu" else f"{m['threads']} threads"
    console.print(f"[bold]{report['model']}[/bold] · {m['cpu']} · {m['physical_cores']} cores, {where} "
                  f"· prompt {report['prompt_tokens']} tokens, {report['new_tokens']} new, greedy · "
                  f"{report['runs']} interleaved runs (median, min–max)", highlight=False)
    if "read_gb_s" in bw:
        what = "memory read bandwidth" if device == "cpu" else f"{device} bandwidth ({bw.get('method')})"
        console.print(f"{what} {bw['read_gb_s']} GB/s (measured, best of before/after: "
                      f"{bw['runs_gb_s']})" + (f" · weights streamed per token {report['weights_streamed_mb']} MB "
                                               f"→ decode roofline {report['roofline_tok_s']} tok/s"
                                               if report.get("roofline_tok_s") else ""), highlight=False)
    else:
        console.print(f"memory bandwidth: {bw.get('error')}", highlight=False)

    table = Table("run", "load s", "TTFT ms", "decode tok/s (min–max)", "of roofline", "peak RSS MB", "load+1st s")
    rows = [(n, t) for n, t in report["targets"].items()] + [(f"peer {n}", p) for n, p in report["peers"].items()]
    for name, t in rows:
        if "decode_tok_s" not in t:
            table.add_row(name, *["-"] * 5, t.get("skipped") or t.get("error", ""))
            continue
        d = t["decode_tok_s"]
        frac = t.get("roofline_fraction")
        note = ""
        if t.get("format") == "onnx":
            note = " (torch imported)" if t.get("torch_imported") else " (no torch)"
        table.add_row(name, f"{t['load_s']:.2f}", f"{t['ttft_ms']['median']:.0f}",
                      f"{d['median']:.1f} ({d['min']:.1f}–{d['max']:.1f})",
                      "-" if frac is None else f"{100 * frac:.0f}%", f"{t['peak_rss_generation_mb']:.0f}",
                      f"{t['load_s'] + t['first_token_s']:.2f}{note}")
    console.print(table)
    gpu = [f"{n} {t['peak_device_memory_mb']:.0f}" for n, t in report["targets"].items() if "peak_device_memory_mb" in t]
    if gpu:
        console.print(f"peak {device} memory MB: " + ", ".join(gpu), highlight=False)
    own = [f"{n} {t['roofline_tok_s']:g} tok/s" for n, t in report["targets"].items() if t.get("roofline_tok_s")]
    if own:
        console.print("reduced-precision targets against the roofline of their own weight bytes: " + ", ".join(own),
                      highlight=False)
    sources = [f"{n} {SESSION_SOURCES.get(t['session_source'], t['session_source'])}"
               for n, t in report["targets"].items() if t.get("session_source")]
    if sources:
        console.print("onnx sessions: " + "; ".join(sources), highlight=False)
    structured = [f"{n} mask {t['structured']['mask_us_per_token']:.0f} µs/token, constrained decode "
                  f"{t['structured']['tok_s']:.1f} tok/s ({t['structured']['tokens']} tokens)"
                  for n, t in report["targets"].items() if "mask_us_per_token" in t.get("structured", {})]
    if structured:
        console.print("structured outputs (a JSON schema, llguidance): " + "; ".join(structured), highlight=False)
    verify = [f"{n} {t['verify_s']:.2f} s" for n, t in report["targets"].items() if "verify_s" in t]
    if verify:
        console.print("load s is load(verify=False); the default checksum pass adds " + ", ".join(verify),
                      highlight=False)
    cold = [f"{n} {t['process_to_first_token_s']:.2f} s" for n, t in report["targets"].items()
            if "process_to_first_token_s" in t and "error" not in t]
    if cold:
        console.print("a fresh process (interpreter, imports, load, first token): " + ", ".join(cold), highlight=False)

    detail = Table("target", "decode step ms at position", "long/short", *[f"{n} concurrent tok/s" for n in CONCURRENCY])
    for name, t in report["targets"].items():
        if not t.get("long"):
            continue
        steps = ", ".join(f"{x['step_ms']:.1f} @{x['position']}" for x in t["long"])
        ratio = t["long"][-1]["step_ms"] / t["long"][0]["step_ms"]
        conc = {c["requests"]: c for c in t.get("concurrency", [])}
        cells = [f"{conc[n]['tok_s']:.0f}" if "tok_s" in conc.get(n, {}) else "-" for n in CONCURRENCY]
        detail.add_row(name, steps, f"{ratio:.2f}×", *cells)
    console.print(detail)

    for name, row in report["ratios"].items():
        parts = [f"{peer} decode {r['decode']:.2f}×, TTFT {r['ttft']:.2f}×"
                 + ("" if r["same_tokens"] else " (tokens differ)") for peer, r in row.items()]
        console.print(f"{name} vs " + "; ".join(parts), highlight=False)
