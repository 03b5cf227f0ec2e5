"""`inferneo bench`: the report's shape on a tiny artifact (numbers are not checked: they are benchmarks)."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from conftest import run_cli
from inferneo_runtime.bench import _ratios, spread


@pytest.fixture(scope="module")
def report(tiny_artifact):
    art = tiny_artifact("llama")
    # every peer is asked for: transformers always runs; optimum and genai run where installed (genai from
    # INFERNEO_GENAI_PYTHON's environment when set) and are otherwise skipped with the reason
    r = run_cli("bench", str(art), "--runs", "2", "--compare", "transformers,optimum,genai", "--json", timeout=900)
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
    assert report["targets"]["onnx"]["session_source"] == "artifact"  # the host's packed copy is opt-in
    assert report["targets"]["onnx"]["tokens"] == report["targets"]["torchscript"]["tokens"]


def test_roofline_is_measured(report, tiny_artifact):
    import onnx
    from onnx import numpy_helper

    bw = report["machine"]["bandwidth"]
    assert bw["read_gb_s"] > 0 and bw["threads"] == report["machine"]["threads"]
    assert bw["read_gb_s"] == max(bw["runs_gb_s"])  # measured before and after the runs; the best counts
    # What a decode step streams, counted from the ONNX graph itself: every weight a MatMul/Gemm node multiplies
    # by (the embedding table is a Gather, which reads one row per token). The rest the report counts (norm
    # weights, rotary tables, the graph's own bytes) is about 5% of this tiny model (<0.2% of SmolLM2's).
    graph = onnx.load(str(tiny_artifact("llama") / "onnx" / "model.onnx")).graph
    weights = {i.name: numpy_helper.to_array(i).nbytes for i in graph.initializer}
    multiplied = {i for node in graph.node if node.op_type in ("MatMul", "Gemm") for i in node.input if i in weights}
    streamed = report["weights_streamed_bytes"]
    assert streamed == pytest.approx(sum(weights[i] for i in multiplied), rel=0.06)
    assert report["roofline_tok_s"] == pytest.approx(bw["read_gb_s"] * 1e9 / streamed, rel=0.01)
    assert 0 < report["targets"]["onnx"]["roofline_fraction"]


def test_a_tied_head_is_streamed_whole(tiny_artifact):
    """A tied model's output head is its embedding table, read whole every step though stored once: the roofline
    counts it, for the onnx and the torchscript target alike."""
    import onnx
    from onnx import numpy_helper

    from inferneo_runtime.bench import _streamed_bytes, _target_streamed_bytes
    from inferneo_runtime.manifest import read_manifest

    art = tiny_artifact("qwen2")
    m = read_manifest(art)
    assert m.model.tied_embeddings
    graph = onnx.load(str(art / "onnx" / "model.onnx")).graph
    weights = {i.name: numpy_helper.to_array(i).nbytes for i in graph.initializer}
    multiplied = {i for node in graph.node if node.op_type in ("MatMul", "Gemm") for i in node.input if i in weights}
    head = sum(weights[i] for i in multiplied if i.startswith("lm_head"))
    assert head == m.model.vocab * m.model.hidden * 4  # the Gemms read the whole table
    expected = sum(weights[i] for i in multiplied)
    assert _target_streamed_bytes(m, "onnx") == pytest.approx(expected, rel=0.06)
    # the TorchScript file also holds the module's code: ~15% of a model this small
    assert expected <= _target_streamed_bytes(m, "torchscript") <= 1.2 * expected
    assert _streamed_bytes(m) == min(_target_streamed_bytes(m, t) for t in ("onnx", "torchscript"))


def _peer_ran(report, peer) -> dict:
    p = report["peers"][peer]
    if "skipped" in p:
        # CI names the peers its environment installs (Makefile PEERS4/PEERS5): there a skip is a failure
        assert peer not in os.environ.get("INFERNEO_EXPECT_PEERS", "").split(","), p["skipped"]
        pytest.skip(f"peer {peer} not run here: {p['skipped']}")
    assert "error" not in p, p
    return p


@pytest.mark.parametrize("peer", ["transformers", "optimum", "genai"])
def test_peers_produce_the_targets_tokens(report, peer):
    """Each peer that runs generates the targets' greedy tokens on the same prompt (the ratios compare the same
    work); transformers always runs, optimum and genai where installed."""
    if peer == "transformers":
        assert "skipped" not in report["peers"]["transformers"], report["peers"]["transformers"]
    p = _peer_ran(report, peer)
    assert p["decode_tok_s"]["median"] > 0 and len(p["tokens"]) == report["new_tokens"]
    for target in ("onnx", "torchscript"):
        ratio = report["ratios"][target][peer]
        assert ratio["decode"] > 0 and ratio["ttft"] > 0
        assert ratio["same_tokens"], (target, report["targets"][target]["tokens"], p["tokens"])
        assert p["tokens"] == report["targets"][target]["tokens"]


def test_missing_peers_are_skipped_with_a_reason(report):
    ran = {n for n, p in report["peers"].items() if "skipped" not in p}
    assert set(report["ratios"]["onnx"]) == ran and "transformers" in ran
    for name, p in report["peers"].items():
        if name not in ran:
            assert "not installed" in p["skipped"] or "not importable" in p["skipped"], p


def test_human_table(tiny_artifact):
    r = run_cli("bench", str(tiny_artifact("llama")), "--runs", "1", "--target", "onnx", timeout=600)
    assert r.returncode == 0, r.stderr
    assert "roofline" in r.stdout and "onnx" in r.stdout and "torchscript" not in r.stdout
    assert "onnx sessions: onnx loaded from the artifact" in r.stdout
    assert "structured outputs (a JSON schema, llguidance): onnx mask " in r.stdout  # the grammar mask's cost


def test_bad_names_are_input_errors(tiny_artifact):
    art = str(tiny_artifact("llama"))
    r = run_cli("bench", art, "--target", "nope", "--json")
    assert r.returncode == 2 and "has no target" in json.loads(r.stdout)["message"]
    r = run_cli("bench", art, "--compare", "vllm", "--json")
    assert r.returncode == 2 and "unknown peer" in json.loads(r.stdout)["message"]
    r = run_cli("bench", art, "--device", "tpu", "--json")
    assert r.returncode == 2 and "--device: device 'tpu' is not supported" in json.loads(r.stdout)["message"]
    r = run_cli("bench", art, "--device", "cuda:0", "--workloads")
    assert r.returncode == 2 and "--device" in r.stderr
    r = run_cli("bench", art, "--workloads", "--target", "onnx", "--target", "torchscript")  # measured onnx alone
    assert r.returncode == 2 and "measures one target" in r.stderr and "torchscript" in r.stderr, r.stderr


def test_a_device_this_host_lacks_is_named_before_anything_runs(tiny_artifact):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA: tests/test_gpu.py benches on it")
    r = run_cli("bench", str(tiny_artifact("llama")), "--device", "cuda", "--json")
    message = json.loads(r.stdout)["message"]
    assert r.returncode == 2 and "--device: device 'cuda' requested" in message and "sees no CUDA device" in message, message


def test_peer_checkpoint_comes_from_the_manifest(tmp_path, monkeypatch):
    from inferneo_build.bench_peers import checkpoint_for
    from inferneo_build.source import SourceError

    (tmp_path / "config.json").write_text("{}")
    path_source = SimpleNamespace(source=SimpleNamespace(kind="path", uri=str(tmp_path)))
    assert checkpoint_for(path_source) == tmp_path
    monkeypatch.setenv("INFERNEO_CACHE_DIR", str(tmp_path / "cache"))
    digest = "ab" * 32
    from inferneo_build.source import gguf_conversion_dir

    converted = gguf_conversion_dir(digest)  # where the build converts it (keyed by the converter too)
    assert converted.parent == tmp_path / "cache" / "checkpoints"
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


def test_contenders_take_turns_going_first(tiny_artifact):
    """Timed rounds flip their order, after one untimed decode each: a host that speeds up (or slows down) while
    it stays busy favours no contender."""
    from inferneo_runtime.bench import BenchSettings, run_bench

    logs: list[str] = []
    report = run_bench(tiny_artifact("llama"), targets=["onnx", "torchscript"], log=logs.append,
                       settings=BenchSettings(runs=3, new_tokens=8, concurrency=(1,)))
    assert "warm-up decode" in logs
    assert [m for m in logs if m.startswith("round ")] == [
        "round 1/3: onnx, torchscript", "round 2/3: torchscript, onnx", "round 3/3: onnx, torchscript"]
    assert all(t["decode_tok_s"]["n"] == 3 for t in report["targets"].values())


def _copy_with_targets(art, dest, edit):
    """A copy of artifact `art` whose manifest's targets `edit` rewrites (a manifest as a partial build leaves it)."""
    import shutil

    shutil.copytree(art, dest)
    raw = json.loads((dest / "inferneo.json").read_text())
    raw["targets"] = edit(raw["targets"])
    (dest / "inferneo.json").write_text(json.dumps(raw))
    return dest


def test_an_artifact_with_no_valid_target_is_refused_before_anything_runs(tiny_artifact, tmp_path):
    """No target to measure: exit 2 saying so, not a bandwidth measurement and empty tables with exit 0."""
    empty = _copy_with_targets(tiny_artifact("llama"), tmp_path / "empty", lambda targets: {})
    r = run_cli("bench", str(empty), "--runs", "1", "--json")
    assert r.returncode == 2 and "no valid target" in json.loads(r.stdout)["message"], r.stdout + r.stderr
    r = run_cli("bench", str(empty), "--runs", "1")
    assert r.returncode == 2 and "no valid target" in r.stderr and "measuring" not in r.stderr, r.stdout + r.stderr
    assert r.stdout == ""


@pytest.fixture(scope="module")
def bert_artifact(tmp_path_factory):
    from test_encoders import encoder_recipe, make_tiny_bert

    from inferneo_build import build

    tmp = tmp_path_factory.mktemp("bench-bert")
    return build(encoder_recipe({"path": str(make_tiny_bert(tmp / "ckpt"))}, tmp / "bert",
                                targets=[{"format": "onnx"}])).output


def test_an_encoder_artifact_is_refused_with_its_task(bert_artifact):
    """bench times generation; an encoder artifact was a row of AttributeErrors and exit 0 (--workloads: exit 1)."""
    art = bert_artifact
    for extra in ((), ("--workloads",)):
        r = run_cli("bench", str(art), "--runs", "1", *extra, "--json")
        reply = json.loads(r.stdout)
        assert r.returncode == 2 and reply["error"] == "BenchError", r.stdout + r.stderr
        assert "feature-extraction" in reply["message"] and "text generation" in reply["message"]


def test_a_target_or_peer_named_twice_runs_once(tiny_artifact):
    from inferneo_runtime.bench import BenchSettings, run_bench

    logs: list[str] = []
    report = run_bench(tiny_artifact("llama"), targets=["onnx", "onnx"], compare=("optimum", "optimum"),
                       log=logs.append, settings=BenchSettings(runs=1, new_tokens=8, concurrency=(1,)),
                       spawn_peers=lambda compare, *_: {p: {"skipped": "not here"} for p in compare})
    assert logs.count("loading target onnx") == 1 and list(report["targets"]) == ["onnx"]
    assert list(report["peers"]) == ["optimum"]


def test_a_quantized_only_artifact_has_the_roofline_of_its_own_bytes(tiny_checkpoint, tmp_path):
    """No float32 target beside it: the int8 target is still measured against its own weight bytes (it had none)."""
    from conftest import tiny_recipe_fields

    from inferneo_build import build
    from inferneo_build.recipe import Recipe
    from inferneo_runtime.bench import BenchSettings, _target_streamed_bytes, run_bench
    from inferneo_runtime.manifest import read_manifest

    fields = tiny_recipe_fields(tiny_checkpoint("llama"), "tiny-q8", tmp_path / "q8", targets=())
    fields["targets"] = [{"format": "onnx", "precision": "int8",
                          "tolerance": {"top1_agreement": 0.3, "mean_kl": 0.5, "perplexity_delta": 0.5}}]
    art = build(Recipe.model_validate(fields)).output
    report = run_bench(art, settings=BenchSettings(runs=1, new_tokens=8, concurrency=(1,)))
    t, bw = report["targets"]["onnx-int8"], report["machine"]["bandwidth"]["read_gb_s"]
    assert report["roofline_tok_s"] is None  # no float32 model to stream
    assert t["roofline_tok_s"] == pytest.approx(bw * 1e9 / _target_streamed_bytes(read_manifest(art), "onnx-int8"),
                                                rel=0.01)
    assert t["roofline_fraction"] == pytest.approx(t["decode_tok_s"]["median"] / t["roofline_tok_s"], abs=1e-3)
    from rich.console import Console

    from inferneo_runtime.bench_report import print_report

    console = Console(record=True, width=300)
    print_report(report, console)
    text = console.export_text()
    assert "roofline None" not in text and f"onnx-int8 {t['roofline_tok_s']:g} tok/s" in text, text


def test_inspect_counts_an_encoders_goldens(bert_artifact):
    """An encoder's reference outputs are its goldens (`inspect --html` lists them); the summary said 0."""
    from inferneo_runtime.manifest import read_manifest

    m = read_manifest(bert_artifact)
    assert not m.goldens and len(m.encoder.goldens) == 4
    r = run_cli("inspect", str(bert_artifact))
    assert r.returncode == 0 and "goldens 4" in r.stdout, r.stdout + r.stderr
