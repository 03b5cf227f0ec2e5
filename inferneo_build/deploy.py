"""Deploy bundles: an artifact laid out the way another serving engine expects (`inferneo deploy ...`).

- `triton`: a Triton model repository. OUT/<model>/config.pbtxt (python backend, decoupled streaming) and
  OUT/<model>/1/model.py (inferneo_runtime/integrations/triton_model.py); a local artifact is copied to
  OUT/<model>/1/artifact, an s3:// one is referenced (pinned to its version) and fetched at load.
- `lmi`: DJL Serving / SageMaker LMI. OUT/serving.properties (engine=Python, option.entryPoint=model.py,
  option.model_id = the artifact's S3 version prefix), OUT/model.py (integrations/lmi_model.py) and
  OUT/requirements.txt. A local artifact is copied into OUT instead, so OUT is the whole model directory
  to upload (`aws s3 cp OUT s3://bucket/model/ --recursive`).
- `kserve`: a KServe InferenceService (YAML) whose predictor container runs the Inferneo KServe predictor
  (or `inferneo serve` with --server openai) on /mnt/models, which KServe's storage initializer fills
  from the artifact's S3 version prefix (STORAGE_URI).

Every S3 reference is pinned to the immutable `versions/<sha256>` prefix that LATEST pointed at when the
bundle was written: a bundle always serves the artifact it was checked against; redeploy to roll forward.
Each writer checks the engine's documented layout before it returns (DeployError names what is missing).
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

import yaml

from inferneo_runtime import __version__
from inferneo_runtime.artifact import choose_target, verify_artifact
from inferneo_runtime.errors import InferneoError
from inferneo_runtime.manifest import MANIFEST_NAME, Manifest, read_manifest
from inferneo_runtime.signing import SIGNATURE_NAME

LMI_REQUIRED = ("config.json", "tokenizer_config.json")  # "[Required]" in LMI's model-artifacts layout
TRITON_VERSION = "1"
KSERVE_MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts STORAGE_URI
KSERVE_PORT = 8080


class DeployError(InferneoError):
    """A bundle cannot be written for this artifact (or would not match the engine's layout)."""

    exit_code = 2


@dataclass
class ArtifactRef:
    """An artifact to deploy: its manifest, and where it lives (a directory here, or a pinned S3 version)."""

    source: str
    manifest: Manifest
    directory: Optional[Path] = None  # a local artifact
    s3_uri: Optional[str] = None  # s3://bucket/prefix/versions/<sha256>, no trailing slash
    version: Optional[str] = None

    @property
    def name(self) -> str:
        return self.manifest.name

    def root_paths(self) -> set[str]:
        return {f.path for f in self.manifest.root_files}


def open_artifact(artifact: str) -> ArtifactRef:
    """A local artifact directory (checksums verified), or an s3:// artifact (LATEST resolved to its
    version; only the manifest is read, and checked against the version hash)."""
    from inferneo_runtime import s3

    if s3.is_s3_uri(artifact):
        loc = s3.parse_uri(artifact)
        client = s3.make_client()
        version = s3.resolve_version(client, loc)
        raw = s3.get_bytes(client, loc.bucket, loc.manifest_key(version))
        if hashlib.sha256(raw).hexdigest() != version:
            raise DeployError(f"{loc.version_uri(version)}/{MANIFEST_NAME} does not hash to its version {version}")
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / MANIFEST_NAME).write_bytes(raw)
            manifest = read_manifest(Path(tmp))
        return ArtifactRef(s3.normalize_uri(artifact), manifest, s3_uri=loc.version_uri(version), version=version)
    root = Path(artifact)
    manifest = read_manifest(root)
    verify_artifact(root, manifest, manifest.valid_targets())
    return ArtifactRef(str(artifact), manifest, directory=root.absolute())


def _template(name: str) -> str:
    return resources.files("inferneo_runtime.integrations").joinpath(name).read_text(encoding="utf-8")


def _copy_artifact(ref: ArtifactRef, dest: Path) -> None:
    """The manifest's files (and the manifest, and a signature if any), hard-linked where possible."""
    paths = [f.path for f in ref.manifest.root_files] + [f.path for t in ref.manifest.targets.values() for f in t.files]
    paths += [n for n in (MANIFEST_NAME, SIGNATURE_NAME) if (ref.directory / n).is_file()]
    for rel in dict.fromkeys(paths):
        src, dst = ref.directory / rel, dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            dst.hardlink_to(src)
        except OSError:
            shutil.copy2(src, dst)


def _fresh(path: Path, force: bool) -> None:
    if path.exists() and any(path.iterdir()):
        if not force:
            raise DeployError(f"{path} exists and is not empty (use --force to replace it)")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


def _target(ref: ArtifactRef, target: Optional[str]) -> str:
    try:
        return choose_target(ref.manifest, target)
    except InferneoError as e:
        raise DeployError(str(e)) from None


# -- Triton ---------------------------------------------------------------------------------------------
def triton_config(name: str, *, kind: str = "KIND_CPU", count: int = 1, artifact: str = "artifact",
                  target: Optional[str] = None, threads: Optional[int] = None,
                  default_max_tokens: Optional[int] = None) -> str:
    """config.pbtxt for the python-backend model (protobuf text format of inference.ModelConfig)."""
    def inp(n: str, dtype: str, dims: str = "1", optional: bool = True) -> str:
        return (f'  {{\n    name: "{n}"\n    data_type: {dtype}\n    dims: [ {dims} ]\n'
                + ("    optional: true\n" if optional else "") + "  }")

    def out(n: str, dtype: str, dims: str) -> str:
        return f'  {{\n    name: "{n}"\n    data_type: {dtype}\n    dims: [ {dims} ]\n  }}'

    inputs = [inp("text_input", "TYPE_STRING", optional=False), inp("max_tokens", "TYPE_INT32"),
              inp("temperature", "TYPE_FP32"), inp("top_p", "TYPE_FP32"), inp("top_k", "TYPE_INT32"),
              inp("seed", "TYPE_INT64"), inp("stream", "TYPE_BOOL"), inp("stop", "TYPE_STRING", "-1"),
              inp("sampling_parameters", "TYPE_STRING")]
    outputs = [out("text_output", "TYPE_STRING", "-1"), out("finish_reason", "TYPE_STRING", "1"),
               out("output_ids", "TYPE_INT32", "-1")]
    params = {"artifact": artifact, "target": target, "threads": threads, "default_max_tokens": default_max_tokens}
    param_text = "".join(f'parameters {{\n  key: "{k}"\n  value: {{ string_value: {json.dumps(str(v))} }}\n}}\n'
                         for k, v in params.items() if v is not None)
    return (f'# Written by inferneo {__version__} (`inferneo deploy triton`)\n'
            f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n\n'
            "# one request in, a stream of responses out (one per text delta with stream=true)\n"
            "model_transaction_policy {\n  decoupled: true\n}\n\n"
            "input [\n" + ",\n".join(inputs) + "\n]\n"
            "output [\n" + ",\n".join(outputs) + "\n]\n\n"
            f"instance_group [\n  {{\n    count: {count}\n    kind: {kind}\n  }}\n]\n\n" + param_text)


def write_triton(artifact: str, out: Path, *, target: Optional[str] = None, instances: int = 1,
                 device: Optional[str] = None, threads: Optional[int] = None,
                 default_max_tokens: Optional[int] = None, force: bool = False) -> dict:
    """Write a Triton model repository for `artifact` into `out` (which may already hold other models)."""
    ref = open_artifact(artifact)
    name = _target(ref, target)
    fmt = ref.manifest.targets[name].format
    gpu = (device or "").startswith("cuda") or fmt == "tensorrt"
    out = Path(out)
    model_dir = out / ref.name
    _fresh(model_dir, force)
    version_dir = model_dir / TRITON_VERSION
    version_dir.mkdir()
    (version_dir / "model.py").write_text(_template("triton_model.py"), encoding="utf-8")
    if ref.directory is not None:
        _copy_artifact(ref, version_dir / "artifact")
        location = "artifact"
    else:
        location = ref.s3_uri
    (model_dir / "config.pbtxt").write_text(triton_config(
        ref.name, kind="KIND_GPU" if gpu else "KIND_CPU", count=instances, artifact=location, target=name,
        threads=threads, default_max_tokens=default_max_tokens), encoding="utf-8")
    check_triton_layout(out, ref.name)
    return {"ok": True, "engine": "triton", "repository": str(out), "model": ref.name, "target": name,
            "artifact": location if ref.directory is None else str(version_dir / "artifact"),
            "files": sorted(str(p.relative_to(out)) for p in model_dir.rglob("*") if p.is_file()
                            and "artifact" not in p.relative_to(model_dir).parts)}


def check_triton_layout(repository: Path, model: str) -> None:
    """Triton's model-repository layout: <repo>/<model>/config.pbtxt naming <model>, and a numeric version
    folder holding the python backend's model.py."""
    model_dir = Path(repository) / model
    config = model_dir / "config.pbtxt"
    if not config.is_file():
        raise DeployError(f"{config}: missing")
    m = re.search(r'^name:\s*"([^"]*)"', config.read_text(), re.M)
    if not m or m.group(1) != model:
        raise DeployError(f"{config}: name must be {model!r}, the model's folder")
    versions = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    if not any((v / "model.py").is_file() for v in versions):
        raise DeployError(f"{model_dir}: no <version>/model.py (the python backend's entry point)")


# -- LMI ------------------------------------------------------------------------------------------------
def serving_properties(model_id: Optional[str], *, target: Optional[str] = None, device: Optional[str] = None,
                       threads: Optional[int] = None, streaming: bool = True) -> str:
    lines = [f"# Written by inferneo {__version__} (`inferneo deploy lmi`): DJL Serving's Python engine runs model.py,",
             "# which serves the Inferneo artifact with inferneo_runtime (requirements.txt installs it).",
             "engine=Python",
             "option.entryPoint=model.py"]
    if model_id:
        lines.append(f"option.model_id={model_id}")
    if target:
        lines.append(f"option.inferneo_target={target}")
    if device:
        lines.append(f"option.inferneo_device={device}")
    if threads:
        lines.append(f"option.inferneo_threads={threads}")
    lines.append(f"option.enable_streaming={'true' if streaming else 'false'}")
    return "\n".join(lines) + "\n"


def parse_properties(text: str) -> dict[str, str]:
    """Java .properties as DJL reads serving.properties: key=value lines, # comments."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise DeployError(f"serving.properties: {line!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def write_lmi(artifact: str, out: Path, *, target: Optional[str] = None, device: Optional[str] = None,
              threads: Optional[int] = None, force: bool = False) -> dict:
    """Write an LMI model directory: serving.properties pointing at the S3 prefix (or the artifact copied in)."""
    ref = open_artifact(artifact)
    name = _target(ref, target)
    missing = [f for f in LMI_REQUIRED if f not in ref.root_paths()]
    if missing:
        raise DeployError(f"artifact {ref.name!r} lacks {', '.join(missing)}, which LMI requires at the model root")
    out = Path(out)
    _fresh(out, force)
    model_id = None
    if ref.directory is not None:
        _copy_artifact(ref, out)  # OUT is the whole model directory
    else:
        model_id = ref.s3_uri + "/"  # LMI takes "the S3 uri for the object prefix of your model artifacts"
    (out / "serving.properties").write_text(serving_properties(model_id, target=name, device=device, threads=threads),
                                            encoding="utf-8")
    (out / "model.py").write_text(_template("lmi_model.py"), encoding="utf-8")
    extras = "s3" if ref.s3_uri else None
    fmt = ref.manifest.targets[name].format
    # the base package names no onnxruntime (cpu / gpu extras); onnx targets run on the CPU wheel
    extras = ",".join(e for e in (extras, "cpu" if fmt == "onnx" else None,
                                  "torchscript" if fmt in ("torchscript", "pt2") else None,
                                  "tensorrt" if fmt == "tensorrt" else None) if e)
    requirement = f"inferneo[{extras}]" if extras else "inferneo"
    (out / "requirements.txt").write_text(f"{requirement}=={__version__}\n", encoding="utf-8")
    check_lmi_layout(out, ref)
    return {"ok": True, "engine": "lmi", "output": str(out), "model": ref.name, "target": name,
            "model_id": model_id or str(out), "files": sorted(p.name for p in out.iterdir() if p.is_file())}


def check_lmi_layout(out: Path, ref: ArtifactRef) -> None:
    """serving.properties parses, names the Python engine and an entry point that exists, and the model
    directory (OUT, or the S3 prefix it names) holds the files LMI requires."""
    props = parse_properties((out / "serving.properties").read_text())
    if props.get("engine") != "Python":
        raise DeployError("serving.properties: engine must be Python")
    entry = props.get("option.entryPoint")
    if not entry or not (out / entry).is_file():
        raise DeployError(f"serving.properties: option.entryPoint {entry!r} is not a file in {out}")
    model_id = props.get("option.model_id")
    if model_id:
        if model_id.rstrip("/") != ref.s3_uri:
            raise DeployError(f"serving.properties: option.model_id {model_id} is not the artifact's version prefix")
        present = ref.root_paths() | {MANIFEST_NAME}
    else:
        present = {p.name for p in out.iterdir()}
    missing = [f for f in LMI_REQUIRED if f not in present]
    if missing:
        raise DeployError(f"the LMI model directory lacks {', '.join(missing)}")


# -- KServe ---------------------------------------------------------------------------------------------
def _dns_name(name: str) -> str:
    s = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    return (s or "inferneo")[:45].rstrip("-")  # KServe derives longer names from it; keep it short


def kserve_manifest(ref: ArtifactRef, *, image: str, server: str = "kserve", target: Optional[str] = None,
                    name: Optional[str] = None, namespace: Optional[str] = None,
                    service_account: Optional[str] = None, min_replicas: int = 1, max_replicas: Optional[int] = None,
                    device: Optional[str] = None, cpu: str = "1", memory: str = "2Gi", gpus: int = 0) -> dict:
    """An InferenceService (serving.kserve.io/v1beta1) for `ref`, which must be on S3."""
    if ref.s3_uri is None:
        raise DeployError(f"{ref.source} is a local directory; KServe pulls artifacts from S3: publish it with "
                          f"`inferneo push {ref.source} s3://bucket/prefix` and deploy the s3:// URI")
    chosen = _target(ref, target)
    fmt = ref.manifest.targets[chosen].format
    if fmt == "tensorrt" and not gpus:
        gpus = 1
    device = device or ("cuda" if gpus else "cpu")
    model = ref.name
    if server == "kserve":
        command = ["python", "-m", "inferneo_runtime.integrations.kserve"]
        args = ["--model_name", model, "--artifact", KSERVE_MODEL_DIR, "--target", chosen, "--device", device,
                "--http_port", str(KSERVE_PORT)]
        ready_path = f"/v1/models/{model}"
    elif server == "openai":
        command = ["inferneo", "serve"]
        args = [KSERVE_MODEL_DIR, "--host", "0.0.0.0", "--port", str(KSERVE_PORT), "--device", device]
        ready_path = "/ready"
    else:
        raise DeployError(f"server {server!r}: use kserve (KServe's v1/v2 protocols) or openai (inferneo serve)")
    resources = {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}}
    if gpus:
        resources["limits"]["nvidia.com/gpu"] = str(gpus)
        resources["requests"]["nvidia.com/gpu"] = str(gpus)
    container = {
        "name": "kserve-container",  # the container KServe's storage initializer mounts /mnt/models into
        "image": image,
        "command": command,
        "args": args,
        "env": [{"name": "STORAGE_URI", "value": ref.s3_uri},
                {"name": "INFERNEO_ARTIFACT_VERSION", "value": ref.version}],
        "ports": [{"containerPort": KSERVE_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": ready_path, "port": KSERVE_PORT}, "periodSeconds": 5,
                           "failureThreshold": 3},
        "resources": resources,
    }
    predictor: dict = {"minReplicas": min_replicas, "containers": [container]}
    if max_replicas is not None:
        predictor["maxReplicas"] = max_replicas
    if service_account:
        predictor["serviceAccountName"] = service_account  # its S3 credentials reach the storage initializer
    metadata: dict = {"name": name or _dns_name(model),
                      "labels": {"app.kubernetes.io/managed-by": "inferneo"},
                      "annotations": {"inferneo.ai/artifact": ref.source, "inferneo.ai/version": ref.version,
                                      "inferneo.ai/target": chosen}}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": metadata,
            "spec": {"predictor": predictor}}


def write_kserve(artifact: str, out: Optional[Path] = None, **options) -> dict:
    """Write (or return, when `out` is None) the InferenceService YAML for an s3:// artifact."""
    ref = open_artifact(artifact)
    manifest = kserve_manifest(ref, **options)
    text = (f"# Written by inferneo {__version__} (`inferneo deploy kserve`)\n"
            + yaml.safe_dump(manifest, sort_keys=False))
    if out is not None:
        out = Path(out)
        if out.is_dir():
            out = out / f"{manifest['metadata']['name']}.yaml"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    return {"ok": True, "engine": "kserve", "output": str(out) if out else None, "model": ref.name,
            "storage_uri": ref.s3_uri, "name": manifest["metadata"]["name"], "yaml": text}
