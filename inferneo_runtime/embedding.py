"""Encoder artifacts (tasks feature-extraction and text-classification): texts in, vectors out.

    with inferneo_runtime.load("artifacts/all-minilm-l6-v2") as model:
        vectors = model.embed(["first text", "second text"])      # [2, 384] float32
        labels = model.classify(["great movie"])                  # text-classification artifacts

A target runs the encoder over padded token batches and returns its last hidden states (feature-extraction)
or class logits (text-classification). Pooling and normalization happen here, in numpy, as the manifest's
`encoder` section says (copied at build time from the sentence-transformers config), so every target format
shares them. ONNX runs on onnxruntime; TorchScript needs torch (the `torchscript` extra).
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .errors import GoldenMismatch, ManifestError, MissingExtraError, RequestError
from .manifest import EncoderInfo, Manifest, TargetEntry

DEFAULT_MIN_COSINE = 0.9999


# -- pooling (pure functions, the same as sentence-transformers' Pooling and Normalize modules) -----------------
def pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """Token states [n, S, H] and attention mask [n, S] -> one vector per row [n, H]."""
    hidden = hidden.astype(np.float32, copy=False)
    m = mask.astype(np.float32)[:, :, None]
    if mode == "cls":  # the first unmasked token: 0, unless a prompt is left out of pooling (as ST >= 5)
        return hidden[np.arange(len(hidden)), np.argmax(mask > 0, axis=1)]
    if mode == "max":
        return np.where(m > 0, hidden, np.float32(-1e9)).max(axis=1)
    if mode == "lasttoken":  # the last unmasked token of each (right-padded) row
        last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1] > 0, axis=1)  # a row with none: its last (zeroed)
        return (hidden * m)[np.arange(len(hidden)), last]
    if mode == "weightedmean":  # token i weighs i + 1
        m = m * np.arange(1, hidden.shape[1] + 1, dtype=np.float32)[None, :, None]
        return (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    summed = (hidden * m).sum(axis=1)
    count = np.maximum(m.sum(axis=1), 1e-9)
    if mode == "mean":
        return summed / count
    if mode == "mean_sqrt_len":
        return summed / np.sqrt(count)
    raise ManifestError(f"pooling {mode!r} is not supported; known: mean, cls, max, mean_sqrt_len, weightedmean, "
                        f"lasttoken")


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def finish(raw: np.ndarray, mask: np.ndarray, info: EncoderInfo, prompt_length: int = 0) -> np.ndarray:
    """A target's raw output -> what the artifact returns (pooled + normalized embeddings, or logits).
    `prompt_length` leading tokens are left out of pooling (sentence-transformers' include_prompt=false)."""
    if info.output == "logits":
        return raw.astype(np.float32, copy=False)
    if info.graph_modules:  # the graph pooled (and projected) already
        out = raw.astype(np.float32, copy=False)
        return l2_normalize(out) if info.normalize else out
    if prompt_length:  # after any left padding, as sentence-transformers' Pooling._exclude_prompt_from_mask
        pads = np.argmax(mask > 0, axis=1)[:, None]
        mask = np.where(np.arange(mask.shape[1])[None, :] < pads + prompt_length, 0, mask)
    out = pool(raw, mask, info.pooling or "mean")
    return l2_normalize(out) if info.normalize else out


# -- runners: one forward over a padded batch ------------------------------------------------------------------
class _OnnxRunner:
    def __init__(self, path: Path, threads: Optional[int], device: str):
        import onnxruntime as ort

        from .backends.base import physical_cores

        if device != "cpu":
            raise RequestError(f"onnx encoder targets run on cpu (asked for {device!r})")
        opts = ort.SessionOptions()
        # a torch-exported graph is unfused: onnxruntime's full optimizer pays for itself here
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = int(threads or physical_cores())
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, {k: feeds[k] for k in self.inputs})[0]


class _TorchScriptRunner:
    def __init__(self, path: Path, threads: Optional[int], device: str, input_names: list[str]):
        try:
            import torch
        except ImportError:  # pragma: no cover - depends on the install
            raise MissingExtraError("TorchScript artifacts", "torchscript", "torch") from None
        from .backends.base import physical_cores
        from .backends.torchscript import _torch_device, quiet_jit

        self.torch = torch
        self.device = _torch_device(device)
        torch.set_num_threads(int(threads or physical_cores()))
        with quiet_jit():
            self.module = torch.jit.load(str(path), map_location=self.device).eval()
        self.inputs = input_names

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            out = self.module(*[torch.from_numpy(feeds[k]).to(self.device) for k in self.inputs])
        return out.float().cpu().numpy()


def _target_file(root: Path, entry: TargetEntry, suffix: str) -> Path:
    files = [f.path for f in entry.files if f.path.endswith(suffix)]
    if len(files) != 1:
        raise ManifestError(f"{root}: expected one *{suffix} file in the {entry.format} target, found {files}")
    return root / files[0]


class EmbeddingModel:
    """A loaded encoder target: tokenizer + runner + pooling. `embed` for feature-extraction artifacts,
    `classify` for text-classification ones; `forward` returns either's raw vectors."""

    def __init__(self, root: Path, name: str, target: str, entry: TargetEntry, info: EncoderInfo, runner,
                 task: str = "feature-extraction"):
        from tokenizers import Tokenizer as _HFTokenizer

        self.root, self.name, self.target, self.entry, self.info, self.task = Path(root), name, target, entry, info, task
        self._runner = runner
        self.manifest: Optional[Manifest] = None
        self.input_names = [t.name for t in entry.io.inputs] if entry.io else ["input_ids", "attention_mask"]
        try:
            tok = _HFTokenizer.from_file(str(self.root / "tokenizer.json"))
        except Exception as e:  # tokenizers raises plain Exception subclasses for bad files
            raise ManifestError(f"{self.root / 'tokenizer.json'}: cannot load tokenizer: {e}") from None
        tok.no_padding()
        tok.enable_truncation(max_length=info.max_length)
        if info.lowercase:  # as sentence-transformers applies do_lower_case: a Lowercase normalizer in front
            from tokenizers import normalizers

            rest = [tok.normalizer] if tok.normalizer else []
            tok.normalizer = normalizers.Sequence([normalizers.Lowercase()] + rest)
        pad_token, padding_side = self._pad_token()
        pad_id = tok.token_to_id(pad_token) if pad_token else None
        # on the tokenizer's side, as sentence-transformers pads (left for Qwen3-Embedding's last-token pooling)
        tok.enable_padding(pad_id=pad_id if pad_id is not None else 0, pad_token=pad_token or "[PAD]",
                           direction="left" if padding_side == "left" else "right")
        self._tok = tok
        self._prompt_length = self._length_of(info.prompt)
        bounds = entry.shapes
        self.batch_size = bounds.max_batch if bounds else 32

    def _length_of(self, prompt: Optional[str]) -> int:
        """The tokens pooling leaves out for `prompt` (0 unless the manifest's include_prompt is false):
        sentence-transformers' prompt length, the prompt's tokens less a trailing special token."""
        if not prompt or self.info.include_prompt is not False:
            return 0
        encoding = self._tok.encode(prompt)
        return len(encoding.ids) - (1 if encoding.special_tokens_mask[-1:] == [1] else 0)

    def prompt_for(self, prompt_name: Optional[str]) -> tuple[str, int]:
        """(prompt text, tokens left out of pooling) for a named prompt, or the default prompt (None)."""
        if prompt_name is None:
            return self.info.prompt or "", self._prompt_length
        prompts = self.info.prompts or {}
        if prompt_name not in prompts:
            raise RequestError(f"{self.name}: prompt_name {prompt_name!r} is not one of the model's prompts "
                               f"{sorted(prompts)}")
        prompt = prompts[prompt_name]
        length = self._length_of(prompt)
        if length and self.info.graph_modules:
            raise RequestError(f"{self.name}: prompt {prompt_name!r} is left out of pooling (include_prompt false), "
                               f"which the graph's own pooling cannot do")
        return prompt, length

    def _pad_token(self) -> tuple[Optional[str], Optional[str]]:
        """tokenizer_config.json's (pad_token, padding_side)."""
        import json

        path = self.root / "tokenizer_config.json"
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        value = config.get("pad_token")
        return (value.get("content") if isinstance(value, dict) else value), config.get("padding_side")

    @classmethod
    def open(cls, root: Path, manifest: Manifest, target: str, device: str = "cpu",
             threads: Optional[int] = None) -> "EmbeddingModel":
        if manifest.encoder is None:
            raise ManifestError(f"{root}: task {manifest.task} needs the manifest's `encoder` section")
        entry = manifest.targets[target]
        model = cls(root, manifest.name, target, entry, manifest.encoder,
                    make_runner(root, entry, device=device, threads=threads), task=manifest.task)
        model.manifest = manifest
        return model

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def close(self) -> None:
        self._runner = None

    def __enter__(self) -> "EmbeddingModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def dim(self) -> int:
        return self.info.dim

    @cached_property
    def tokenizer(self):
        """The runtime's Tokenizer over the same files (what the server reads `tokenizer` for)."""
        from .tokenizer import Tokenizer

        return Tokenizer(self.root, listed=self.manifest.listed_root_files() if self.manifest else None)

    # -- inference ----------------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str], prompt: Optional[str] = None) -> dict[str, np.ndarray]:
        """Padded (to the longest) and truncated (to max_length) feeds for one batch, `prompt` (default: the
        sentence-transformers default prompt) prepended to each text as its encode() does."""
        if any(not isinstance(t, str) for t in texts):
            raise RequestError("texts must be strings")
        prompt = (self.info.prompt or "") if prompt is None else prompt
        encodings = self._tok.encode_batch([prompt + t for t in texts])
        feeds = {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                 "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
                 "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64)}
        return {k: v for k, v in feeds.items() if k in self.input_names}

    def forward(self, texts: Sequence[str], batch_size: Optional[int] = None,
                prompt_name: Optional[str] = None) -> np.ndarray:
        """[len(texts), dim] float32: pooled embeddings or class logits, computed `batch_size` texts at a time;
        `prompt_name` picks one of sentence-transformers' named prompts instead of the default one."""
        if self._runner is None:
            raise RuntimeError(f"{self.name}/{self.target} is closed")
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        size = max(1, batch_size or self.batch_size)
        prompt, prompt_length = self.prompt_for(prompt_name)
        out = []
        for start in range(0, len(texts), size):
            feeds = self.tokenize(texts[start:start + size], prompt)
            out.append(finish(self._runner(feeds), feeds["attention_mask"], self.info, prompt_length))
        return np.concatenate(out).astype(np.float32, copy=False)

    def embed(self, texts: Union[str, Sequence[str]], batch_size: Optional[int] = None,
              prompt_name: Optional[str] = None) -> np.ndarray:
        """One text -> [dim]; several -> [n, dim] (L2-normalized when the model's config says so). `prompt_name`:
        one of the model's sentence-transformers prompts (manifest `encoder.prompts`, e.g. Qwen3-Embedding's
        "query"), as `SentenceTransformer.encode(prompt_name=...)`; default: the default prompt, if any."""
        if self.info.output != "embedding":
            raise RequestError(f"{self.name} is a {self.task} model; use classify()")
        single = isinstance(texts, str)
        vectors = self.forward([texts] if single else texts, batch_size, prompt_name=prompt_name)
        return vectors[0] if single else vectors

    def classify(self, texts: Union[str, Sequence[str]], batch_size: Optional[int] = None):
        """One text -> {"label", "score", "scores"}; several -> a list of them. Scored as transformers'
        text-classification pipeline scores the checkpoint: the manifest's function_to_apply (sigmoid for
        multi-label heads, none for regression), else a softmax over the logits, or a sigmoid of a single logit."""
        if self.info.output != "logits":
            raise RequestError(f"{self.name} is a {self.task} model; use embed()")
        single = isinstance(texts, str)
        logits = self.forward([texts] if single else texts, batch_size).astype(np.float64)
        function = self.info.function_to_apply or ("sigmoid" if logits.shape[-1] == 1 else "softmax")
        if function == "sigmoid":
            probs = 1.0 / (1.0 + np.exp(-logits))
        elif function == "softmax":
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
        else:
            probs = logits
        labels = self.info.labels or [str(i) for i in range(logits.shape[-1])]
        out = [{"label": labels[int(p.argmax())], "score": float(p.max()),
                "scores": {labels[i]: float(v) for i, v in enumerate(p)}} for p in probs]
        return out[0] if single else out

    def check_goldens(self) -> list[dict]:
        """Re-run the build's validation texts on this host; raise GoldenMismatch when a result's cosine
        similarity to the reference's falls below the target's validated tolerance."""
        tolerance = self.entry.validation.tolerance
        min_cosine = tolerance.cosine if tolerance and tolerance.cosine is not None else DEFAULT_MIN_COSINE
        goldens = self.info.goldens
        if not goldens:
            return []
        got = self.forward([g.text for g in goldens]).astype(np.float64)
        want = np.array([g.values for g in goldens], dtype=np.float64)
        cos = np.sum(got * want, -1) / np.maximum(np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1), 1e-30)
        results = [{"prompt": g.text, "match": bool(c >= min_cosine), "cosine": float(c)} for g, c in zip(goldens, cos)]
        bad = [r for r in results if not r["match"]]
        if bad:
            raise GoldenMismatch(f"target {self.target!r}: {len(bad)} of {len(results)} goldens fall below cosine "
                                 f"{min_cosine:g} (worst {min(r['cosine'] for r in bad):.6f} on {bad[0]['prompt']!r})")
        return results


def make_runner(root: Path, entry: TargetEntry, device: str = "cpu", threads: Optional[int] = None):
    """The callable that runs an encoder target: feeds dict -> raw output array."""
    root = Path(root)
    if entry.format == "onnx":
        return _OnnxRunner(_target_file(root, entry, ".onnx"), threads, device)
    if entry.format == "torchscript":
        names = [t.name for t in entry.io.inputs] if entry.io else ["input_ids", "attention_mask"]
        return _TorchScriptRunner(_target_file(root, entry, ".pt"), threads, device, names)
    raise ManifestError(f"encoder targets run as onnx or torchscript, not {entry.format}")


class EmbeddingDriver:
    """What the server's registry holds for a loaded encoder in place of a generation engine: no decode loop,
    no KV cache. Requests run `model.forward` directly (`/v1/embeddings`); generation requests are refused."""

    def __init__(self, name: str, model: EmbeddingModel):
        self.name, self.model = name, model
        self.max_sequence = model.info.max_length
        self.cache_bytes = 0
        self.in_flight = 0  # requests run model.forward on the caller's thread: nothing is ever queued here

    @property
    def idle(self) -> bool:
        return True

    def check(self, prompt_ids, params) -> None:
        raise RequestError(f"model {self.name!r} is a {self.model.task} model: use /v1/embeddings")

    def submit(self, *args, **kwargs):
        self.check(None, None)

    def cancel(self, ticket) -> None:
        pass

    def stop(self, timeout=None) -> bool:
        return True
