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
