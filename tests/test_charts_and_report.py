"""Issue #25, "let people see it": validation.svg in built artifacts, `inferneo bench [--workloads] --plot`,
`inspect --html`, and progress output that stays out of --json and off under INFERNEO_PROGRESS=0."""
from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import PROMPTS, run_cli, tiny_recipe_fields, write_recipe
from inferneo_runtime import charts
from inferneo_runtime.manifest import read_manifest, sha256_file, verify_files

SVG = "{http://www.w3.org/2000/svg}"


def svg_groups(path: Path) -> dict[str, ET.Element]:
    """Every element with an id in a (well-formed) SVG file."""
    root = ET.parse(path).getroot()
    assert root.tag == f"{SVG}svg"
    return {el.get("id"): el for el in root.iter() if el.get("id")}


def path_points(group: ET.Element) -> int:
    """Vertices of the line drawn in a matplotlib series group: one M then one L per further point."""
    d = next(el.get("d") for el in group.iter(f"{SVG}path") if el.get("d"))
    return len(re.findall(r"[ML]", d))


@pytest.fixture(scope="module")
def built(tiny_checkpoint, tmp_path_factory):
    """`inferneo build --json` of a tiny llama (onnx), in a subprocess as a user runs it: (artifact, result)."""
    tmp = tmp_path_factory.mktemp("charts")
    out = tmp / "tiny-charts"
    recipe = write_recipe(tmp / "recipe.yaml", **tiny_recipe_fields(
        tiny_checkpoint("llama"), "tiny-charts", out, targets=("onnx",),
        validation={"prompts": PROMPTS, "max_new_tokens": 8, "logits_atol": 1e-3}))
    r = run_cli("build", str(recipe), "--json")
    return out, r, recipe


def test_json_build_prints_one_json_object_and_no_progress(built):
    out, r, _ = built
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads(r.stdout)  # the whole of stdout: no progress line leaked into it
    assert summary["ok"] and summary["targets"]["onnx"]["status"] == "valid"
    assert "✓" not in r.stderr and "validate onnx" not in r.stderr, r.stderr


def test_validation_svg_is_listed_hashed_and_verified(built):
    out, _, _ = built
    m = read_manifest(out)
    entry = next(f for f in m.root_files if f.path == charts.VALIDATION_CHART_NAME)
    path = out / charts.VALIDATION_CHART_NAME
    assert entry.sha256 == sha256_file(path) and entry.size == path.stat().st_size
    verify_files(out, m.root_files)  # the integrity check covers it like every other listed file
    r = run_cli("validate", str(out), "--json")
    assert r.returncode == 0, r.stdout + r.stderr


def test_validation_svg_plots_the_recorded_step_errors(built):
    out, _, _ = built
    report = json.loads((out / "validation.json").read_text())
    onnx = next(t for t in report["targets"] if t["target"] == "onnx")
    for p in onnx["prompts"]:  # recorded per generated token while the greedy inputs agree
        assert p["prompt_logits_error"] is not None
        assert len(p["step_logits_errors"]) == len(p["reference_tokens"])
        assert max([p["prompt_logits_error"], *p["step_logits_errors"]]) <= onnx["max_abs_logits_error"]
    groups = svg_groups(out / charts.VALIDATION_CHART_NAME)
    line = groups[charts.series_id("logits-error", "onnx")]
    assert path_points(line) == max(len(p["step_logits_errors"]) for p in onnx["prompts"])
    assert charts.series_id("logits-atol", "0.001") in groups
    text = "".join((out / charts.VALIDATION_CHART_NAME).read_text())
    assert "tiny-charts" in text and "logits_atol 0.001" in text  # text stays text (svg.fonttype none)


def test_validation_chart_of_reduced_precision_and_encoder_reports(tmp_path):
    """The tolerance panels (top-1, KL with their thresholds) and the encoder panel, from report dicts."""
    steps = [0.05, 0.07, 0.0, None]
    report = {"targets": [
        {"target": "onnx", "criterion": "exact", "logits_atol": 1e-3, "passed": True,
         "prompts": [{"step_logits_errors": [1e-6, 2e-6, 0.0]}]},
        {"target": "onnx-int4", "criterion": "tolerance", "precision": "int4", "logits_atol": 1e-3, "passed": False,
         "top1_agreement": 0.91, "mean_kl": 0.02, "tolerance": {"top1_agreement": 0.93, "mean_kl": 0.012},
         "prompts": [{"step_logits_errors": steps}]},
        {"target": "enc", "target_kind": "encoder", "cosine": [0.99999, 1.0], "tolerance": {"cosine": 0.9999}},
    ]}
    path = charts.write_validation_chart(report, tmp_path / "v.svg", "mixed")
    groups = svg_groups(path)
    for kind in ("top1", "kl", "top1-min", "kl-max"):
        assert charts.series_id(kind, "onnx-int4") in groups, kind
    assert charts.series_id("top1", "onnx") not in groups  # float32 targets are not judged by tolerance
    assert charts.series_id("cosine-distance", "enc") in groups and charts.series_id("cosine-min", "enc") in groups
    assert path_points(groups[charts.series_id("logits-error", "onnx")]) == 3
    assert charts._step_series(report["targets"][1])[2] == charts.ERROR_FLOOR  # exact zero on the log axis
    assert math.isnan(charts._step_series(report["targets"][1])[3])
    assert charts.write_validation_chart({"targets": []}, tmp_path / "none.svg") is None


def test_build_without_matplotlib_skips_the_chart(monkeypatch, tmp_path):
    from inferneo_build.build import validation_chart

    monkeypatch.setattr(charts, "available", lambda: False)
    logged = []
    assert validation_chart(tmp_path, {"targets": []}, "x", logged.append) == []
    assert "pip install 'inferneo[plot]'" in logged[0] and not (tmp_path / "validation.svg").exists()
    with pytest.raises(Exception, match=r"pip install 'inferneo\[plot\]'"):
        charts.require("`inferneo bench --plot`")


def test_bench_plot_writes_svg_and_png(built, tmp_path):
    out, _, _ = built
    plots = tmp_path / "plots"
    r = run_cli("bench", str(out), "--runs", "1", "--plot", str(plots), "--json", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    stems = {"decode_step_ms", "concurrency_tok_s", "roofline_fraction"}
    assert sorted(Path(p).name for p in report["charts"]) == sorted(f"{s}.{e}" for s in stems for e in ("svg", "png"))
    for stem in stems:
        assert (plots / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    onnx = report["targets"]["onnx"]
    groups = svg_groups(plots / "decode_step_ms.svg")
    assert path_points(groups[charts.series_id("decode-step", "onnx")]) == len(onnx["long"])
    assert charts.series_id("decode-run", "onnx") in groups and charts.series_id("roofline") in groups
    measured = [c for c in onnx["concurrency"] if "tok_s" in c]
    assert path_points(svg_groups(plots / "concurrency_tok_s.svg")[charts.series_id("concurrency", "onnx")]) == len(measured)
    assert charts.series_id("roofline-fraction", "onnx") in svg_groups(plots / "roofline_fraction.svg")


def test_bench_plot_refuses_a_server_bench():
    r = run_cli("bench", "--url", "http://127.0.0.1:9", "--plot", "x")
    assert r.returncode == 2 and "--plot" in r.stderr


def bar_values(fig) -> dict[str, float]:
    """The plotted value (height) of every bar that carries a series id in a figure."""
    return {bar.get_gid(): bar.get_height() for ax in fig.axes for bar in ax.patches if bar.get_gid()}


def test_workload_charts_plot_the_report(tiny_artifact, tmp_path):
    """The real `bench --workloads` measurements at their smallest, charted: each bar is the report's number."""
    from inferneo_runtime.bench_workloads import run_workloads

    report = run_workloads(tiny_artifact("llama"), runs=1, new_tokens=8, prefix_tokens=32, long_tokens=48,
                           prefill_chunk=16)
    paths = charts.write_workload_charts(report, tmp_path)
    figures = charts.workload_figures(report)
    assert set(figures) == {"speculation_tok_s", "prefix_ttft_ms", "interleave_itl_ms"}
    assert sorted(p.name for p in paths) == sorted(f"{s}.{e}" for s in figures for e in ("svg", "png"))
    expected = {charts.series_id(f"{kind}-tok-s", w): report[w][f"{kind}_tok_s"]
                for w in ("copy", "chat") for kind in ("plain", "speculative")}
    expected |= {charts.series_id("ttft", k): report["prefix"][f"{k}_ttft_ms"] for k in ("uncached", "cached")}
    conditions = (("alone", "alone_ms"), ("whole", "whole_prefill_ms"), ("chunked", "chunked_prefill_ms"),
                  ("chunked_apart", "chunked_apart_ms"))  # the onnx target mixes chunks into decode steps
    assert report["interleave"]["mixed_steps"]
    expected |= {charts.series_id(f"itl-{c}", q): report["interleave"][key][q] for c, key in conditions
                 for q in ("p50", "p99")}
    plotted = {}
    for stem, fig in figures.items():
        values = bar_values(fig)
        assert set(values) <= set(svg_groups(tmp_path / f"{stem}.svg")), stem  # each bar is named in the SVG
        assert (tmp_path / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        plotted |= values
    assert plotted == expected
    text = "".join(ET.parse(tmp_path / "speculation_tok_s.svg").getroot().itertext())
    copy = report["copy"]
    assert f"{copy['ratio']:g}× · {copy['acceptance_rate']:.0%} accepted" in text  # speedup and acceptance labelled
    text = "".join(ET.parse(tmp_path / "interleave_itl_ms.svg").getroot().itertext())
    ttft = report["interleave"]["long_prompt_ttft_ms"]
    assert f"chunks of 16 (its first token after {ttft['chunked'] / 1e3:.1f} s)" in text  # the chunks' cost to it


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.text, self.tags, self.imgs = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


def test_inspect_html_report(built, tmp_path):
    out, _, _ = built
    page = tmp_path / "report.html"
    r = run_cli("inspect", str(out), "--html", str(page), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["html"] == str(page), r.stdout + r.stderr
    html = page.read_text()
    parser = _Collect()
    parser.feed(html)
    parser.close()
    text = "".join(parser.text)
    assert "<script" not in html and "table" in parser.tags
    m = read_manifest(out)
    for name, t in m.targets.items():
        assert name in text and t.files[0].sha256[:12] in text
    for g in m.goldens:
        assert g.prompt in text and str(g.tokens) in text
    chart = next(i for i in parser.imgs if i.get("alt") == "validation chart")
    assert chart["src"].startswith("data:image/svg+xml;base64,")  # self-contained


def test_inspect_html_escapes_manifest_strings(built, tmp_path):
    import shutil

    out, _, _ = built
    art = tmp_path / "art"
    shutil.copytree(out, art)
    raw = json.loads((art / "inferneo.json").read_text())
    raw["name"] = "<script>alert(1)</script>"
    raw["goldens"][0]["prompt"] = '<img src=x onerror="alert(2)">'
    (art / "inferneo.json").write_text(json.dumps(raw))
    page = tmp_path / "r.html"
    r = run_cli("inspect", str(art), "--html", str(page))
    assert r.returncode == 0, r.stdout + r.stderr
    html = page.read_text()
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert '<img src=x' not in html and "&lt;img src=x onerror=&quot;alert(2)&quot;&gt;" in html


def test_no_progress_under_inferneo_progress_0(built):
    out, _, recipe = built
    r = run_cli("build", str(recipe), env={"INFERNEO_PROGRESS": "0"})  # up to date: a quick second run
    assert r.returncode == 0 and "up to date" in r.stdout, r.stdout + r.stderr
    assert "resolve source" not in r.stderr and "✓" not in r.stderr, r.stderr
    r = run_cli("build", str(recipe))  # not a terminal: step lines, no spinner redraws
    assert r.returncode == 0 and "✓ resolve source" in r.stderr and "\r" not in r.stderr, r.stderr


def test_progress_off_under_env_and_when_not_a_terminal(monkeypatch):
    import io

    from inferneo_build.build import Progress
    from inferneo_runtime import progress
    from inferneo_runtime.s3 import TransferBar

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv(progress.ENV, raising=False)
    assert not progress.bars_enabled(io.StringIO()) and progress.bars_enabled(Tty())
    monkeypatch.setenv(progress.ENV, "0")
    assert not progress.bars_enabled(Tty()) and Progress().console.quiet
    assert TransferBar(True, "pull", 10)._progress is None
    monkeypatch.setenv(progress.ENV, "1")
    assert progress.bars_enabled(io.StringIO())


def test_gguf_conversion_bars_are_silenced():
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    from inferneo_build.gguf_source import no_progress_bars

    before = gguf_utils.tqdm
    with no_progress_bars():
        assert gguf_utils.tqdm(range(2)).disable and not hf_logging.is_progress_bar_enabled()
    assert gguf_utils.tqdm is before


def test_validate_hash_bar_only_when_asked_or_on_a_terminal(built):
    out, _, _ = built
    r = run_cli("validate", str(out), env={"INFERNEO_PROGRESS": "1"})
    assert r.returncode == 0 and "sha256 onnx" in r.stderr, r.stdout + r.stderr
    r = run_cli("validate", str(out))  # stderr is a pipe here: no bar
    assert r.returncode == 0 and "sha256 onnx" not in r.stderr, r.stdout + r.stderr


def test_ray_merge_redraws_the_chart_over_every_target(built, tmp_path):
    """`build --ray` merges per-target sub-builds: validation.svg is redrawn from the merged validation.json."""
    from inferneo_build.fanout import _merge
    from inferneo_build.recipe import load_recipe

    out, _, recipe = built
    merged = tmp_path / "merged"
    summary = _merge(load_recipe(recipe), "k" * 64, [("onnx", out)], merged, None, None)
    assert summary["ok"]
    m = read_manifest(merged)
    assert [f.path for f in m.root_files].count(charts.VALIDATION_CHART_NAME) == 1
    verify_files(merged, m.root_files)
    assert charts.series_id("logits-error", "onnx") in svg_groups(merged / charts.VALIDATION_CHART_NAME)


def test_runtime_imports_without_matplotlib():
    import subprocess
    import sys

    code = ("import sys, inferneo_runtime, inferneo_runtime.cli, inferneo_runtime.charts, inferneo_runtime.report; "
            "print('matplotlib' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr


def test_bench_plot_into_a_file_is_refused_before_the_bench(built, tmp_path):
    """--plot naming a file (or a folder below one): exit 2 at once, not exit 1 after the whole bench."""
    out, _, _ = built
    (tmp_path / "taken").write_text("mine")
    for plot in (tmp_path / "taken", tmp_path / "taken" / "charts"):
        r = run_cli("bench", str(out), "--runs", "1", "--plot", str(plot))
        assert r.returncode == 2 and f"--plot {plot}" in r.stderr, r.stdout + r.stderr
        assert "measuring" not in r.stderr and r.stdout == ""  # nothing ran
    r = run_cli("bench", str(out), "--runs", "1", "--workloads", "--plot", str(tmp_path / "taken"), "--json")
    assert r.returncode == 2 and json.loads(r.stdout)["error"] == "BadParameter", r.stdout + r.stderr
    assert (tmp_path / "taken").read_text() == "mine"


def test_inspect_html_to_a_bad_path_is_an_input_error(built, tmp_path):
    out, _, _ = built
    for page, says in ((tmp_path / "missing" / "r.html", "no directory"), (tmp_path, "is a directory")):
        r = run_cli("inspect", str(out), "--html", str(page), "--json")
        reply = json.loads(r.stdout)
        assert r.returncode == 2 and says in reply["message"] and str(page) in reply["message"], r.stdout
    assert not (tmp_path / "missing").exists()


def test_inspect_check_of_a_manifest_without_targets_says_so(built, tmp_path):
    """`"targets": {}`: exit 5 as before, but with a line saying why (it printed nothing)."""
    import shutil

    out, _, _ = built
    art = tmp_path / "art"
    shutil.copytree(out, art)
    raw = json.loads((art / "inferneo.json").read_text())
    raw["targets"] = {}
    (art / "inferneo.json").write_text(json.dumps(raw))
    r = run_cli("inspect", str(art), "--check")
    assert r.returncode == 5 and "no targets" in r.stdout, r.stdout + r.stderr
    r = run_cli("inspect", str(art), "--check", "--json")
    assert r.returncode == 5 and json.loads(r.stdout) == {"ok": False, "artifact": raw["name"], "device": "cpu",
                                                          "targets": {}}
