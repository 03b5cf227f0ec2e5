"""Structured outputs (inferneo_runtime/structured.py): response_format json_schema / json_object and vLLM's
guided_* fields, against a real `inferneo serve` with the official openai client.

The checkpoint has random weights, so everything valid in the output is the grammar's doing: each schema's
output must parse and validate, each regex must fullmatch, each choice must be one of the choices.
"""
from __future__ import annotations

import json
import random
import re
import shutil

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

import inferneo_runtime  # noqa: E402
from conftest import free_port, serve_subprocess, tiny_recipe_fields  # noqa: E402

MESSAGES = [{"role": "user", "content": "Describe a tiny tokenizer as JSON."}]


# -- schemas, built programmatically ---------------------------------------------------------------------------
def _field(rng: random.Random, depth: int) -> dict:
    # bounded lengths and ranges: random weights must still finish within max_tokens
    kinds = ["string", "integer", "boolean", "enum", "array"] + (["object"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 6)}
    if kind == "integer":
        return {"type": "integer", "minimum": 0, "maximum": rng.choice([9, 99, 999])}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"type": "string", "enum": rng.sample(["red", "green", "blue", "cyan", "gold"], rng.randint(2, 4))}
    if kind == "array":
        return {"type": "array", "items": rng.choice([{"type": "boolean"}, {"type": "integer", "minimum": 0,
                                                                            "maximum": 9}]),
                "minItems": 1, "maxItems": 3}
    return _object(rng, depth + 1)


def _object(rng: random.Random, depth: int = 0) -> dict:
    names = rng.sample(["id", "name", "ok", "tags", "size", "kind", "meta", "n"], rng.randint(1, 3))
    props = {n: _field(rng, depth) for n in names}
    required = [n for n in names if rng.random() < 0.7] or names[:1]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


SCHEMAS = [_object(random.Random(i)) for i in range(20)]


# -- the server --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def artifact(tiny_checkpoint, tmp_path_factory):
    """The tiny llama with room for a chat prompt plus a JSON answer (the shared tiny artifact has 128 positions)."""
    from inferneo_build import build
    from inferneo_build.recipe import Recipe

    out = tmp_path_factory.mktemp("art-structured") / "tiny-structured"
    fields = tiny_recipe_fields(tiny_checkpoint("llama"), "tiny-structured", out, targets=("onnx",),
                                shapes={"max_batch": 4, "max_sequence": 512})
    return build(Recipe.model_validate(fields)).output


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("serve-structured")
    shutil.copytree(artifact, cwd / "artifacts" / "smollm2-135m")
    port = free_port()
    with serve_subprocess(["--port", str(port), "--log-level", "warning"], cwd, port) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _chat(client, stream: bool, **kwargs) -> tuple[str, str]:
    """(content, finish_reason) of one chat completion, streamed or not."""
    args = dict(model="tiny-structured", messages=MESSAGES, max_tokens=300, **kwargs)
    if not stream:
        r = client.chat.completions.create(**args)
        return r.choices[0].message.content, r.choices[0].finish_reason
    chunks = [c for c in client.chat.completions.create(stream=True, **args) if c.choices]
    return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason


# -- tests -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("i", range(len(SCHEMAS)))
def test_json_schema_outputs_validate(client, i):
    schema = SCHEMAS[i]
    fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}
    # half streamed, half not; sampled (seeded) and greedy alike
    sampling = {"temperature": 0} if i % 3 == 0 else {"temperature": 1.0, "seed": i}
    text, finish = _chat(client, stream=i % 2 == 1, response_format=fmt, **sampling)
    assert finish == "stop", (text, schema)
    jsonschema.validate(json.loads(text), schema)


def test_json_object(client):
    # json_object bounds nothing: random weights may write one string past max_tokens ("length"). Every output
    # that ends ("stop") must be a JSON object, and some must end.
    ended = 0
    for seed in range(4):
        text, finish = _chat(client, stream=seed % 2 == 1, response_format={"type": "json_object"}, temperature=1.0,
                             seed=seed)
        assert text.startswith("{") and finish in ("stop", "length"), (text, finish)
        if finish == "stop":
            assert isinstance(json.loads(text), dict)
            ended += 1
    assert ended


def test_guided_choice_both_endpoints(client):
    choices = ["positive", "negative", "neutral"]
    for seed in range(3):
        text, _ = _chat(client, stream=seed == 2, temperature=1.0, seed=seed, extra_body={"guided_choice": choices})
        assert text in choices
        r = client.completions.create(model="tiny-structured", prompt="The review was", max_tokens=20,
                                      temperature=1.0, seed=seed, extra_body={"guided_choice": choices})
        assert r.choices[0].text in choices and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("regex", [r"[0-9]{3}-[0-9]{4}", r"(yes|no)", r"[a-z]{2,5}@[a-z]{3}\.(com|org)",
                                   r"v[0-9]\.[0-9]{1,2}"])
def test_guided_regex(client, regex):
    r = client.completions.create(model="tiny-structured", prompt="Answer:", max_tokens=40, temperature=1.0, seed=7,
                                  extra_body={"guided_regex": regex})
    assert re.fullmatch(regex, r.choices[0].text), r.choices[0].text
    chunks = list(client.completions.create(model="tiny-structured", prompt="Answer:", max_tokens=40, stream=True,
                                            temperature=0, extra_body={"guided_regex": regex}))
    assert re.fullmatch(regex, "".join(c.choices[0].text for c in chunks if c.choices))


def test_guided_json_on_completions(client):
    schema = SCHEMAS[3]
    r = client.completions.create(model="tiny-structured", prompt="{", max_tokens=300, temperature=0,
                                  extra_body={"guided_json": schema})
    jsonschema.validate(json.loads(r.choices[0].text), schema)


def test_keys_come_in_the_schemas_order(client):
    """OpenAI's structured outputs write an object's keys in the order of the schema's `properties`."""
    keys = ["zeta", "mid", "alpha"]
    schema = {"type": "object", "properties": {k: {"type": "boolean"} for k in keys}, "required": keys,
              "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "ordered", "schema": schema, "strict": True}}
    for seed, stream in ((0, False), (1, True)):
        text, finish = _chat(client, stream=stream, response_format=fmt, temperature=1.0, seed=seed)
        assert finish == "stop" and list(json.loads(text)) == keys, text
    r = client.completions.create(model="tiny-structured", prompt="{", max_tokens=60, temperature=1.0, seed=2,
                                  extra_body={"guided_json": schema})
    assert list(json.loads(r.choices[0].text)) == keys, r.choices[0].text


def test_invalid_constraints_are_400s_naming_the_field(client):
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-structured", messages=MESSAGES, response_format=bad)
    assert "response_format" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-structured", prompt="x", extra_body={"guided_regex": "(unclosed"})
    assert "guided_regex" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-structured", messages=MESSAGES,
                                       response_format={"type": "xml"})
    assert "response_format" in str(e.value)


def test_python_api_and_speculation(artifact):
    """Model.generate takes the same options; a speculative engine leaves constrained requests unspeculated."""
    schema = SCHEMAS[5]
    with inferneo_runtime.load(artifact) as m:
        out = m.generate("{", max_new_tokens=300, guided_json=schema, speculative="ngram")
        jsonschema.validate(json.loads(out.text), schema)
        assert out.finish_reason == "stop"
        outs = [m.chat(MESSAGES, max_new_tokens=300, temperature=1.0, seed=s, response_format={"type": "json_object"})
                for s in range(4)]
        assert any(o.finish_reason == "stop" for o in outs)
        assert all(isinstance(json.loads(o.text), dict) for o in outs if o.finish_reason == "stop")
        assert "".join(m.stream("Pick:", max_new_tokens=20, guided_choice=["a1", "b2"])) in ("a1", "b2")


def test_concurrent_requests_batch_with_their_own_grammars(client):
    """Constrained and free requests decode in one batch (max_batch 4); each keeps its own grammar."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        if i % 4 == 3:  # a free request among the constrained ones
            r = client.completions.create(model="tiny-structured", prompt="free", max_tokens=30, temperature=1.0,
                                          seed=i, extra_body={"ignore_eos": True})
            return None, r.choices[0].text
        schema = SCHEMAS[i]
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}}
        return schema, _chat(client, stream=i % 2 == 0, response_format=fmt, temperature=1.0, seed=100 + i)[0]

    with ThreadPoolExecutor(4) as pool:
        for schema, text in pool.map(one, range(8)):
            if schema is not None:
                jsonschema.validate(json.loads(text), schema)


def test_mixed_batch_in_one_engine(artifact):
    from inferneo_runtime.sampling import SamplingParams
    from inferneo_runtime.structured import make_constraint

    constraint = make_constraint(guided_regex="[0-9]{4}")
    params = [SamplingParams(max_new_tokens=12, temperature=1.0, seed=i, constraint=constraint) if i % 2 == 0
              else SamplingParams(max_new_tokens=12, ignore_eos=True) for i in range(4)]
    with inferneo_runtime.load(artifact) as m:
        outs = m.generate_ids([m.encode("a b c")] * 4, params)
    assert all(re.fullmatch("[0-9]{4}", o.text) and o.finish_reason == "stop" for o in outs[0::2])
    assert all(len(o.token_ids) == 12 for o in outs[1::2])


def test_every_backend_and_lark_grammars(tiny_artifact):
    """The mask lives in the one generation loop, so TorchScript gets it as ONNX does; guided_grammar is Lark."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                              "maximum": 99}},
              "required": ["ok", "n"], "additionalProperties": False}
    lark = 'start: NAME "=" NUM\nNAME: /[a-z]{1,4}/\nNUM: /[0-9]{1,3}/'
    for target in ("onnx", "torchscript"):
        with inferneo_runtime.load(tiny_artifact("llama"), target=target) as m:
            out = m.generate("{", max_new_tokens=40, temperature=1.0, seed=1, guided_json=schema)
            jsonschema.validate(json.loads(out.text), schema)
            out = m.generate("x", max_new_tokens=20, guided_grammar=lark)
            assert re.fullmatch(r"[a-z]{1,4}=[0-9]{1,3}", out.text), out.text
