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
                             "distilbert": False, "mpnet": False, "modernbert": False,
                             # decoder backbones of embedding models: Qwen3-Embedding (causal, last-token pooling)
                             # and EmbeddingGemma (gemma3_text with use_bidirectional_attention)
                             "qwen3": False, "gemma3_text": False}
# decoder backbones: exported as embedders only (their sequence-classification heads pool inside transformers)
_EMBEDDING_ONLY = {"qwen3", "gemma3_text"}
# model types whose position ids count from padding_idx + 1 (transformers' create_position_ids_from_input_ids)
_PADDING_IDX_POSITIONS = {"roberta", "xlm-roberta", "mpnet"}
# sentence-transformers Pooling modes (its names -> the manifest's). ST >= 5 writes `pooling_mode`; older versions
# one boolean per mode (the legacy keys, in ST's order).
_POOLING_MODES = {"mean": "mean", "cls": "cls", "max": "max", "mean_sqrt_len_tokens": "mean_sqrt_len",
                  "weightedmean": "weightedmean", "lasttoken": "lasttoken"}
_LEGACY_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                        "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                        "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
# the module pipelines applied here, by class name: ST < 5 writes types as "sentence_transformers.models.Pooling",
# ST >= 5 as the defining module ("sentence_transformers.sentence_transformer.modules.pooling.Pooling")
# Transformer -> Pooling -> Dense* -> [Normalize]; Dense modules (EmbeddingGemma's two projections) are exported
# inside the target's graph, together with the pooling in front of them (see `EncoderSpec.dense`)
_ST_PIPELINE_TEXT = "Transformer -> Pooling [-> Dense ...] [-> Normalize]"
# sentence-transformers Dense activations (its config's fullname of the module) that the export applies
DENSE_ACTIVATIONS = {"torch.nn.modules.linear.Identity": "identity", "torch.nn.modules.activation.Tanh": "tanh",
                     "torch.nn.modules.activation.ReLU": "relu", "torch.nn.modules.activation.Sigmoid": "sigmoid",
                     "torch.nn.modules.activation.GELU": "gelu", "torch.nn.modules.activation.SiLU": "silu"}
_ST_FILES = ("modules.json", "config_sentence_transformers.json")
# the Transformer module's config, under the names ST has used for it (it reads the first that exists)
ST_TRANSFORMER_CONFIGS = ("sentence_bert_config.json", "sentence_roberta_config.json",
                           "sentence_distilbert_config.json", "sentence_camembert_config.json",
                           "sentence_albert_config.json", "sentence_xlm-roberta_config.json",
                           "sentence_xlnet_config.json")


@dataclass(frozen=True)
class DenseSpec:
    """One sentence-transformers Dense module: linear (weights from its folder's model.safetensors) + activation."""
    path: str  # the module's folder, relative to the checkpoint
    in_features: int
    out_features: int
    bias: bool
    activation: str  # a DENSE_ACTIVATIONS value

    def describe(self) -> str:
        return (f"Dense {self.in_features}->{self.out_features} ({self.activation}"
                f"{'' if self.bias else ', no bias'})")


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
    function_to_apply: Optional[str] = None  # see EncoderInfo: None unless it differs from softmax/one-logit sigmoid
    lowercase: Optional[bool] = None
    prompt: Optional[str] = None
    include_prompt: Optional[bool] = None
    prompts: Optional[dict[str, str]] = None
    # sentence-transformers Dense modules after the pooling: when there are any, the graph pools and projects
    # (output "sentence_embedding" [batch, dim]) and the runtime only normalizes
    dense: tuple[DenseSpec, ...] = ()
    source_dir: Optional[Path] = None  # where the Dense modules' weights are read from

    @property
    def pooled_in_graph(self) -> bool:
        return bool(self.dense)

    @property
    def graph_modules(self) -> Optional[list[str]]:
        if not self.dense:
            return None
        return [f"Pooling {self.pooling}"] + [d.describe() for d in self.dense]

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask"] + (["token_type_ids"] if self.token_type_ids else [])

    @property
    def output_name(self) -> str:
        if self.output != "embedding":
            return "logits"
        return "sentence_embedding" if self.pooled_in_graph else "last_hidden_state"

    def info(self, goldens: list[EncoderGolden]) -> EncoderInfo:
        return EncoderInfo(output=self.output, pooling=self.pooling, normalize=self.normalize,
                           max_length=self.max_length, dim=self.dim, labels=self.labels, goldens=goldens,
                           function_to_apply=self.function_to_apply, lowercase=self.lowercase, prompt=self.prompt,
                           include_prompt=self.include_prompt, graph_modules=self.graph_modules,
                           prompts=self.prompts)

    def io(self) -> IOSignature:
        token_states = self.output == "embedding" and not self.pooled_in_graph
        out_shape = ["batch", "sequence", self.dims.hidden] if token_states else ["batch", self.dim]
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


@dataclass(frozen=True)
class _STConfig:
    """What sentence-transformers' `encode` does around the encoder, read from its files."""
    pooling: str
    normalize: bool
    max_seq_length: Optional[int]
    lowercase: bool
    prompt: Optional[str]  # the default prompt (config_sentence_transformers.json's default_prompt_name)
    include_prompt: bool
    files: list[str]
    dense: tuple[DenseSpec, ...] = ()
    prompts: Optional[dict[str, str]] = None  # all named prompts


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _st_pooling(path: Path) -> tuple[str, bool]:
    """(mode, include_prompt) from a Pooling module's config.json, resolved as ST's Pooling.load_config does."""
    config = _read_json(path)
    modes = config.get("pooling_mode")
    if modes is None:
        modes = [mode for key, mode in _LEGACY_POOLING_KEYS.items() if config.get(key)] or ["mean"]  # ST's default
    modes = [modes] if isinstance(modes, str) else list(modes)
    if len(modes) != 1 or modes[0] not in _POOLING_MODES:
        raise UnsupportedArchitecture(f"{path}: pooling {modes} is not supported; exactly one of "
                                      f"{', '.join(_POOLING_MODES)}")
    return _POOLING_MODES[modes[0]], config.get("include_prompt", True) is not False


def _sentence_transformers_config(directory: Path, usable: int) -> Optional[_STConfig]:
    """The sentence-transformers files' settings; None when the checkpoint has none. Anything that would make
    `SentenceTransformer.encode` compute something else than tokenizer -> encoder -> pooling -> [normalize] is
    refused, naming the file and value."""
    modules_path = directory / "modules.json"
    if not modules_path.is_file():
        return None
    files = [n for n in _ST_FILES if (directory / n).is_file()]
    modules = _read_json(modules_path)
    types = [str(m.get("type", "?")) for m in modules]
    kinds = [t.rsplit(".", 1)[-1] if t.startswith("sentence_transformers.") else t for t in types]
    middle = kinds[2:-1] if kinds[-1:] == ["Normalize"] else kinds[2:]
    if kinds[:2] != ["Transformer", "Pooling"] or any(k != "Dense" for k in middle):
        raise UnsupportedArchitecture(f"{modules_path}: sentence-transformers modules {types} are not supported; "
                                      f"supported: {_ST_PIPELINE_TEXT}")
    if modules[0].get("path"):  # ST would load the encoder from that folder, not the checkpoint's root
        raise UnsupportedArchitecture(f"{modules_path}: a Transformer module in {modules[0]['path']!r} is not "
                                      f"supported; only the checkpoint's root (path \"\")")
    pooling_rel = f"{modules[1]['path']}/config.json"
    pooling, include_prompt = _st_pooling(directory / pooling_rel)
    files.append(pooling_rel)
    dense = tuple(_st_dense(directory, m, files) for m in modules[2:2 + len(middle)])

    transformer = {}
    for name in ST_TRANSFORMER_CONFIGS:
        if (directory / name).is_file():
            transformer = _read_json(directory / name)
            files.append(name)
            break
    _refuse_chat_template(directory, transformer, files)
    task = transformer.get("transformer_task", "feature-extraction")
    if task != "feature-extraction" or transformer.get("processing_kwargs"):
        raise UnsupportedArchitecture(f"{directory / files[-1]}: transformer_task {task!r}, processing_kwargs "
                                      f"{transformer.get('processing_kwargs')} are not supported; only "
                                      f"feature-extraction without processing_kwargs")
    max_seq = transformer.get("max_seq_length")
    if max_seq is None:
        # ST >= 5 keeps it as the tokenizer's model_max_length, which ST caps at the model's positions
        tokenizer_config = directory / "tokenizer_config.json"
        model_max = _read_json(tokenizer_config).get("model_max_length") if tokenizer_config.is_file() else None
        max_seq = min(int(model_max), usable) if isinstance(model_max, (int, float)) else None

    prompt, prompts = None, {}
    st_config = directory / "config_sentence_transformers.json"
    if st_config.is_file():
        config = _read_json(st_config)
        name, prompts = config.get("default_prompt_name"), config.get("prompts") or {}
        if name is not None and name not in prompts:
            raise UnsupportedArchitecture(f"{st_config}: default_prompt_name {name!r} is not one of the prompts "
                                          f"{sorted(prompts)}")
        if name is not None:
            prompt = prompts[name] or None  # "" is no prompt
    if dense and prompt and not include_prompt:  # the graph pools: it cannot leave a prompt's tokens out
        raise UnsupportedArchitecture(f"{directory / pooling_rel}: include_prompt false with a default prompt in "
                                      f"front of Dense modules is not supported")
    return _STConfig(pooling=pooling, normalize=kinds[-1] == "Normalize", max_seq_length=max_seq,
                     lowercase=bool(transformer.get("do_lower_case")), prompt=prompt, include_prompt=include_prompt,
                     files=files, dense=dense,
                     prompts={str(k): str(v) for k, v in prompts.items() if isinstance(v, str)} or None)


def _refuse_chat_template(directory: Path, transformer: dict, files: list[str]) -> None:
    """sentence-transformers >= 5.7 sends texts through the tokenizer's chat template (its "message" modality)
    when the Transformer module's saved modality_config lists it (as it saves models whose tokenizer has a chat
    template). A config without modality_config (saved before ST 5.7: Qwen3-Embedding, EmbeddingGemma) loads as
    plain text. The artifact tokenizes the plain (prompted) text: refuse rather than embed differently."""
    modalities = transformer.get("modality_config")
    if isinstance(modalities, dict) and "message" in modalities:
        config_name = next((f for f in files if f in ST_TRANSFORMER_CONFIGS), "sentence_bert_config.json")
        raise UnsupportedArchitecture(f"{directory / config_name}: modality_config 'message' (sentence-transformers "
                                      f"formats every text with the tokenizer's chat template) is not supported; "
                                      f"only 'text' (drop the 'message' entry to embed plain texts)")


def _st_dense(directory: Path, module: dict, files: list[str]) -> DenseSpec:
    """A Dense module's config, read as sentence-transformers' Dense.load reads it (bias defaults to true, a
    missing activation_function to Tanh); its weights must be a model.safetensors in its folder."""
    rel = str(module.get("path") or "")
    config_path = directory / rel / "config.json"
    if not rel or not config_path.is_file():
        raise UnsupportedArchitecture(f"{directory / 'modules.json'}: Dense module {module.get('name')!r} has no "
                                      f"{config_path.relative_to(directory)}")
    config = _read_json(config_path)
    activation = config.get("activation_function", "torch.nn.modules.activation.Tanh")
    if activation not in DENSE_ACTIVATIONS:
        raise UnsupportedArchitecture(f"{config_path}: Dense activation_function {activation!r} is not supported; "
                                      f"supported: {', '.join(DENSE_ACTIVATIONS)}")
    for key in ("module_input_name", "module_output_name"):
        if config.get(key) not in (None, "sentence_embedding"):
            raise UnsupportedArchitecture(f"{config_path}: Dense {key} {config[key]!r} is not supported; only "
                                          f"sentence_embedding")
    if not (directory / rel / "model.safetensors").is_file():
        raise UnsupportedArchitecture(f"{directory / rel}: the Dense module's weights must be model.safetensors "
                                      f"(pytorch_model.bin is not read)")
    files += [f"{rel}/config.json"]
    return DenseSpec(path=rel, in_features=int(config["in_features"]), out_features=int(config["out_features"]),
                     bias=config.get("bias", True) is not False, activation=DENSE_ACTIVATIONS[activation])


def _function_to_apply(config) -> Optional[str]:
    """transformers' text-classification pipeline's default (TextClassificationPipeline.postprocess), when it
    differs from the runtime's (softmax; a sigmoid for one logit)."""
    if config.problem_type == "regression":
        chosen = "none"
    elif config.problem_type == "multi_label_classification" or config.num_labels == 1:
        chosen = "sigmoid"
    elif config.problem_type == "single_label_classification" or config.num_labels > 1:
        chosen = "softmax"
    else:
        chosen = getattr(config, "function_to_apply", None) or "none"
    return None if chosen == ("sigmoid" if config.num_labels == 1 else "softmax") else chosen


def encoder_spec(config, recipe: Recipe, directory: Path) -> EncoderSpec:
    """Normalize the HF config + sentence-transformers files + recipe overrides (raises when unsupported)."""
    model_type = config.model_type
    if model_type not in ENCODERS:
        raise UnsupportedArchitecture(f"model_type {model_type!r} is not a supported encoder; supported: "
                                      f"{', '.join(sorted(ENCODERS))}")
    opts = recipe.encoder
    max_positions = int(config.max_position_embeddings)
    usable = max_positions
    if model_type in _PADDING_IDX_POSITIONS:  # position ids start after padding_idx: roberta-base's 514 hold 512 tokens
        padding_idx = config.pad_token_id if model_type != "mpnet" and config.pad_token_id is not None else 1
        usable -= int(padding_idx) + 1
    st = _sentence_transformers_config(directory, usable)
    max_length = (opts.max_length if opts and opts.max_length else None) or (st and st.max_seq_length) or usable
    if max_length > usable:
        raise UnsupportedArchitecture(f"encoder.max_length {max_length} exceeds the model's max_position_embeddings "
                                      f"{max_positions}" + (f" ({usable} tokens after padding_idx)"
                                                            if usable != max_positions else ""))
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or int(config.hidden_size) // heads)
    dims = ModelDims(model_type=model_type, family="encoder", num_layers=int(config.num_hidden_layers),
                     hidden=int(config.hidden_size), heads=heads, kv_heads=kv_heads,
                     head_dim=head_dim, vocab=int(config.vocab_size), max_positions=max_positions)
    if recipe.task == "text-classification":
        if model_type in _EMBEDDING_ONLY:
            raise UnsupportedArchitecture(f"model_type {model_type!r} is supported for feature-extraction (embedding "
                                          f"models) only, not text-classification")
        heads_archs = [a for a in (config.architectures or []) if a.endswith("ForSequenceClassification")]
        if not heads_archs:
            raise UnsupportedArchitecture(f"{directory}: task text-classification needs a checkpoint with a sequence-"
                                          f"classification head; this one is {config.architectures or 'unknown'}")
        labels = [str(config.id2label[i]) for i in range(config.num_labels)]
        return EncoderSpec(task=recipe.task, model_type=model_type, dims=dims, output="logits", pooling=None,
                           normalize=False, max_length=max_length, dim=len(labels), labels=labels,
                           token_type_ids=ENCODERS[model_type], st_files=(),
                           function_to_apply=_function_to_apply(config))
    pooling = opts.pooling if opts and opts.pooling != "auto" else (st.pooling if st else "mean")
    normalize = opts.normalize if opts and opts.normalize is not None else bool(st and st.normalize)
    prompt = st.prompt if st else None
    dense = st.dense if st else ()
    width = dims.hidden
    for d in dense:
        if d.in_features != width:
            raise UnsupportedArchitecture(f"{directory / d.path / 'config.json'}: Dense in_features {d.in_features} "
                                          f"does not follow the {width} features in front of it")
        width = d.out_features
    return EncoderSpec(task=recipe.task, model_type=model_type, dims=dims, output="embedding", pooling=pooling,
                       normalize=normalize, max_length=max_length, dim=width, labels=None,
                       token_type_ids=ENCODERS[model_type], st_files=tuple(st.files) if st else (),
                       lowercase=True if st and st.lowercase else None, prompt=prompt,
                       include_prompt=False if (prompt or (st and st.prompts)) and not st.include_prompt else None,
                       prompts=st.prompts if st else None, dense=dense,
                       source_dir=directory if dense else None)


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
