"""Encoder builds (tasks feature-extraction and text-classification): BERT-family checkpoints exported to
ONNX (torch.onnx.export of the HF encoder) and TorchScript (torch.jit.trace), validated on the cosine
similarity of their outputs to the PyTorch reference's, through the same runtime code that serves them
(`inferneo_runtime.embedding`).

Feature extraction returns the encoder's last hidden states; pooling and normalization are applied by the
runtime as the manifest records them: from the sentence-transformers files next to the checkpoint
(modules.json, <pooling>/config.json, sentence_bert_config.json), unless the recipe's `encoder` section
overrides them. Text classification returns the checkpoint's classification-head logits.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from inferneo_runtime.embedding import EmbeddingModel, make_runner
from inferneo_runtime.manifest import (EncoderGolden, EncoderInfo, GenerationDefaults, IOSignature, ModelDims,
                                       ShapeBounds, TargetEntry, TensorSpec, ValidationSummary)

from . import source as sources
from .architectures import UnsupportedArchitecture
from .exporters import ExportResult, exporter_for
from .exporters.encoder import encoder_module
from .pipeline import reference_label
from .recipe import Recipe
from .validate import EncoderReport, compare_encoder

# model_type -> whether the encoder takes token_type_ids. Only BERT is exercised by the test suite; the others
# share its HF interface (AutoModel / AutoModelForSequenceClassification with input_ids + attention_mask).
ENCODERS: dict[str, bool] = {"bert": True, "electra": True, "roberta": False, "xlm-roberta": False,
                             "distilbert": False, "mpnet": False}
# model types whose position ids count from padding_idx + 1 (transformers' create_position_ids_from_input_ids)
_PADDING_IDX_POSITIONS = {"roberta", "xlm-roberta", "mpnet"}
_POOLING_KEYS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                 "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len"}
_ST_MODULES = {"sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
               "sentence_transformers.models.Normalize"}
_ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


@dataclass(frozen=True)
class EncoderSpec:
    task: str
    model_type: str
    dims: ModelDims
    output: str  # "embedding" | "logits"
    pooling: Optional[str]
    normalize: bool
    max_length: int
    dim: int
    labels: Optional[list[str]]
    token_type_ids: bool
    st_files: tuple[str, ...]  # sentence-transformers config files to copy into the artifact (relative paths)

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask"] + (["token_type_ids"] if self.token_type_ids else [])

    @property
    def output_name(self) -> str:
        return "last_hidden_state" if self.output == "embedding" else "logits"

    def info(self, goldens: list[EncoderGolden]) -> EncoderInfo:
        return EncoderInfo(output=self.output, pooling=self.pooling, normalize=self.normalize,
                           max_length=self.max_length, dim=self.dim, labels=self.labels, goldens=goldens)

    def io(self) -> IOSignature:
        out_shape = ["batch", "sequence", self.dims.hidden] if self.output == "embedding" else ["batch", self.dim]
        return IOSignature(inputs=[TensorSpec(name=n, dtype="int64", shape=["batch", "sequence"]) for n in self.input_names],
                           outputs=[TensorSpec(name=self.output_name, dtype="float32", shape=out_shape)], kv_layout="none")

    def load_model(self, directory: Path, trust_remote_code: bool = False, use_safetensors: Optional[bool] = True):
        """`source.load_options(recipe)` gives the last two: safe unless the recipe opted in."""
        import torch
        from transformers import AutoModel, AutoModelForSequenceClassification

        cls = AutoModel if self.output == "embedding" else AutoModelForSequenceClassification
        # eager attention traces and exports as plain ops on every torch version
        model = cls.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager",
                                    trust_remote_code=trust_remote_code, use_safetensors=use_safetensors)
        return model.eval()


def _sentence_transformers_config(directory: Path) -> tuple[Optional[str], bool, Optional[int], list[str]]:
    """(pooling, normalize, max_seq_length, files) from the sentence-transformers files; (None, False, None, [])
    when the checkpoint has none."""
    modules_path = directory / "modules.json"
    if not modules_path.is_file():
        return None, False, None, []
    files = [n for n in _ST_FILES if (directory / n).is_file()]
    modules = json.loads(modules_path.read_text(encoding="utf-8"))
    unsupported = sorted({m.get("type", "?") for m in modules} - _ST_MODULES)
    if unsupported:
        raise UnsupportedArchitecture(f"{modules_path}: sentence-transformers modules {', '.join(unsupported)} are not "
                                      f"supported; supported: {', '.join(sorted(_ST_MODULES))}")
    pooling = None
    for m in modules:
        if m["type"].endswith(".Pooling"):
            config_rel = f"{m['path']}/config.json"
            config = json.loads((directory / config_rel).read_text(encoding="utf-8"))
            modes = [mode for key, mode in _POOLING_KEYS.items() if config.get(key)]
            others = [k for k, v in config.items() if k.startswith("pooling_mode_") and v and k not in _POOLING_KEYS]
            if len(modes) != 1 or others:
                raise UnsupportedArchitecture(f"{directory / config_rel}: pooling {modes + others} is not supported; "
                                              f"exactly one of {', '.join(sorted(set(_POOLING_KEYS.values())))}")
            if config.get("include_prompt") is False:
                raise UnsupportedArchitecture(f"{directory / config_rel}: include_prompt=false is not supported")
            pooling = modes[0]
            files.append(config_rel)
    normalize = any(m["type"].endswith(".Normalize") for m in modules)
    max_seq = None
    bert_config = directory / "sentence_bert_config.json"
    if bert_config.is_file():
        max_seq = json.loads(bert_config.read_text(encoding="utf-8")).get("max_seq_length")
    return pooling, normalize, max_seq, files


def encoder_spec(config, recipe: Recipe, directory: Path) -> EncoderSpec:
    """Normalize the HF config + sentence-transformers files + recipe overrides (raises when unsupported)."""
    model_type = config.model_type
    if model_type not in ENCODERS:
        raise UnsupportedArchitecture(f"model_type {model_type!r} is not a supported encoder; supported: "
                                      f"{', '.join(sorted(ENCODERS))}")
    opts = recipe.encoder
    st_pooling, st_normalize, st_max, st_files = _sentence_transformers_config(directory)
    max_positions = int(config.max_position_embeddings)
    usable = max_positions
    if model_type in _PADDING_IDX_POSITIONS:  # position ids start after padding_idx: roberta-base's 514 hold 512 tokens
        padding_idx = config.pad_token_id if model_type != "mpnet" and config.pad_token_id is not None else 1
        usable -= int(padding_idx) + 1
    max_length = (opts.max_length if opts and opts.max_length else None) or st_max or usable
    if max_length > usable:
        raise UnsupportedArchitecture(f"encoder.max_length {max_length} exceeds the model's max_position_embeddings "
                                      f"{max_positions}" + (f" ({usable} tokens after padding_idx)"
                                                            if usable != max_positions else ""))
    heads = int(config.num_attention_heads)
    dims = ModelDims(model_type=model_type, family="encoder", num_layers=int(config.num_hidden_layers),
                     hidden=int(config.hidden_size), heads=heads, kv_heads=heads,
                     head_dim=int(config.hidden_size) // heads, vocab=int(config.vocab_size),
                     max_positions=max_positions)
    if recipe.task == "text-classification":
        heads_archs = [a for a in (config.architectures or []) if a.endswith("ForSequenceClassification")]
        if not heads_archs:
            raise UnsupportedArchitecture(f"{directory}: task text-classification needs a checkpoint with a sequence-"
                                          f"classification head; this one is {config.architectures or 'unknown'}")
        labels = [str(config.id2label[i]) for i in range(config.num_labels)]
        return EncoderSpec(task=recipe.task, model_type=model_type, dims=dims, output="logits", pooling=None,
                           normalize=False, max_length=max_length, dim=len(labels), labels=labels,
                           token_type_ids=ENCODERS[model_type], st_files=())
    pooling = opts.pooling if opts and opts.pooling != "auto" else (st_pooling or "mean")
    normalize = opts.normalize if opts and opts.normalize is not None else st_normalize
    return EncoderSpec(task=recipe.task, model_type=model_type, dims=dims, output="embedding", pooling=pooling,
                       normalize=normalize, max_length=max_length, dim=dims.hidden, labels=None,
                       token_type_ids=ENCODERS[model_type], st_files=tuple(st_files))


# -- reference and build ---------------------------------------------------------------------------------------
class _TorchRunner:
    """Runs the PyTorch model as an EmbeddingModel runner (used to tokenize and pool the reference)."""

    def __init__(self, model, spec: EncoderSpec):
        self.model, self.spec = model, spec

    def __call__(self, feeds):
        import torch

        with torch.no_grad():
            return encoder_module(self.model, self.spec)(*[torch.from_numpy(feeds[n]) for n in self.spec.input_names]).numpy()


class EncoderTask:
    """The encoder task for `build_task`: the PyTorch model's outputs (pooled as the runtime pools them) for the
    validation texts are the reference; every target must reach the recipe's cosine similarity to them."""

    def __init__(self, recipe: Recipe, checkpoint, spec: EncoderSpec, model):
        self.recipe, self.checkpoint, self.spec, self.model = recipe, checkpoint, spec, model
        self.bounds = ShapeBounds(max_batch=recipe.shapes.max_batch, max_sequence=spec.max_length)
        self.texts = list(recipe.validation.prompts)

    def stage(self, staging: Path, progress) -> list[Path]:
        spec = self.spec
        root_files = sources.copy_root_files(self.checkpoint, staging)
        for rel in spec.st_files:
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.checkpoint.directory / rel, dest)
            root_files.append(dest)
        with progress.step(f"reference outputs ({len(self.texts)} texts)"):
            scratch = TargetEntry(format="onnx", status="valid", io=spec.io(), shapes=self.bounds,
                                  validation=ValidationSummary(status="skipped"))
            reference_model = EmbeddingModel(staging, self.recipe.name, "pytorch", scratch, spec.info([]),
                                             _TorchRunner(self.model, spec), task=spec.task)
            self.reference = reference_model.forward(self.texts)
        return root_files

    def export(self, target, out_dir: Path) -> ExportResult:
        return exporter_for(target.format, getattr(target, "precision", "fp32"), task="encoder")(
            self.model, self.spec, target, out_dir)

    def validate(self, name: str, target, entry: TargetEntry, staging: Path) -> tuple[EncoderReport, dict]:
        spec = self.spec
        min_cosine = self.recipe.tolerance_for(target).cosine
        target_model = EmbeddingModel(staging, self.recipe.name, name, entry, spec.info([]),
                                      make_runner(staging, entry), task=spec.task)
        with target_model:
            report = compare_encoder(name, target_model.forward, self.texts, self.reference, min_cosine,
                                     precision=getattr(target, "precision", "fp32"),
                                     classification=spec.output == "logits")
        return report, {"validation": report.summary()}

    def describe(self, report: EncoderReport) -> str:
        return (f"{report.target}: min cosine similarity {report.min_cosine:.6f} (min {report.tolerance['cosine']:g}); "
                f"max-abs error {report.max_abs_error:.2e}")

    def close(self) -> None:
        pass

    def validation(self, reports: list[EncoderReport]) -> dict:
        spec = self.spec
        return {"reference": reference_label(self.checkpoint), "task": spec.task, "pooling": spec.pooling,
                "normalize": spec.normalize, "targets": [r.to_dict() for r in reports]}

    def manifest_fields(self) -> dict:
        goldens = [EncoderGolden(text=t, values=[round(float(v), 7) for v in row])
                   for t, row in zip(self.texts, self.reference)]
        return dict(architecture=self.spec.model_type, model=self.spec.dims,
                    generation=GenerationDefaults(pad_token_id=getattr(self.model.config, "pad_token_id", None)),
                    goldens=[], encoder=self.spec.info(goldens))
