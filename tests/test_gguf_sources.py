"""GGUF sources as users have them: Llama 3 (q/k rows permuted), Qwen2 (byte-level BPE, biases, tied head),
Mistral (written as "llama") and Gemma 2 (sentencepiece vocabulary, norms stored as 1 + w, sliding window) files
in F16, BF16, the legacy block types and Q4_K_M's Q4_K / Q6_K mix (tests/gguf_files.py writes them), built and
compared with transformers' own model and tokenizer loaded from the same file and with the model they were
written from; the int4 target on their grids; and the files transformers cannot convert, refused by name (exit 2,
nothing written)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import inferneo_runtime
from conftest import PROMPTS, run_cli, tiny_recipe_fields, write_recipe
from gguf_files import ALL_BF16, FAMILIES, LEGACY, Q4_0, Q4_K, Q4_K_M, Q6_K, Q8_0, T, pack_q4_k, pack_q6_k, write_gguf
from inferneo_runtime.generation import GenerationParams

# family -> (tensor types, hidden, intermediate): the k-quants need rows of 256 values
FILES = {"llama": (Q4_K_M, 256, 512), "qwen2": (LEGACY, 64, 128), "mistral": (ALL_BF16, 64, 128),
         "gemma2": (LEGACY, 64, 128),
         # every MatMul Q4_K, the head Q8_0: grids the int4 default (8-bit head) holds exactly
         "llama-q4k": ({"*": Q4_K, "output": Q8_0}, 256, 512)}


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    made = {}

    def get(family: str) -> Path:
        if family not in made:
            types, hidden, intermediate = FILES[family]
            folder = tmp_path_factory.mktemp(f"gguf-{family}")
            write_gguf(folder / f"tiny-{family}.gguf", family.split("-")[0], types, hidden=hidden,
                       intermediate=intermediate, reference=folder / "reference")
            made[family] = folder / f"tiny-{family}.gguf"
        return made[family]

    return get


@pytest.fixture(scope="module")
def gguf_artifact(gguf_file, tmp_path_factory):
    from inferneo_build import build
    from inferneo_build.recipe import Recipe

    built = {}

    def get(family: str, targets=("onnx",)) -> Path:
        key = (family, targets)
        if key not in built:
            out = tmp_path_factory.mktemp(f"art-gguf-{family}") / "artifact"
            fields = tiny_recipe_fields(Path("unused"), f"gguf-{family}", out, targets=(),
                                        source={"gguf": str(gguf_file(family))})
            # "onnx", or "onnx/int4": a format and its precision
            fields["targets"] = [dict(zip(("format", "precision"), t.split("/"))) for t in targets]
            built[key] = build(Recipe.model_validate(fields)).output
        return built[key]

    return get


def _transformers_from_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return tok, model


def _greedy(model, ids, n):
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_the_k_quant_packers_round_trip_through_gguf():
    """The test files' Q4_K / Q6_K blocks are what gguf (transformers' de-quantizer) reads back (checked inside
    the packers too): close to the input, as a 4-bit and a 6-bit grid are."""
    from gguf import quants

    x = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32)
    for pack, qtype, bound in ((pack_q4_k, Q4_K, 0.25), (pack_q6_k, Q6_K, 0.08)):
        packed = pack(x)
        assert packed.shape == (4, 512 // 256 * {Q4_K: 144, Q6_K: 210}[qtype])
        assert 0 < np.abs(quants.dequantize(packed, qtype) - x).max() < bound


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma2"])
def test_greedy_and_tokenizer_match_transformers_from_the_same_gguf(family, gguf_file, gguf_artifact):
    path, artifact = gguf_file(family), gguf_artifact(family)
    tok, reference = _transformers_from_gguf(path)
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(path.parent / "reference", dtype=torch.float32).eval()
    fam = FAMILIES[family]
    manifest = json.loads((artifact / "inferneo.json").read_text())
    assert manifest["source"]["kind"] == "gguf"
    assert manifest["architecture"] == fam.get("loads_as", fam["config"]["model_type"])
    # EOS as the file declares it: transformers 4.57's Llama converter made the BOS token the EOS too
    assert manifest["generation"]["eos_token_ids"] == [fam["eos"]]
    with inferneo_runtime.load(artifact, target="onnx") as model:
        assert model.tokenizer.eos_id == fam["eos"]
        varied = set()
        for prompt in PROMPTS:
            ids = model.tokenizer.encode(prompt)
            assert ids == tok(prompt)["input_ids"], (family, prompt)
            assert (ids[0] == fam["bos"]) is fam["add_bos"]  # BOS prepended where the file says so
            out = model.generate_ids([ids], GenerationParams(max_new_tokens=12, ignore_eos=True))[0].token_ids
            assert out == _greedy(reference, ids, 12), (family, prompt)
            # and the model the file was written from (its weights as the file holds them): transformers' loader
            # undid llama's q/k permutation and Gemma's 1 + w norms, and named every tensor right
            assert out == _greedy(original, ids, 12), (family, prompt)
            varied |= set(out)
        assert len(varied) > 6  # the weights' scale gives varied text, so the comparison means something


def test_int4_target_from_q4_k_blocks(gguf_artifact):
    """Q4_K blocks are affine on sub-blocks of 32 (d * sc * q - dmin * m), so the int4 default (`affine`, 8-bit
    head) holds every MatMul's grid and the Q8_0 head's exactly (the block tests below); what is left is the
    kernel's int8 activations."""
    artifact = gguf_artifact("llama-q4k", targets=("onnx", "onnx/int4"))
    target = json.loads((artifact / "inferneo.json").read_text())["targets"]["onnx-int4"]
    assert target["status"] == "valid" and target["validation"]["status"] == "passed", target["validation"]
    # 2 layers x (qkv, o, gate-up, down) and the head: every one quantized, the head at 8 bits
    assert target["toolchain"]["quantized_matmuls"] == "9 of 9: 8 at 4 bits, 1 at 8 bits"
    assert "float32_matmuls" not in target["toolchain"]
    assert target["validation"]["top1_agreement"] >= 0.85


def test_int4_target_from_a_q4_k_m_mix(gguf_artifact):
    """Q4_K_M keeps attn_v, ffn_down and the head in Q6_K, whose 64 levels 4 bits re-round (top-1 0.70 on this
    model, a build that failed closed): the MatMuls that hold them (the packed q/k/v, down) go to 8-bit affine
    blocks, o and gate-up stay 4-bit, and the build validates."""
    artifact = gguf_artifact("llama", targets=("onnx", "onnx/int4"))
    target = json.loads((artifact / "inferneo.json").read_text())["targets"]["onnx-int4"]
    assert target["status"] == "valid" and target["validation"]["status"] == "passed", target["validation"]
    assert target["toolchain"]["quantized_matmuls"] == "9 of 9: 4 at 4 bits, 5 at 8 bits"
    assert "bits=8 where a mostly 4-bit source holds more bits" in target["toolchain"]["quantization"]
    assert target["validation"]["top1_agreement"] >= 0.85


@pytest.mark.parametrize("qtype,grid", [(Q4_0, "4-bit"), (Q4_K, "4-bit"), (Q6_K, "finer"), (Q8_0, "finer"),
                                        ("bf16", "float"), ("f32", "float")])
def test_source_grid_tells_what_a_weight_was_stored_in(qtype, grid):
    """What the int4 target reads off the weights to keep a 4-bit file's finer tensors at 8 bits: float weights
    (even rounded to bfloat16) are on no grid, Q6_K's and Q8_0's only on grids finer than 16 levels."""
    from gguf import quants

    from inferneo_build.exporters.nbits import source_grid

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((64, 512)) * 0.05).astype(np.float32)
    if qtype == "bf16":
        w = torch.from_numpy(x).bfloat16().float().numpy()
    elif qtype == "f32":
        w = x
    elif qtype in (Q4_0, Q8_0):
        w = quants.dequantize(quants.quantize(x, qtype), qtype)
    else:
        w = quants.dequantize(pack_q4_k(x) if qtype == Q4_K else pack_q6_k(x), qtype)
    assert source_grid(w) == grid
    if grid == "4-bit":  # a packed q/k/v whose v rows are Q6_K (Q4_K_M) is finer as a whole
        v = quants.dequantize(pack_q6_k(x[:16]), Q6_K)
        assert source_grid(np.concatenate([w, v])) == "finer"


def _grid_source(qtype, rng) -> np.ndarray:
    """Weights as a GGUF of `qtype` de-quantizes them; sub-blocks of very different ranges, so Q4_K's 6-bit
    scales round up and many of its blocks use fewer than all 16 levels (as llama.cpp's search often picks)."""
    from gguf import quants

    ranges = np.repeat(rng.uniform(0.02, 1.0, (64, 16)), 32, axis=1)  # one per sub-block of 32
    x = (rng.standard_normal((64, 512)) * ranges).astype(np.float32)
    packed = pack_q4_k(x) if qtype == Q4_K else quants.quantize(x, qtype)
    return quants.dequantize(packed, qtype)


@pytest.mark.parametrize("qtype", [Q4_0, Q4_K])
def test_affine_keeps_q4_0_and_q4_k_grids_exactly(qtype):
    """A Q4_0 block is d * (q - 8) and rarely uses both q = 0 and 15; a Q4_K sub-block is d * sc * q - dmin * m:
    `affine` re-rounded every block whose levels did not span all 16 (44% of Q4_0's were exact)."""
    from inferneo_build.exporters.nbits import affine_blocks

    w = _grid_source(qtype, np.random.default_rng(1))
    blocks = w.reshape(64, -1, 32)
    lo, step = blocks.min(-1, keepdims=True), (blocks.max(-1, keepdims=True) - blocks.min(-1, keepdims=True)) / 15
    fixed_grid = lo + np.round((blocks - lo) / step) * step  # [min, max] in 15 steps, what `affine` did
    assert (np.abs(fixed_grid - blocks).max(-1) > 1e-4).mean() > 0.1  # the data has blocks that grid misses
    for bits in (4, 8):
        got = affine_blocks(w, 32, bits).dequantized()
        assert np.abs(got - w).max() <= 1e-6 * np.abs(w).max(), (qtype, bits)


def test_affine_re_rounds_what_4_bits_cannot_hold():
    """Q6_K and Q8_0 have more levels than 4 bits: re-rounded (not silently called exact); 8 bits hold Q8_0."""
    from gguf import quants

    from inferneo_build.exporters.nbits import affine_blocks

    x = np.random.default_rng(2).standard_normal((32, 256)).astype(np.float32)
    w = quants.dequantize(quants.quantize(x, Q8_0), Q8_0)
    assert np.abs(affine_blocks(w, 32, 4).dequantized() - w).max() > 0.05
    assert np.abs(affine_blocks(w, 32, 8).dequantized() - w).max() <= 1e-6 * np.abs(w).max()


def _fails(tmp_path, gguf, cli: bool, *needles):
    """The build of `gguf` fails with exit code 2, naming the file and `needles`, and writes nothing (through the
    CLI once: its subprocess costs seconds)."""
    from inferneo_build import build
    from inferneo_build.recipe import Recipe
    from inferneo_build.source import SourceError

    out = tmp_path / "out"
    fields = tiny_recipe_fields(Path("unused"), "t", out, targets=("onnx",), source={"gguf": str(gguf)})
    if cli:
        r = run_cli("build", str(write_recipe(tmp_path / "r.yaml", **fields)), "--json")
        assert r.returncode == 2, r.stdout + r.stderr
        message = json.loads(r.stdout)["message"]
    else:
        with pytest.raises(SourceError) as e:
            build(Recipe.model_validate(fields))
        assert e.value.exit_code == 2
        message = str(e.value)
    for needle in (str(gguf), *needles):
        assert needle in message, message
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "staging" in p.name]


@pytest.mark.parametrize("case,kwargs,needles", [
    ("architecture", dict(arch="gptneox"), ("architecture 'gptneox'", "cannot be loaded from GGUF")),
    ("tensor type", dict(types=dict(LEGACY, attn_k=T.Q8_1)), ("Q8_1", "blk.0.attn_k.weight", "cannot de-quantize")),
    ("tokenizer", dict(tokenizer=False), ("no tokenizer metadata", "tokenizer.ggml.tokens")),
])
def test_what_transformers_cannot_convert_is_refused_by_name(tmp_path, case, kwargs, needles):
    """Before: a Q8_1 tensor exited 1 with gguf's bare NotImplementedError (no file named), and a file without
    tokenizer metadata said "tokens and scores need to be passed for a LLaMa tokenizer without merges"."""
    gguf = write_gguf(tmp_path / "model.gguf", "llama", **{"types": LEGACY, **kwargs})
    _fails(tmp_path, gguf, case == "architecture", *needles)
