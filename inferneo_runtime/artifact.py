"""Open an artifact directory: read and verify the manifest, pick a target, load its backend."""
from __future__ import annotations

import math
import resource
import sys
import threading
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from . import preflight
from .backends import backend_class
from .backends.base import Backend
from .cpu_kernels import quantized_kernel_path
from .errors import GoldenMismatch, InferneoError, IntegrityError, RequestError
from .generation import SequenceOutput, generate_ids, stream_tokens
from .goldens import mixed_step_error, teacher_forced_agreement
from .sampling import SamplingParams
from .sampling_defaults import read_sampling_defaults
from .prefix_cache import PrefixCache
from .signing import SignatureError
from .speculative import SpeculationStats
from .manifest import Manifest, read_manifest, verify_files
from .tokenizer import Tokenizer

# When no target is named, prefer the one that needs the fewest extras on this host.
TARGET_PREFERENCE = ("onnx", "torchscript", "pt2", "tensorrt")


class TargetNotAvailable(InferneoError):
    exit_code = 2


class OutOfMemory(InferneoError):
    """A KV-cache allocation did not fit; nothing was allocated and the model stays usable."""


def _is_oom(e: BaseException) -> bool:
    # numpy raises MemoryError; torch raises OutOfMemoryError (CUDA) or RuntimeError "can't allocate memory" (CPU)
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e)))


class _CacheMemory:
    """Stands in for a backend's `_zeros`, the one allocator of its KV caches (first allocation and growth):
    counts the cache arrays alive and their peak, and turns an allocation failure into OutOfMemory naming it."""

    def __init__(self, backend: Backend, itemsize: int):
        self._zeros = backend._zeros
        self._device = backend.device
        self._itemsize = itemsize
        self._live: dict[int, tuple[weakref.ref, int]] = {}
        self.peak = 0

    def zeros(self, shape: tuple):
        try:
            array = self._zeros(shape)
        except Exception as e:
            if not _is_oom(e):
                raise
            layers, _, batch, heads, capacity, dim = shape
            raise OutOfMemory(
                f"out of memory allocating a KV cache of {batch} sequence(s) × {capacity} positions on {self._device}: "
                f"{layers} layers × 2 (key, value) × {heads} KV heads × {dim} dims × {self._itemsize} bytes = "
                f"{math.prod(shape) * self._itemsize / 1e9:.2f} GB; nothing was allocated and the model stays "
                f"loaded") from None
        key = id(array)
        nbytes = math.prod(shape) * self._itemsize
        self._live[key] = (weakref.ref(array, lambda _, key=key: self._live.pop(key, None)), nbytes)
        self.peak = max(self.peak, self.nbytes)
        return array

    @property
    def nbytes(self) -> int:
        return sum(n for ref, n in list(self._live.values()) if ref() is not None)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    finish_reason: str
    logprobs: list = field(default_factory=list)  # TokenLogprobs per generated token, when asked for


def choose_target(manifest: Manifest, target: Optional[str]) -> str:
    valid = manifest.valid_targets()
    if target is not None:
        entry = manifest.targets.get(target)
        if entry is None:
            raise TargetNotAvailable(f"artifact {manifest.name!r} has no target {target!r}; "
                                     f"it has: {', '.join(manifest.targets) or 'none'}")
        if entry.status != "valid":
            raise TargetNotAvailable(f"target {target!r} of {manifest.name!r} was {entry.status} at build time: "
                                     f"{entry.validation.reason or 'no reason recorded'}")
        return target
    for fmt in TARGET_PREFERENCE:
        for name in valid:
            if manifest.targets[name].format == fmt:
                return name
    raise TargetNotAvailable(f"artifact {manifest.name!r} has no valid target")


def check_signature(root: Path, trusted_keys: Optional[Sequence[Union[str, Path]]] = None) -> Optional[str]:
    """Verify the manifest's signature when trusted keys are configured; returns the signing key id."""
    from .signing import resolve_trusted_keys, verify_signature

    keys = resolve_trusted_keys(trusted_keys)
    return verify_signature(root, keys) if keys else None


def verify_artifact(root: Path, manifest: Manifest, targets: Sequence[str]) -> None:
    """Checksum the root files and the named targets' files; raises IntegrityError naming the bad file."""
    verify_files(root, manifest.root_files)
    for name in targets:
        verify_files(root, manifest.targets[name].files)


class Model:
    """A loaded artifact target: tokenizer + backend + the generation loop."""

    def __init__(self, root: Path, manifest: Manifest, target: str, backend: Backend, tokenizer: Tokenizer,
                 load_options: Optional[dict] = None):
        self.root = root
        self.manifest = manifest
        self.target = target
        self.backend = backend
        self.tokenizer = tokenizer
        self.spec_stats = SpeculationStats()  # drafted and kept tokens of every speculative generate on this model
        # Optional settings of every generate on this model: a PrefixCache shared by its calls (e.g.
        # `model.prefix_cache = PrefixCache(max_bytes=256 << 20)`) and a per-step prompt-token budget.
        self.prefix_cache: Optional[PrefixCache] = None
        self.prefill_chunk: Optional[int] = None
        # the model's own request defaults (its generation_config.json), which a server applies unless told not to
        self.sampling_defaults = read_sampling_defaults(root)
        eos = list(manifest.generation.eos_token_ids)
        self.eos_ids = eos or ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
        dims, entry = manifest.model, manifest.targets[target]
        itemsize = preflight.kv_bytes_per_position(dims, entry) // (dims.num_layers * 2 * dims.kv_heads * dims.head_dim)
        self._caches = _CacheMemory(backend, itemsize)
        backend._zeros = self._caches.zeros  # every cache this model allocates goes through the accounting
        # how this model was loaded (load()'s keywords): a draft model is loaded the same way
        self._load_options = load_options or {"device": backend.device, "threads": backend.threads}
        self._drafts: dict[str, Model] = {}  # speculative draft models by the name that chose them
        self._drafts_lock = threading.Lock()

    def memory(self) -> dict:
        """Bytes this model holds: weights (the manifest's sizes of the files its backend loaded), the KV caches
        alive now and their peak, and the process's peak (CUDA: torch's max_memory_allocated on the device,
        which does not see TensorRT's own allocations; always: peak RSS)."""
        entry = self.manifest.targets[self.target]
        out = {"device": self.backend.device,
               "weights_bytes": preflight.weights_bytes(entry, getattr(self.backend, "compute_capability", None)),
               "kv_cache_bytes": self._caches.nbytes, "kv_cache_peak_bytes": self._caches.peak,
               "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux: KiB
        drafts = list(self._drafts.values())
        if drafts:
            out["draft_weights_bytes"] = sum(preflight.weights_bytes(d.manifest.targets[d.target]) for d in drafts)
            out["draft_kv_cache_bytes"] = sum(d._caches.nbytes for d in drafts)
        torch = sys.modules.get("torch")
        if self.backend.device.startswith("cuda") and torch is not None and torch.cuda.is_available():
            index = int(self.backend.device.partition(":")[2] or 0)
            out["cuda_allocated_bytes"] = int(torch.cuda.memory_allocated(index))
            out["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(index))
        return out

    def mixed_step_bytes(self) -> int:
        """Bytes of the mixed-step session's own copy of the weights (onnx, when an engine with a prefill budget
        loaded it: onnxruntime packs the weights per session); a server's memory budget counts them."""
        return preflight.weights_bytes(self.manifest.targets[self.target]) if self.backend.mixes_steps else 0

    def draft_bytes(self) -> int:
        """Bytes of the weights of the draft models loaded for speculation (a server's memory budget counts them
        with this model's own; their KV caches are the drafting requests', counted in the driver's cache_bytes)."""
        return sum(preflight.weights_bytes(d.manifest.targets[d.target]) for d in list(self._drafts.values()))

    @property
    def name(self) -> str:
        return self.manifest.name

    def close(self) -> None:
        for draft in self._drafts.values():
            draft.close()
        self._drafts.clear()
        self.backend.close()

    def draft_backend(self, draft: str) -> Backend:
        """The backend that drafts for this model with speculative method "draft": `draft` is another target of this
        artifact ("onnx-int4") or the path of another artifact with the same tokenizer. Loaded once, shared by every
        request, closed with this model."""
        with self._drafts_lock:
            if draft not in self._drafts:
                self._drafts[draft] = self._load_draft(draft)
            return self._drafts[draft].backend

    def _load_draft(self, draft: str) -> "Model":
        from . import s3

        if draft in self.manifest.targets:
            model = load(self.root, target=draft, **self._load_options)
        elif s3.is_s3_uri(draft) or (Path(draft) / "inferneo.json").is_file():
            model = load(draft, **self._load_options)
        else:
            raise RequestError(f"speculative draft {draft!r} is neither a target of {self.name!r} (it has: "
                               f"{', '.join(self.manifest.targets)}) nor an artifact directory")
        problem = _draft_problem(self, model)
        if problem:
            model.close()
            raise RequestError(f"speculative draft {draft!r} cannot draft for {self.name!r}: {problem}")
        return model

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def encode(self, prompt: Union[str, Sequence[int]]) -> list[int]:
        return list(prompt) if not isinstance(prompt, str) else self.tokenizer.encode(prompt)

    def generate(self, prompt: Union[str, Sequence[str]], **params) -> Union[Completion, list[Completion]]:
        """Complete one prompt (returns a Completion) or several batched together (returns a list).

        Keyword arguments are SamplingParams: max_new_tokens, temperature (0 = greedy), top_k, top_p, min_p,
        repetition_penalty, presence_penalty, frequency_penalty, seed, min_new_tokens, stop, stop_token_ids,
        logprobs, ignore_eos. With several prompts and a seed, prompt i uses seed + i.
        Structured outputs: response_format ({"type": "json_object"} or {"type": "json_schema", "json_schema":
        {"schema": ...}}), guided_json, guided_regex, guided_choice or guided_grammar (structured.py).
        `speculative` ("ngram", "draft:onnx-int4" (a smaller model drafts: another target of this artifact, or
        another artifact's path), a number of draft tokens, a dict, or a SpeculativeConfig) drafts and verifies
        several tokens per step: greedy output is unchanged, sampled output keeps its distribution.
        """
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        speculative = params.pop("speculative", None)
        outs = self.generate_ids([self.encode(p) for p in prompts], self._params(len(prompts), params),
                                 speculative=speculative)
        completions = [self.completion(o) for o in outs]
        return completions[0] if single else completions

    def chat(self, messages: list[dict], **params) -> Completion:
        """Render `messages` with the artifact's chat template and complete them."""
        speculative = params.pop("speculative", None)
        return self.completion(self.generate_ids([self.tokenizer.encode_chat(messages)], _sampling(params),
                                                 speculative=speculative)[0])

    def stream(self, prompt: Union[str, list[dict]], **params) -> Iterator[str]:
        """Yield text deltas as they become final; joined, they equal generate(...).text.
        A list of messages is rendered with the chat template."""
        ids = self.tokenizer.encode_chat(prompt) if isinstance(prompt, list) else self.encode(prompt)
        speculative = params.pop("speculative", None)
        for event in stream_tokens(self.backend, [ids], _sampling(params), self.eos_ids, tokenizer=self.tokenizer,
                                   speculative=speculative, spec_stats=self.spec_stats, prefix_cache=self.prefix_cache,
                                   prefill_chunk=self.prefill_chunk, draft_backend=self.draft_backend):
            if event.text:
                yield event.text

    def generate_ids(self, prompts: Sequence[Sequence[int]], params, keep_logits: bool = False,
                     speculative=None) -> list[SequenceOutput]:
        return generate_ids(self.backend, prompts, params, self.eos_ids, keep_logits, tokenizer=self.tokenizer,
                            speculative=speculative, spec_stats=self.spec_stats, prefix_cache=self.prefix_cache,
                            prefill_chunk=self.prefill_chunk, draft_backend=self.draft_backend)

    @staticmethod
    def _params(n: int, kwargs: dict):
        base = _sampling(kwargs)
        if n == 1 or base.seed is None:
            return base
        return [replace(base, seed=base.seed + i) for i in range(n)]

    def completion(self, out: SequenceOutput) -> Completion:
        return Completion(text=out.text, token_ids=out.token_ids, prompt_ids=out.prompt_ids,
                          finish_reason=out.finish_reason or "length", logprobs=out.logprobs)

    def check_goldens(self) -> list[dict]:
        """Re-run the build's goldens on this host; raise GoldenMismatch if they do not hold (goldens.py).

        A float32 target must reproduce the reference's greedy tokens exactly. A reduced-precision target is held
        to its tolerance instead: teacher-forced top-1 agreement with the reference's tokens (each result then
        carries `agree` and `positions`); its own recorded greedy tokens are compared and reported (`match`)."""
        entry = self.manifest.targets[self.target]
        results = [self._replay(g) for g in entry.goldens or self.manifest.goldens]
        self._check_mixed_step(entry)
        tolerance = entry.validation.tolerance
        if entry.goldens is None or tolerance is None or tolerance.top1_agreement is None:
            bad = [r for r in results if not r["match"]]
            if bad:
                r = bad[0]
                raise GoldenMismatch(f"target {self.target!r}: golden {r['prompt']!r} diverges at token "
                                     f"{r['first_divergence']} ({len(bad)} of {len(results)} goldens differ)")
            return results
        for r, g in zip(results, self.manifest.goldens):
            r["agree"], r["positions"] = teacher_forced_agreement(self.backend, g.prompt_ids, g.tokens)
        agree, positions = sum(r["agree"] for r in results), sum(r["positions"] for r in results)
        if positions and agree / positions < tolerance.top1_agreement:
            raise GoldenMismatch(
                f"target {self.target!r}: top-1 agreement with the reference's greedy tokens {agree / positions:.4f} "
                f"over {positions} teacher-forced positions is below its tolerance {tolerance.top1_agreement:g} "
                f"(this host: {quantized_kernel_path()}; measured at build on "
                f"{entry.validation.kernel_path or 'an unrecorded kernel path'})")
        return results

    def _check_mixed_step(self, entry) -> None:
        """A mixed step validated at build (one forward for a decode step and a prompt chunk) must still equal
        its two forwards on this host, within the build's logits_atol (1e-3, the recipe default, where the
        target's criterion recorded none)."""
        if entry.validation.mixed_step_max_abs_error is None:
            return
        limit = entry.validation.logits_atol or 1e-3
        error = mixed_step_error(self.backend, [g.prompt_ids for g in self.manifest.goldens])
        if error is not None and not error <= limit:
            raise GoldenMismatch(f"target {self.target!r}: the mixed decode + prefill step differs from its two "
                                 f"forwards by {error:.3g} on this host (limit {limit:g}; build: "
                                 f"{entry.validation.mixed_step_max_abs_error:.3g})")

    def _replay(self, golden) -> dict:
        got = self.generate_ids([golden.prompt_ids], SamplingParams(max_new_tokens=len(golden.tokens)))[0].token_ids
        diverge = next((i for i, (a, b) in enumerate(zip(got, golden.tokens)) if a != b),
                       None if len(got) == len(golden.tokens) else min(len(got), len(golden.tokens)))
        return {"prompt": golden.prompt, "match": diverge is None, "first_divergence": diverge,
                "expected": golden.tokens, "got": got}


def load(path: Union[str, Path], target: Optional[str] = None, device: str = "cpu",
         threads: Optional[int] = None, verify: bool = True,
         trusted_keys: Optional[Sequence[Union[str, Path]]] = None) -> Model:
    """Open an artifact directory (or an s3:// URI), verify what will be used, and load one target's backend.

    verify=True checks the sha256 of the root files and the chosen target's files before loading.
    trusted_keys (default: $INFERNEO_TRUSTED_KEYS): Ed25519 public keys; when any are given, the manifest's
    signature must verify against one of them before anything else is read.
    """
    from . import s3

    uri = str(path) if s3.is_s3_uri(path) else None
    if uri:  # s3://bucket/prefix[/versions/<sha256>]: fetched once into the verified cache
        path = s3.fetch(uri)
    root = Path(path)
    try:
        signed_by = check_signature(root, trusted_keys)
    except SignatureError:
        # the cached version may have been re-signed since (another key; the version, the manifest's sha256,
        # stays the same): check the signature S3 holds now before refusing
        if uri is None or not _refreshed_signature(uri, root):
            raise
        signed_by = check_signature(root, trusted_keys)
    manifest = read_manifest(root)
    name = choose_target(manifest, target)
    preflight.check(manifest, name, device).raise_for_errors()  # versions, GPU, extras, memory: before any file is read
    if verify:
        try:
            verify_artifact(root, manifest, [name])
        except IntegrityError:
            if uri is None:
                raise
            # a cache entry damaged after it was verified (a flipped byte keeps the size the cheap check sees):
            # download it again, once; the same version hashes to the same manifest, so only files change
            s3.drop_entry(root)
            root = Path(s3.fetch(uri))
            signed_by = check_signature(root, trusted_keys)
            verify_artifact(root, manifest, [name])
    if manifest.task != "text-generation":  # encoders: embeddings or class logits, no decode loop
        from .embedding import EmbeddingModel

        return EmbeddingModel.open(root, manifest, name, device=device, threads=threads)
    entry = manifest.targets[name]
    # where signatures are required, only signed bytes run: not this host's unsigned packed copy of them
    backend = backend_class(entry.format)(root, entry, manifest.model, device=device, threads=threads,
                                          host_cache=signed_by is None)
    tokenizer = Tokenizer(root, listed=manifest.listed_root_files())  # only what the manifest (signature) covers
    backend.load()
    return Model(root, manifest, name, backend, tokenizer,
                 load_options={"device": device, "threads": threads, "verify": verify, "trusted_keys": trusted_keys})


def _refreshed_signature(uri: str, root: Path) -> bool:
    """True when S3 holds another signature for this cached version than the cache did (now written there); False
    when not, or when S3 cannot say (offline: the cached signature's verdict stands)."""
    from . import s3

    try:
        return s3.refresh_signature(uri, root)
    except InferneoError:
        return False


def _draft_problem(model: Model, draft) -> Optional[str]:
    """Why `draft` cannot propose tokens for `model` (None when it can): the same token ids must mean the same."""
    if not isinstance(draft, Model):
        return "it is not a text-generation model"
    if draft.tokenizer.vocab() != model.tokenizer.vocab():
        return "its tokenizer differs (a draft model must share the target's token ids)"
    return None


_STRUCTURED = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar")


def _sampling(params: dict) -> SamplingParams:
    """SamplingParams from keyword arguments; the structured-output ones become its `constraint`."""
    structured = {k: params.pop(k) for k in _STRUCTURED if k in params}
    if structured:
        from .structured import make_constraint

        params["constraint"] = make_constraint(**structured)
    return SamplingParams(**params)
