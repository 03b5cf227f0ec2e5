"""`inferneo bench`: the report's shape on a tiny artifact (numbers are not checked: they are benchmarks)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from conftest import run_cli
from inferneo_runtime.bench import _ratios, spread


@pytest.fixture(scope="module")
def report(tiny_artifact):
    art = tiny_artifact("llama")
    r = run_cli("bench", str(art), "--runs", "2", "--compare", "transformers,genai", "--json",
                env={"INFERNEO_GENAI_PYTHON": "/nonexistent/python"}, timeout=900)
    assert r.returncode == 0, r.stderr + r.stdout
    return json.loads(r.stdout)


def test_every_target_is_measured(report):
    assert report["ok"] and report["prompt_tokens"] > 0
    assert report["new_tokens"] == min(128, 128 - report["prompt_tokens"])  # tiny artifact: max_sequence 128
    assert set(report["targets"]) == {"onnx", "torchscript"}
    for name, t in report["targets"].items():
        assert "error" not in t, t
        for key in ("ttft_ms", "decode_tok_s"):
            assert t[key]["n"] == 2 and 0 < t[key]["min"] <= t[key]["median"] <= t[key]["max"]
        assert t["load_s"] > 0 and t["peak_rss_generation_mb"] > 0 and t["runs_agree"]
        assert t["verify_s"] > 0 and t["process_to_first_token_s"] > t["load_plus_first_token_s"]
        assert len(t["tokens"]) == report["new_tokens"]
        assert [x["position"] for x in t["long"]] == [32, 64, 124]  # tiny artifact: max_sequence 128
        conc = {c["requests"]: c for c in t["concurrency"]}
        assert conc[1]["tok_s"] > 0 and conc[4]["tok_s"] > 0
        assert "max_batch is 4" in conc[8]["skipped"]
    assert report["targets"]["onnx"]["torch_imported"] is False  # the ONNX child never imports torch
    assert report["targets"]["onnx"]["session_source"] in ("cache", "created")  # the host's packed copy
    assert report["targets"]["onnx"]["tokens"] == report["targets"]["torchscript"]["tokens"]


def test_roofline_is_measured(report, tiny_artifact):
    from inferneo_runtime.manifest import read_manifest

    manifest = read_manifest(tiny_artifact("llama"))
    bw = report["machine"]["bandwidth"]
    assert bw["read_gb_s"] > 0 and bw["threads"] == report["machine"]["threads"]
    assert bw["read_gb_s"] == max(bw["runs_gb_s"])  # measured before and after the runs; the best counts
    streamed = report["weights_streamed_bytes"]
    embedding = manifest.model.vocab * manifest.model.hidden * 4  # looked up by row, not streamed
    assert streamed == min(sum(f.size for f in t.files) for t in manifest.targets.values()) - embedding
    assert report["roofline_tok_s"] == pytest.approx(bw["read_gb_s"] * 1e9 / streamed, rel=0.01)
    assert 0 < report["targets"]["onnx"]["roofline_fraction"]


def test_peers_run_or_are_skipped_with_a_reason(report):
    hf = report["peers"]["transformers"]
    assert "error" not in hf, hf
    assert hf["decode_tok_s"]["median"] > 0 and len(hf["tokens"]) == report["new_tokens"]
    assert "onnxruntime-genai not importable" in report["peers"]["genai"]["skipped"]
    ratio = report["ratios"]["onnx"]["transformers"]
    assert ratio["decode"] > 0 and ratio["ttft"] > 0 and set(report["ratios"]["onnx"]) == {"transformers"}


def test_human_table(tiny_artifact):
    r = run_cli("bench", str(tiny_artifact("llama")), "--runs", "1", "--target", "onnx", timeout=600)
    assert r.returncode == 0, r.stderr
    assert "roofline" in r.stdout and "onnx" in r.stdout and "torchscript" not in r.stdout
    assert "onnx sessions: onnx " in r.stdout and "this host's packed copy" in r.stdout


def test_bad_names_are_input_errors(tiny_artifact):
    art = str(tiny_artifact("llama"))
    r = run_cli("bench", art, "--target", "nope", "--json")
    assert r.returncode == 2 and "has no target" in json.loads(r.stdout)["message"]
    r = run_cli("bench", art, "--compare", "vllm", "--json")
    assert r.returncode == 2 and "unknown peer" in json.loads(r.stdout)["message"]


def test_peer_checkpoint_comes_from_the_manifest(tmp_path, monkeypatch):
    from inferneo_build.bench_peers import checkpoint_for
    from inferneo_build.source import SourceError

    (tmp_path / "config.json").write_text("{}")
    path_source = SimpleNamespace(source=SimpleNamespace(kind="path", uri=str(tmp_path)))
    assert checkpoint_for(path_source) == tmp_path
    monkeypatch.setenv("INFERNEO_CACHE_DIR", str(tmp_path / "cache"))
    digest = "ab" * 32
    converted = tmp_path / "cache" / "checkpoints" / f"gguf-{digest[:20]}"
    gguf_source = SimpleNamespace(source=SimpleNamespace(kind="gguf", uri="pkg:model.gguf", weights_sha256=digest))
    with pytest.raises(SourceError, match="--checkpoint"):
        checkpoint_for(gguf_source)
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    assert checkpoint_for(gguf_source) == converted


def test_ratios():
    t = {"decode_tok_s": spread([60.0, 62.0]), "ttft_ms": spread([50.0]), "tokens": [1, 2]}
    p = {"decode_tok_s": spread([30.0]), "ttft_ms": spread([100.0]), "tokens": [1, 3]}
    r = _ratios({"targets": {"onnx": t}, "peers": {"optimum": p, "genai": {"skipped": "not installed"}}})
    assert r == {"onnx": {"optimum": {"decode": 2.03, "ttft": 2.0, "same_tokens": False}}}
