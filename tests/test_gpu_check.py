"""The device check (`python -m inferneo_build.gpu_check`) run the way CI can: on the CPU, on the tiny config.
On a GPU host the same command, with `--device cuda` and real model shapes, is issue 22's measurement."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")


def _check(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inferneo_build.gpu_check", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cpu_run_writes_parity_and_measurements(tmp_path):
    out = tmp_path / "check"
    r = _check(str(out), "--device", "cpu", "--models", "tiny", "--targets", "torchscript", "--new-tokens", "8",
               "--concurrency", "2", "--runs", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["host"]["device"] == "cpu" and report["host"]["torch"]
    tiny = report["models"]["tiny"]
    target = tiny["targets"]["torchscript"]
    # greedy tokens of the built target equal transformers' generate on the same device
    assert target["parity"] == {"tokens_equal": True, "first_divergence": None, "compared_tokens": 8}
    assert target["decode_tok_s"] > 0 and target["ttft_ms"] > 0 and target["aggregate_tok_s"]["2"] > 0
    assert target["sampled_decode_tok_s"] > 0 and target["sampled_tokens_equal_host_draw"] is True
    assert tiny["transformers"]["eager"]["decode_tok_s"] > 0 and "static_compile" not in tiny["transformers"]
    # the decode step is captured as a CUDA graph only on CUDA; on the CPU nothing is, and nothing is re-measured
    assert target["decode_graphs"] == {"mode": "off", "captured": 0, "error": None}
    assert "decode_tok_s_without_graphs" not in target
    # the roofline is the measured bandwidth over the checkpoint's float32 weight bytes
    params = 512 * 64 * 2 + 2 * (64 * (64 + 32 + 32 + 64) + 3 * 64 * 128 + 2 * 64) + 64
    assert tiny["weight_bytes"] == params * 4
    assert tiny["roofline_tok_s"] == pytest.approx(tiny["bandwidth"]["gb_s"] * 1e9 / tiny["weight_bytes"], rel=1e-3)
    assert target["share_of_roofline"] == pytest.approx(target["decode_tok_s"] / tiny["roofline_tok_s"], abs=1e-3)
    table = (out / "gpu_check.md").read_text()
    assert "| tiny | torchscript |" in table and "equal" in table and "sampled " in table
    assert table.strip() in r.stdout


def test_bad_arguments_are_named(tmp_path):
    r = _check(str(tmp_path / "x"), "--device", "cpu", "--models", "tiny,gpt-5")
    assert r.returncode == 2 and "--models" in r.stderr and "gpt-5" in r.stderr
    r = _check(str(tmp_path / "x"), "--device", "cpu", "--models", "tiny", "--targets", "onnx")
    assert r.returncode != 0 and "--targets" in r.stderr and "'onnx'" in r.stderr
    assert not (tmp_path / "x" / "gpu_check.json").exists()


def test_a_model_that_fails_is_reported_and_the_next_is_still_checked(tmp_path, monkeypatch):
    """A device session has minutes: one model's failure is recorded in both reports, the exit code says so, and
    the models after it are still checked."""
    from inferneo_build import gpu_check

    monkeypatch.setitem(gpu_check.CONFIGS, "broken", dict(gpu_check.CONFIGS["tiny"], model_type="no-such-architecture"))
    out = tmp_path / "check"
    rc = gpu_check.main([str(out), "--device", "cpu", "--models", "broken,tiny", "--targets", "torchscript",
                         "--new-tokens", "4", "--concurrency", "2", "--runs", "1"])
    assert rc == 1
    report = json.loads((out / "gpu_check.json").read_text())
    assert "no-such-architecture" in report["models"]["broken"]["error"]
    assert report["models"]["tiny"]["targets"]["torchscript"]["parity"]["tokens_equal"]
    table = (out / "gpu_check.md").read_text()
    assert "| broken | | failed: " in table and "| tiny | torchscript |" in table
