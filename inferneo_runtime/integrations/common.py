"""What every replica does before it takes traffic: open the artifact, start its engine driver, warm up.

An orchestrator routes to a replica once it reports ready, so "ready" here means loaded *and* warmed: the
first real request should not pay for onnxruntime's first-run allocations or a cold KV-cache path.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Optional

from ..errors import InferneoError
from ..generation import TokenEvent
from ..sampling import SamplingParams

logger = logging.getLogger("inferneo.integrations")

WARMUP_TOKENS = 2


class WarmupFailed(InferneoError):
    """The model loaded but could not generate its warm-up tokens."""


def warmup_prompt(manifest) -> list[int]:
    """The first golden's prompt (tokens the build already ran through this model), else the BOS token (token 0
    for a bare model file, which has no manifest)."""
    if manifest is None:
        return [0]
    if manifest.goldens:
        return list(manifest.goldens[0].prompt_ids)
    bos = manifest.generation.bos_token_id
    return [bos if bos is not None else 0]


def warm_up(driver, manifest, tokens: int = WARMUP_TOKENS, timeout: float = 120.0) -> float:
    """Run one short greedy request through `driver` (an EngineDriver: the path real requests take) and
    wait for it; returns the seconds it took. Raises WarmupFailed on an error or timeout."""
    done = threading.Event()
    outcome: list = []

    def sink(item) -> None:  # driver thread
        if isinstance(item, BaseException) or (isinstance(item, TokenEvent) and item.finish_reason is not None):
            outcome.append(item)
            done.set()

    t0 = time.perf_counter()
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    driver.submit(warmup_prompt(manifest), params, sink)
    if not done.wait(timeout):
        raise WarmupFailed(f"model {driver.name!r}: warm-up did not finish within {timeout:.0f}s")
    if isinstance(outcome[0], BaseException):
        raise WarmupFailed(f"model {driver.name!r}: warm-up failed: {outcome[0]}") from outcome[0]
    seconds = time.perf_counter() - t0
    logger.info("model %s: warmed up (%d tokens in %.2fs)", driver.name, tokens, seconds)
    return seconds


def warm_up_registry(registry, tokens: int = WARMUP_TOKENS) -> dict[str, float]:
    """Warm up every loaded model of a ModelRegistry (holding a lease so none is evicted meanwhile): a generation
    model runs `warm_up` through its engine driver, an encoder embeds one text. Custom model classes are left to
    their own `load()`. Returns {model: seconds} for the models warmed."""
    from ..embedding import EmbeddingModel
    from ..drivers import EngineDriver

    seconds = {}
    for name in registry.loaded():
        lease = registry.try_acquire(name)
        if lease is None:  # evicted or closed since
            continue
        with lease:
            if isinstance(lease.driver, EngineDriver):
                seconds[name] = warm_up(lease.driver, lease.model.manifest, tokens)
            elif isinstance(lease.model, EmbeddingModel):
                t0 = time.perf_counter()
                lease.model.embed(["warm up"])
                seconds[name] = time.perf_counter() - t0
    return seconds


def load_and_warm_up(registry, lazy: bool = False) -> dict[str, float]:
    """What a server does before it reports ready (`inferneo serve`, each Ray Serve replica): load the models
    (unless lazy: those load on first use and are not warmed here), then warm up each loaded one."""
    if not lazy:
        registry.preload()
    return warm_up_registry(registry)


class LoadedModel:
    """One artifact opened for a predictor (KServe, Triton): the Model, its EngineDriver, warmed up."""

    def __init__(self, artifact: str, target: Optional[str] = None, device: str = "cpu",
                 threads: Optional[int] = None, warmup: bool = True):
        from .. import load
        from ..drivers import EngineDriver

        self.model = load(artifact, target=target, device=device, threads=threads)
        try:
            self.driver = EngineDriver(self.model.name, self.model)
            if warmup:
                warm_up(self.driver, self.model.manifest)
        except BaseException:
            self.model.close()
            raise

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def close(self, timeout: Optional[float] = 30.0) -> None:
        """Finish what is running (up to `timeout`), then unload."""
        if not self.driver.stop(timeout):
            logger.warning("model %s: requests still running after %.0fs; closing anyway", self.name, timeout or 0)
        self.model.close()
