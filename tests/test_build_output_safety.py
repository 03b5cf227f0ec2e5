"""`inferneo build` never replaces an `output:` that is not an artifact (a source tree, `.`, `/`) unless --force,
and cleans what dead builds left behind."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, tiny_recipe_fields, write_recipe
from inferneo_build import build
from inferneo_build.recipe import Recipe


def _build(recipe: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inferneo_runtime.cli", "build", str(recipe), *extra], cwd=cwd,
                          capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                            "PYTHONPATH": str(REPO)})


def test_output_over_a_directory_with_files_is_refused(tiny_checkpoint, tmp_path):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('precious')\n")
    (project / ".git").mkdir()
    (project / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    cases = ((project, tmp_path, project, "holds no inferneo.json"), (".", project, project, "the working directory"),
             ("..", project, tmp_path, "an ancestor of the working directory"), ("/", project, "/", "is /"))
    for output, cwd, named, what in cases:
        recipe = write_recipe(tmp_path / "r.yaml", **tiny_recipe_fields(tiny_checkpoint("llama"), "tiny", output))
        r = _build(recipe, cwd)
        assert r.returncode == 2, (output, r.returncode, r.stderr)
        assert f"output {named} " in r.stderr and what in r.stderr.replace("\n", " "), r.stderr
    assert (project / "src" / "main.py").read_text() == "print('precious')\n"
    assert (project / ".git" / "HEAD").is_file() and sorted(p.name for p in project.iterdir()) == [".git", "src"]


def test_a_killed_builds_staging_is_removed_by_the_next_build(tiny_checkpoint, tmp_path):
    from inferneo_runtime.stale import owned_name

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    out = tmp_path / "art"
    stale = tmp_path / owned_name(".art.staging-").replace(f".{os.getpid()}.", f".{proc.pid}.")
    (stale / "onnx").mkdir(parents=True)
    (stale / "onnx" / "model.onnx.data").write_bytes(b"x" * 4096)
    build(Recipe.model_validate(tiny_recipe_fields(tiny_checkpoint("llama"), "art", out, targets=("onnx",))))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_output_below_a_file_is_refused_by_name(tiny_checkpoint, tmp_path):
    """An output under a regular file failed with a bare "[Errno 17] File exists" and exit 1."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("precious\n")
    recipe = write_recipe(tmp_path / "r.yaml", **tiny_recipe_fields(tiny_checkpoint("llama"), "tiny",
                                                                    blocker / "art"))
    for extra in ((), ("--force",)):
        r = _build(recipe, tmp_path, *extra)
        assert r.returncode == 2, (extra, r.returncode, r.stderr)
        assert str(blocker) in r.stderr and "not a directory" in r.stderr, r.stderr
    assert blocker.read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "r.yaml"]


def test_force_over_a_file_leaves_no_stray_staging(tiny_checkpoint, tmp_path):
    """--force replaced a file at the output, but the exchanged-out file stayed beside it as `.art.staging-*`
    forever (rmtree cannot remove a file, and its error was ignored)."""
    out = tmp_path / "art"
    out.write_text("old\n")
    build(Recipe.model_validate(tiny_recipe_fields(tiny_checkpoint("llama"), "art", out, targets=("torchscript",))),
          force=True)
    assert (out / "inferneo.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_bad_sign_key_or_cache_is_refused_before_building(tiny_checkpoint, tmp_path):
    """With --force, a bad --sign key or --cache URI failed only after the whole build (and with --cache, after the
    artifact was published): the error must come first, and nothing be written."""
    out = tmp_path / "art"
    recipe = write_recipe(tmp_path / "r.yaml", **tiny_recipe_fields(tiny_checkpoint("llama"), "art", out))
    for extra, code, needle in ((("--sign", str(tmp_path / "r.yaml")), 9, "not a readable Ed25519 private key"),
                                (("--cache", "not-a-uri"), 8, "not an s3:// URI")):
        r = _build(recipe, tmp_path, "--force", *extra)
        assert r.returncode == code, (extra, r.returncode, r.stderr)
        assert needle in r.stderr and "export" not in r.stderr, r.stderr
        assert not out.exists()
