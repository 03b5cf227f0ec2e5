"""`inferneo deploy triton|lmi|kserve`: bundles checked against each engine's documented layout, and their
entry points run with the engine's own request shapes (no Triton server or LMI container here: the test
builds Triton-shaped request objects and DJL Input/Output stand-ins)."""
from __future__ import annotations

import functools
import importlib.util
import json
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import run_cli

PROMPTS = ["The quick brown fox", "Hello world, this is"]


@pytest.fixture(scope="module")
def artifact(tiny_artifact):
    return tiny_artifact("llama")


@pytest.fixture(scope="module")
def reference(artifact):
    """Greedy completions straight from the runtime, for comparison."""
    import inferneo_runtime

    with inferneo_runtime.load(artifact, target="onnx") as model:
        return {p: model.generate(p, max_new_tokens=8) for p in PROMPTS}


def _deploy(*args) -> dict:
    r = run_cli("deploy", *args, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def _load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- Triton ---------------------------------------------------------------------------------------------
@functools.cache
def _model_config_pb2():
    """tritonclient's ModelConfig proto module, loaded on its own: importing the `tritonclient.grpc` package also
    registers Triton's `inference.*` gRPC service messages, which KServe registers too under another file name,
    and protobuf's default pool refuses the second (so kserve could no longer be imported in this process)."""
    import importlib.util

    spec = importlib.util.find_spec("tritonclient")
    if spec is None:
        pytest.skip("tritonclient (in inferneo[test]) parses config.pbtxt")
    path = Path(spec.submodule_search_locations[0]) / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _parse_config(path: Path):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), _model_config_pb2().ModelConfig())


def test_triton_repository_layout_and_config(artifact, tmp_path):
    summary = _deploy("triton", str(artifact), str(tmp_path / "repo"))
    model_dir = tmp_path / "repo" / "tiny-llama"
    assert summary["model"] == "tiny-llama" and summary["target"] == "onnx"
    assert sorted(summary["files"]) == ["tiny-llama/1/model.py", "tiny-llama/config.pbtxt"]
    # the artifact travels inside the version folder and still verifies
    from inferneo_runtime.artifact import verify_artifact
    from inferneo_runtime.manifest import read_manifest

    copied = model_dir / "1" / "artifact"
    verify_artifact(copied, read_manifest(copied), ["onnx"])

    config = _parse_config(model_dir / "config.pbtxt")
    pb = _model_config_pb2()

    assert config.name == "tiny-llama" and config.backend == "python" and config.max_batch_size == 0
    assert config.model_transaction_policy.decoupled  # streaming responses
    inputs = {i.name: i for i in config.input}
    assert inputs["text_input"].data_type == pb.TYPE_STRING and not inputs["text_input"].optional
    assert list(inputs["text_input"].dims) == [1]
    assert inputs["max_tokens"].data_type == pb.TYPE_INT32 and inputs["max_tokens"].optional
    assert inputs["stream"].data_type == pb.TYPE_BOOL and inputs["temperature"].data_type == pb.TYPE_FP32
    outputs = {o.name: o for o in config.output}
    assert outputs["text_output"].data_type == pb.TYPE_STRING and list(outputs["text_output"].dims) == [-1]
    assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    assert config.parameters["artifact"].string_value == "artifact"
    assert config.parameters["target"].string_value == "onnx"

    # a second model goes beside the first; the same one again needs --force
    r = run_cli("deploy", "triton", str(artifact), str(tmp_path / "repo"))
    assert r.returncode == 2 and "--force" in r.stderr
    assert run_cli("deploy", "triton", str(artifact), str(tmp_path / "repo"), "--force", "--device", "cuda",
                   "--instances", "2").returncode == 0
    config = _parse_config(model_dir / "config.pbtxt")
    assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU and config.instance_group[0].count == 2


class _Tensor:
    """pb_utils.Tensor: a name and a numpy array."""

    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class _Response:
    def __init__(self, output_tensors=None, error=None):
        self.output_tensors, self.error = output_tensors or [], error

    def output(self, name):
        return next(t.as_numpy() for t in self.output_tensors if t.name() == name)


class _Error:
    def __init__(self, message):
        self._message = message

    def message(self):
        return self._message


class _Sender:
    """InferenceResponseSender: collects (response, flags); `done` once the final flag is sent."""

    def __init__(self, final_flag):
        self.final_flag, self.sent, self.done = final_flag, [], threading.Event()

    def send(self, response=None, flags=0):
        assert not self.done.is_set(), "a response after the final one"
        self.sent.append((response, flags))
        if flags & self.final_flag:
            self.done.set()


class _Request:
    def __init__(self, final_flag, cancelled=False, **inputs):
        self.inputs = {k: _Tensor(k, v) for k, v in inputs.items()}
        self.sender = _Sender(final_flag)
        self.cancelled = cancelled

    def get_response_sender(self):
        return self.sender

    def is_cancelled(self):
        return self.cancelled


class _CancelledAfter(_Request):
    """A request whose client goes away once the model has checked it `n` times (once per generated token)."""

    def __init__(self, n, final_flag, **inputs):
        super().__init__(final_flag, **inputs)
        self.n, self.checks = n, 0

    def is_cancelled(self):
        self.checks += 1
        return self.checks > self.n


def _fake_pb_utils():
    pb = types.ModuleType("triton_python_backend_utils")
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    pb.Tensor, pb.InferenceResponse, pb.TritonError = _Tensor, _Response, _Error
    pb.TritonModelException = RuntimeError
    pb.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    pb.using_decoupled_model_transaction_policy = lambda cfg: bool(
        cfg.get("model_transaction_policy", {}).get("decoupled"))
    return pb


def _text(response) -> str:
    return b"".join(response.output("text_output").tolist()).decode()


def test_triton_model_py_executes_triton_shaped_requests(artifact, reference, tmp_path, monkeypatch):
    _deploy("triton", str(artifact), str(tmp_path / "repo"))
    model_dir = tmp_path / "repo" / "tiny-llama"
    config = _parse_config(model_dir / "config.pbtxt")
    from google.protobuf import json_format

    pb = _fake_pb_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    module = _load_module(model_dir / "1" / "model.py", "triton_bundle_model")
    model = module.TritonPythonModel()
    # what Triton passes: the model config as JSON (proto field names), the model's folder and version
    model.initialize({"model_config": json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True)),
                      "model_repository": str(model_dir), "model_version": "1", "model_name": "tiny-llama",
                      "model_instance_kind": "CPU", "model_instance_name": "tiny-llama_0",
                      "model_instance_device_id": "0"})
    try:
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        whole = _Request(final, text_input=np.array([PROMPTS[0].encode()], dtype=object),
                         max_tokens=np.array([8], dtype=np.int32))
        streamed = _Request(final, text_input=np.array([PROMPTS[1].encode()], dtype=object),
                            max_tokens=np.array([8], dtype=np.int32), stream=np.array([True]))
        json_params = _Request(final, text_input=np.array([PROMPTS[0].encode()], dtype=object),
                               sampling_parameters=np.array([json.dumps({"max_tokens": 8, "temperature": 0}).encode()],
                                                            dtype=object))
        missing = _Request(final, max_tokens=np.array([8], dtype=np.int32))
        too_long = _Request(final, text_input=np.array([PROMPTS[0].encode()], dtype=object),
                            max_tokens=np.array([100000], dtype=np.int32))
        cancelled = _Request(final, cancelled=True, text_input=np.array([PROMPTS[0].encode()], dtype=object),
                             max_tokens=np.array([64], dtype=np.int32))
        batch = [whole, streamed, json_params, missing, too_long, cancelled]
        assert model.execute(batch) is None  # decoupled: answers go through the senders
        for r in batch:
            assert r.sender.done.wait(30), "no final response"

        (response, flags), = whole.sender.sent
        assert flags == final and response.error is None
        assert _text(response) == reference[PROMPTS[0]].text
        assert response.output("output_ids").tolist() == reference[PROMPTS[0]].token_ids
        assert response.output("finish_reason").tolist() == [reference[PROMPTS[0]].finish_reason.encode()]

        chunks = streamed.sender.sent
        assert len(chunks) > 1 and all(f == 0 for _, f in chunks[:-1]) and chunks[-1][1] == final
        assert "".join(_text(r) for r, _ in chunks) == reference[PROMPTS[1]].text

        assert _text(json_params.sender.sent[-1][0]) == reference[PROMPTS[0]].text
        for bad, words in ((missing, "text_input"), (too_long, "max_sequence")):
            (response, flags), = bad.sender.sent
            assert flags == final and words in response.error.message()
        # a cancelled request ends with a bare final flag and frees its slot
        assert cancelled.sender.sent == [(None, final)]
        assert model.pending == {}

        # cancelled mid-generation (Triton's client goes away after two tokens): the engine stops stepping it.
        # Alone in the engine, each decode step is one of its tokens; uncancelled it would run all 8.
        assert reference[PROMPTS[0]].finish_reason == "length" and len(reference[PROMPTS[0]].token_ids) == 8
        driver = model.loaded.driver
        leaving = _CancelledAfter(2, final, text_input=np.array([PROMPTS[0].encode()], dtype=object),
                                  max_tokens=np.array([8], dtype=np.int32))
        steps_before = driver.steps
        model.execute([leaving])
        assert leaving.sender.done.wait(30), "no final response"
        assert leaving.sender.sent == [(None, final)]  # no text: it was not finished
        assert leaving.checks >= 2 and driver.steps - steps_before <= 4, driver.steps - steps_before
        assert driver.idle and model.pending == {}
    finally:
        model.finalize()


# -- LMI ------------------------------------------------------------------------------------------------
def _push(artifact: Path, uri: str) -> None:
    from inferneo_build.push import push

    push(artifact, uri, progress=False)


class _DJLInput:
    def __init__(self, properties, body=None):
        self._properties, self._body = properties, body

    def get_properties(self):
        return self._properties

    def is_empty(self):
        return self._body is None

    def get_batches(self):
        return [self]

    def get_as_json(self):
        return self._body


class _DJLOutput:
    def __init__(self):
        self.items, self.code, self.streams = {}, 200, []

    def add_as_json(self, value, batch_index=0):
        self.items[batch_index] = value

    def add_stream_content(self, stream, output_formatter=None):
        self.streams.append(stream)

    def set_code(self, code):
        self.code = code


def test_lmi_serving_properties_for_the_s3_prefix(artifact, reference, tmp_path, s3env, client, bucket, monkeypatch):
    uri = f"s3://{bucket}/models/tiny-llama"
    _push(artifact, uri)
    summary = _deploy("lmi", uri, str(tmp_path / "lmi"))
    out = tmp_path / "lmi"
    assert sorted(summary["files"]) == ["model.py", "requirements.txt", "serving.properties"]
    from inferneo_build.deploy import parse_properties

    props = parse_properties((out / "serving.properties").read_text())
    version = json.loads(client.get_object(Bucket=bucket, Key="models/tiny-llama/LATEST")["Body"].read())["version"]
    assert props["engine"] == "Python" and props["option.entryPoint"] == "model.py"
    # LMI takes the S3 URI of the object prefix holding the model artifacts (pinned to this version)
    assert props["option.model_id"] == f"s3://{bucket}/models/tiny-llama/versions/{version}/"
    prefix = f"models/tiny-llama/versions/{version}/"
    keys = {o["Key"][len(prefix):] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]}
    assert {"config.json", "tokenizer_config.json", "tokenizer.json", "inferneo.json"} <= keys  # LMI's [Required]
    assert "s3" in (out / "requirements.txt").read_text()

    # DJL hands the handler the properties without their "option." prefix
    djl = types.ModuleType("djl_python")
    djl.Input, djl.Output = _DJLInput, _DJLOutput
    monkeypatch.setitem(sys.modules, "djl_python", djl)
    handler = _load_module(out / "model.py", "lmi_bundle_model")
    properties = {k.removeprefix("option."): v for k, v in props.items()}
    try:
        assert handler.handle(_DJLInput(properties)) is None  # load-time call: fetch, load, warm up
        answer = handler.handle(_DJLInput(properties, {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 8}}))
        assert answer.items[0]["generated_text"] == reference[PROMPTS[0]].text
        streamed = handler.handle(_DJLInput(properties, {"inputs": PROMPTS[1], "stream": True,
                                                         "parameters": {"max_new_tokens": 8}}))
        lines = [json.loads(line) for line in streamed.streams[0]]
        assert lines[-1]["generated_text"] == reference[PROMPTS[1]].text
        bad = handler.handle(_DJLInput(properties, {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 10**6}}))
        assert bad.code == 400 and "max_sequence" in bad.items[0]["error"]
    finally:
        if handler._model is not None:
            handler._model.close()


def test_lmi_local_artifact_becomes_the_model_directory(artifact, tmp_path):
    summary = _deploy("lmi", str(artifact), str(tmp_path / "lmi"))
    out = tmp_path / "lmi"
    assert {"serving.properties", "model.py", "config.json", "tokenizer_config.json", "inferneo.json"} <= set(
        summary["files"])
    assert "option.model_id" not in (out / "serving.properties").read_text()  # DJL serves the directory itself
    from inferneo_runtime.artifact import verify_artifact
    from inferneo_runtime.manifest import read_manifest

    verify_artifact(out, read_manifest(out), ["onnx"])


def _installed_by(requirement_line: str) -> set[str]:
    """The distributions `pip install -r` of this one inferneo requirement brings in: inferneo's own declared
    requirements whose markers hold for the requested extras (pip's reading of them)."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    req = Requirement(requirement_line)
    assert req.name == "inferneo"
    names = set()
    for line in requires("inferneo") or []:
        dep = Requirement(line)
        if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in req.extras or {""}):
            names.add(dep.name.lower())
    return names


@pytest.mark.parametrize("target, needs", [("onnx", "onnxruntime"), ("torchscript", "torch")])
def test_lmi_requirements_install_the_targets_runtime(artifact, tmp_path, target, needs):
    # the base package names no onnxruntime (the cpu / gpu extras do), so an onnx bundle's requirements.txt
    # must pick one, or the LMI container cannot load the target
    _deploy("lmi", str(artifact), str(tmp_path / "lmi"), "--target", target)
    (line,) = (tmp_path / "lmi" / "requirements.txt").read_text().split()
    assert needs in _installed_by(line), line


# -- KServe manifest ------------------------------------------------------------------------------------
def test_kserve_inference_service_points_at_the_s3_artifact(artifact, tmp_path, s3env, client, bucket):
    uri = f"s3://{bucket}/models/tiny-llama"
    _push(artifact, uri)
    version = json.loads(client.get_object(Bucket=bucket, Key="models/tiny-llama/LATEST")["Body"].read())["version"]
    r = run_cli("deploy", "kserve", uri, "--image", "registry.example/inferneo:0.1.0", "--service-account", "s3-reader",
                "--max-replicas", "3")
    assert r.returncode == 0, r.stderr
    isvc = yaml.safe_load(r.stdout)
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    assert isvc["metadata"]["name"] == "tiny-llama"
    predictor = isvc["spec"]["predictor"]
    assert predictor["serviceAccountName"] == "s3-reader" and predictor["maxReplicas"] == 3
    container, = predictor["containers"]
    assert container["name"] == "kserve-container"  # the container the storage initializer fills /mnt/models for
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["STORAGE_URI"] == f"s3://{bucket}/models/tiny-llama/versions/{version}"
    assert container["args"][container["args"].index("--artifact") + 1] == "/mnt/models"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v1/models/tiny-llama"

    written = _deploy("kserve", uri, str(tmp_path), "--image", "x:1", "--server", "openai")
    isvc = yaml.safe_load(Path(written["output"]).read_text())
    container, = isvc["spec"]["predictor"]["containers"]
    assert container["command"] == ["inferneo", "serve"] and container["readinessProbe"]["httpGet"]["path"] == "/ready"



def test_kserve_inference_service_fields_are_ones_the_sdk_knows(artifact, tmp_path, s3env, client, bucket):
    # every field is one KServe's InferenceService models (and Kubernetes') know
    kserve = pytest.importorskip("kserve", reason="KServe's SDK is not installed (pip install 'inferneo[kserve]')")
    k8s = pytest.importorskip("kubernetes.client", reason="the kubernetes client is not installed (KServe's SDK needs it)")
    uri = f"s3://{bucket}/models/tiny-llama"
    _push(artifact, uri)
    isvc = yaml.safe_load(Path(_deploy("kserve", uri, str(tmp_path), "--image", "x:1")["output"]).read_text())
    container, = isvc["spec"]["predictor"]["containers"]
    known = lambda model: set(model.attribute_map.values())  # noqa: E731 - JSON field names of an OpenAPI model
    assert set(isvc) <= known(kserve.V1beta1InferenceService)
    assert set(isvc["spec"]) <= known(kserve.V1beta1InferenceServiceSpec)
    assert set(isvc["spec"]["predictor"]) <= known(kserve.V1beta1PredictorSpec)
    assert set(isvc["metadata"]) <= known(k8s.V1ObjectMeta)
    assert set(container) <= known(k8s.V1Container)
    assert set(container["readinessProbe"]) <= known(k8s.V1Probe)


def test_kserve_needs_an_s3_artifact(artifact):
    r = run_cli("deploy", "kserve", str(artifact), "--image", "x:1")
    assert r.returncode == 2 and "inferneo push" in r.stderr


def test_lmi_do_sample_samples(artifact, tmp_path, monkeypatch):
    """LMI's (TGI's) "do_sample": true draws from the distribution (temperature 1 unless given), as the schema the
    handler documents says; false is greedy whatever the temperature."""
    import inferneo_runtime

    _deploy("lmi", str(artifact), str(tmp_path / "lmi"))
    djl = types.ModuleType("djl_python")
    djl.Input, djl.Output = _DJLInput, _DJLOutput
    monkeypatch.setitem(sys.modules, "djl_python", djl)
    handler = _load_module(tmp_path / "lmi" / "model.py", "lmi_do_sample_model")
    properties = {"engine": "Python", "entryPoint": "model.py", "inferneo_target": "onnx",
                  "model_dir": str(tmp_path / "lmi")}  # DJL gives the handler the model directory it serves

    def ask(**parameters) -> str:
        body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 12, **parameters}}
        return handler.handle(_DJLInput(properties, body)).items[0]["generated_text"]

    with inferneo_runtime.load(artifact, target="onnx") as model:
        sampled = {seed: model.generate(PROMPTS[0], max_new_tokens=12, temperature=1.0, seed=seed).text
                   for seed in (1, 2, 3)}
        greedy = model.generate(PROMPTS[0], max_new_tokens=12).text
    assert set(sampled.values()) != {greedy}
    try:
        assert handler.handle(_DJLInput(properties)) is None
        assert {seed: ask(do_sample=True, seed=seed) for seed in sampled} == sampled
        assert ask(do_sample=False, temperature=1.0, seed=1) == ask() == greedy
    finally:
        if handler._model is not None:
            handler._model.close()


def test_serve_ray_refuses_a_bad_replicas_value_before_starting_ray(artifact):
    """`inferneo serve --ray --replicas abc` is bad input (exit 2, naming the value), said before any Ray cluster is
    started or even imported (here Ray is blocked, so reaching it would fail otherwise)."""
    import subprocess
    import textwrap

    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "ray":
                    raise ImportError(f"{{name}} is blocked in this test", name="ray")
        sys.meta_path.insert(0, Block())
        from inferneo_runtime.cli import main
        sys.argv = ["inferneo", "serve", {str(artifact)!r}, "--ray", "--replicas", "abc"]
        main()
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "'abc'" in r.stderr, (r.returncode, r.stdout + r.stderr)
    r = subprocess.run([sys.executable, "-c", script.replace('"--replicas", "abc"', '"--replicas", "2"')],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 5 and "inferneo[ray]" in r.stderr, (r.returncode, r.stdout + r.stderr)  # the extra to install
