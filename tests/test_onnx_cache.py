"""The host's packed copy of an ONNX target (inferneo_runtime.backends.onnx_cache): opt-in (INFERNEO_ONNX_CACHE=1),
written on first load, used after, the same numbers as the artifact, and never a reason for a load to fail."""
from __future__ import annotations

import logging

import numpy as np
import pytest

import inferneo_runtime
from inferneo_runtime.backends import onnx_cache

PROMPT = [[5, 17, 99, 3, 42, 8, 61]]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INFERNEO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(onnx_cache.ENV, "1")
    return tmp_path / "cache" / "onnx-prepacked"


def entries(cache):
    return sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")) if cache.exists() else []


def run(artifact, **kw):
    """(where the session came from, prompt logits, 8 greedy tokens) for one fresh load."""
    model = inferneo_runtime.load(artifact, target="onnx", verify=False, **kw)
    try:
        backend = model.backend
        kv = backend.allocate_cache(1, 64)
        logits = backend.forward(kv, 0, np.array(PROMPT, dtype=np.int64), np.zeros(1, dtype=np.int64))
        tokens = model.generate_ids(PROMPT, inferneo_runtime.SamplingParams(max_new_tokens=8, ignore_eos=True))
        return backend.session_source, logits, tokens[0].token_ids
    finally:
        model.close()


def test_first_load_writes_the_copy_later_loads_use_it_with_identical_numbers(tiny_artifact, cache, monkeypatch):
    artifact = tiny_artifact("llama")
    monkeypatch.delenv(onnx_cache.ENV)  # off unless asked for
    source, ref_logits, ref_tokens = run(artifact)
    assert source == "artifact" and entries(cache) == []
    monkeypatch.setenv(onnx_cache.ENV, "0")
    assert run(artifact)[0] == "artifact" and entries(cache) == []
    monkeypatch.setenv(onnx_cache.ENV, "1")

    source, logits, tokens = run(artifact)
    assert source == "created"
    [entry] = entries(cache)
    assert {p.name for p in entry.iterdir()} == {onnx_cache.MODEL, onnx_cache.DATA, onnx_cache.DONE}
    assert list(cache.glob(".*-*")) == []  # no temporary directory left behind
    np.testing.assert_array_equal(logits, ref_logits)
    assert tokens == ref_tokens

    source, logits, tokens = run(artifact)
    assert source == "cache" and entries(cache) == [entry]
    np.testing.assert_array_equal(logits, ref_logits)
    assert tokens == ref_tokens


def test_a_damaged_copy_is_dropped_and_written_again(tiny_artifact, cache, caplog):
    artifact = tiny_artifact("llama")
    _, ref_logits, _ = run(artifact)
    [entry] = entries(cache)
    data = entry / onnx_cache.DATA
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # e.g. a disk that filled up under it
    with caplog.at_level(logging.WARNING, logger=onnx_cache.__name__):
        source, logits, _ = run(artifact)
    assert source == "created"
    assert "dropping the unreadable packed onnx copy" in caplog.text
    np.testing.assert_array_equal(logits, ref_logits)
    assert run(artifact)[0] == "cache"


def test_another_cpu_or_onnxruntime_gets_its_own_copy(tiny_artifact, cache, monkeypatch):
    artifact = tiny_artifact("llama")
    assert run(artifact)[0] == "created"
    monkeypatch.setattr(onnx_cache, "cpu_flags", lambda: "sse2")  # the packed layout follows the instruction set
    assert run(artifact)[0] == "created"
    monkeypatch.setattr(onnx_cache.ort, "__version__", "0.0.1")
    assert run(artifact)[0] == "created"
    assert len(entries(cache)) == 3


def test_a_cache_that_cannot_be_written_still_loads_from_the_artifact(tiny_artifact, tmp_path, monkeypatch, caplog):
    artifact = tiny_artifact("llama")
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("INFERNEO_CACHE_DIR", str(blocker))
    monkeypatch.setenv(onnx_cache.ENV, "1")
    with caplog.at_level(logging.WARNING, logger=onnx_cache.__name__):
        source, logits, tokens = run(artifact)
    assert source == "artifact"
    assert "loading from the artifact" in caplog.text and str(blocker) in caplog.text
    assert len(tokens) == 8 and np.isfinite(logits).all()


def test_validate_judges_the_artifact_not_the_hosts_copy(tiny_artifact, cache):
    from inferneo_runtime.cli import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["validate", str(tiny_artifact("llama")), "--target", "onnx"])
    assert result.exit_code == 0, result.output
    assert entries(cache) == []


def test_rebuilding_an_artifact_in_place_drops_the_copy_of_its_old_version(tiny_artifact, cache, tmp_path):
    import shutil

    deployed = tmp_path / "deployed"
    shutil.copytree(tiny_artifact("llama"), deployed)
    assert run(deployed)[0] == "created"
    [old] = entries(cache)
    shutil.rmtree(deployed)
    shutil.copytree(tiny_artifact("qwen2"), deployed)  # new files at the same path
    assert run(deployed)[0] == "created"
    [new] = entries(cache)
    assert new != old and not old.exists()


def test_no_copy_when_it_would_fill_the_disk(tiny_artifact, cache, monkeypatch, caplog):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, (1 << 40) - (512 << 20), 512 << 20))
    with caplog.at_level(logging.WARNING, logger=onnx_cache.__name__):
        source, _, tokens = run(tiny_artifact("llama"))
    assert source == "artifact" and entries(cache) == [] and len(tokens) == 8
    assert "not writing the packed onnx copy" in caplog.text and "0.5 GB free" in caplog.text


def test_generate_says_when_it_wrote_the_copy(tiny_artifact, tmp_path):
    import json

    from conftest import run_cli

    env = {"INFERNEO_CACHE_DIR": str(tmp_path / "cache"), onnx_cache.ENV: "1"}
    args = ("generate", str(tiny_artifact("llama")), "Hello", "--target", "onnx", "--max-new-tokens", "3")
    first = run_cli(*args, env=env)
    assert first.returncode == 0, first.stderr
    assert "wrote this host's packed onnx copy" in first.stderr
    again = run_cli(*args, "--json", env=env)
    assert again.returncode == 0 and json.loads(again.stdout)["session_source"] == "cache"


def test_concurrent_first_loads_write_one_copy_and_agree(tiny_artifact, tmp_path):
    # three processes load a never-seen artifact at once: one writes the copy (under the file lock), the others
    # use the artifact or the finished copy; none fails, all generate the same tokens, one intact copy remains
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "INFERNEO_CACHE_DIR": str(tmp_path / "cache")}
    env[onnx_cache.ENV] = "1"
    args = [sys.executable, "-m", "inferneo_runtime.cli", "generate", str(tiny_artifact("llama")), "Hello there",
            "--target", "onnx", "--max-new-tokens", "6", "--json"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stdout + stderr
        results.append(json.loads(stdout))
    assert len({json.dumps(r["token_ids"]) for r in results}) == 1
    assert sum(r["session_source"] == "created" for r in results) == 1, [r["session_source"] for r in results]
    cache = tmp_path / "cache" / "onnx-prepacked"
    [entry] = entries(cache)
    assert {p.name for p in entry.iterdir()} == {onnx_cache.MODEL, onnx_cache.DATA, onnx_cache.DONE}
    assert list(cache.glob(".*-*")) == []
    again = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert json.loads(again.stdout)["session_source"] == "cache"
    assert json.loads(again.stdout)["token_ids"] == results[0]["token_ids"]
