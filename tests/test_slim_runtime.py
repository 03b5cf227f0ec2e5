"""The runtime loads and generates from ONNX with torch, transformers and inferneo_build unimportable."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def test_onnx_generation_without_torch(tiny_artifact):
    artifact = tiny_artifact("llama")
    script = textwrap.dedent(f"""
        import json, sys
        class Block:  # behave as if these were not installed
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "inferneo_build", "optimum"):
                    raise ImportError(f"{{name}} is blocked in this test")
        sys.meta_path.insert(0, Block())
        import inferneo_runtime
        with inferneo_runtime.load({str(artifact)!r}) as model:
            c = model.generate("The quick brown fox", max_new_tokens=8)
        try:
            inferneo_runtime.load({str(artifact)!r}, target="torchscript")
            ts = "loaded"
        except inferneo_runtime.MissingExtraError as e:
            ts = str(e)
        print(json.dumps({{"tokens": c.token_ids, "target": model.target, "torchscript": ts,
                          "leaked": [m for m in ("torch", "transformers", "inferneo_build") if m in sys.modules]}}))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["leaked"] == [] and out["target"] == "onnx" and len(out["tokens"]) >= 1
    assert "inferneo[torchscript]" in out["torchscript"]

    import inferneo_runtime
    with inferneo_runtime.load(artifact, target="onnx") as model:
        assert model.generate("The quick brown fox", max_new_tokens=8).token_ids == out["tokens"]


def test_import_is_slim():
    r = subprocess.run([sys.executable, "-c", "import sys, inferneo_runtime, inferneo_runtime.cli; "
                        "print([m for m in ('torch','transformers','inferneo_build') if m in sys.modules])"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_validate_without_torch_names_the_extra_to_install(tiny_artifact):
    """`inferneo validate` on a host without torch: the torchscript target is unavailable, and the line says which
    extra installs it, brackets and all (the console once read `[torchscript]` as markup and dropped it)."""
    artifact = tiny_artifact("llama")
    script = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "inferneo_build"):
                    raise ImportError(f"{name} is blocked in this test")
        sys.meta_path.insert(0, Block())
        from inferneo_runtime.cli import main
        sys.argv = ["inferneo", *sys.argv[1:]]
        sys.exit(main())
    """)
    r = subprocess.run([sys.executable, "-c", script, "validate", str(artifact)], capture_output=True, text=True,
                       timeout=300, env={**__import__("os").environ, "COLUMNS": "300"})
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(s for s in r.stdout.splitlines() if "torchscript:" in s)
    assert "unavailable" in line and "inferneo[torchscript]" in line, r.stdout
