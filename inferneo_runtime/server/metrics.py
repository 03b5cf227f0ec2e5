"""Prometheus metrics for `GET /metrics` (prometheus-client, one CollectorRegistry per app).

Request-path metrics are counters and histograms updated as requests run. Model state (loaded models,
weight and KV-cache bytes, loads, evictions, sequences in flight) is read from the ModelRegistry at
scrape time by a collector, so it cannot drift from the registry's own bookkeeping.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..registry import ModelRegistry

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Ours under the names vLLM's dashboards and alerts read, where the meaning is the same (their label
# `model_name` is our `model`). Metrics without a same-meaning vLLM twin are not aliased.
VLLM_NAMES = {
    "inferneo_prompt_tokens": "vllm:prompt_tokens",
    "inferneo_generation_tokens": "vllm:generation_tokens",
    "inferneo_time_to_first_token_seconds": "vllm:time_to_first_token_seconds",
    "inferneo_request_latency_seconds": "vllm:e2e_request_latency_seconds",
    "inferneo_prefix_cache_lookup_tokens": "vllm:prefix_cache_queries",
    "inferneo_prefix_cache_hit_tokens": "vllm:prefix_cache_hits",
    "inferneo_spec_draft_tokens": "vllm:spec_decode_num_draft_tokens",
    "inferneo_spec_accepted_tokens": "vllm:spec_decode_num_accepted_tokens",
}


class _RegistryCollector:
    def __init__(self, registry: ModelRegistry, in_flight: Callable[[], int], max_queue: int):
        self.registry = registry
        self.in_flight = in_flight
        self.max_queue = max_queue

    def collect(self):
        entries = list(self.registry.entries.values())
        label = {id(e): self.registry.display_id(e) for e in entries}
        g = GaugeMetricFamily("inferneo_models_loaded", "Models loaded now")
        g.add_metric([], sum(e.state == "loaded" for e in entries))
        yield g
        g = GaugeMetricFamily("inferneo_models_registered", "Models this server can serve")
        g.add_metric([], len(entries))
        yield g
        per_model = {
            "inferneo_model_loaded": ("1 while the model is loaded", lambda e: int(e.state == "loaded")),
            "inferneo_model_weight_bytes": ("Bytes of the served target's files", lambda e: e.weight_bytes),
            "inferneo_kv_cache_bytes": ("Bytes of the model's KV cache now", lambda e: e.cache_bytes),
            "inferneo_sequences_in_flight": ("Sequences running or waiting in the model's engine",
                                             lambda e: e.driver.in_flight if e.driver is not None else 0),
        }
        for name, (doc, value) in per_model.items():
            g = GaugeMetricFamily(name, doc, labels=["model"])
            for e in entries:
                g.add_metric([label[id(e)]], value(e))
            yield g
        counters = (("inferneo_model_loads", "Times the model was loaded", "loads"),
                    ("inferneo_model_evictions", "Times the model was evicted to fit the budget", "evictions"))
        for name, doc, attr in counters:
            c = CounterMetricFamily(name, doc, labels=["model"])
            for e in entries:
                c.add_metric([label[id(e)]], getattr(e, attr))
            yield c
        yield from _engine_counters(entries, label)
        g = GaugeMetricFamily("inferneo_memory_used_bytes", "Weights + KV caches of the loaded models")
        g.add_metric([], self.registry.memory_used())
        yield g
        if self.registry.memory_budget_bytes is not None:
            g = GaugeMetricFamily("inferneo_memory_budget_bytes", "The memory budget for loaded models")
            g.add_metric([], self.registry.memory_budget_bytes)
            yield g
        g = GaugeMetricFamily("inferneo_requests_in_flight", "Sequences admitted and not finished (all models)")
        g.add_metric([], self.in_flight())
        yield g
        g = GaugeMetricFamily("inferneo_max_queue", "Most sequences in flight before requests get 429")
        g.add_metric([], self.max_queue)
        yield g


def _engine_counters(entries, label):
    """Speculative decoding and prefix caching, per model, from its driver (absent for custom/embedding models)."""
    drivers = [(label[id(e)], e.driver) for e in entries if getattr(e.driver, "spec_stats", None) is not None]
    spec = (("inferneo_spec_draft_tokens", "Tokens drafted by speculative decoding", "drafted"),
            ("inferneo_spec_accepted_tokens", "Drafted tokens the model kept", "accepted"))
    for name, doc, attr in spec:
        c = CounterMetricFamily(name, doc, labels=["model"])
        for model, d in drivers:
            c.add_metric([model], getattr(d.spec_stats, attr))
        yield c
    g = GaugeMetricFamily("inferneo_spec_acceptance_rate", "Share of drafted tokens kept (0 before any draft)",
                          labels=["model"])
    for model, d in drivers:
        g.add_metric([model], d.spec_stats.acceptance_rate)
    yield g
    cached = [(model, d.prefix_cache) for model, d in drivers if d.prefix_cache is not None]
    pc = (("inferneo_prefix_cache_hit_tokens", "Prompt tokens whose keys/values came from the prefix cache", "hit_tokens"),
          ("inferneo_prefix_cache_lookup_tokens", "Prompt tokens looked up in the prefix cache", "lookup_tokens"))
    for name, doc, attr in pc:
        c = CounterMetricFamily(name, doc, labels=["model"])
        for model, p in cached:
            c.add_metric([model], getattr(p, attr))
        yield c
    g = GaugeMetricFamily("inferneo_prefix_cache_bytes", "Bytes held by the prefix cache", labels=["model"])
    for model, p in cached:
        g.add_metric([model], p.nbytes)
    yield g


class _WithVLLMNames:
    """A collector's metrics, each of VLLM_NAMES followed by its twin under vLLM's name (one collection serves both)."""

    def __init__(self, source):
        self.source = source

    def collect(self):
        for family in self.source.collect():
            yield family
            alias = VLLM_NAMES.get(family.name)
            if alias is None:
                continue
            twin = Metric(alias, family.documentation + " (the same as " + family.name + ")", family.type)
            for sample in family.samples:
                labels = {("model_name" if k == "model" else k): v for k, v in sample.labels.items()}
                twin.add_sample(alias + sample.name[len(family.name):], labels, sample.value, sample.timestamp)
            yield twin


class Metrics:
    def __init__(self, registry: ModelRegistry, in_flight: Callable[[], int], max_queue: int):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("inferneo_requests", "Requests to the OpenAI endpoints by HTTP status "
                                "(499: the client went away)", ["model", "endpoint", "status"], registry=r)
        # these four are registered below, beside their vLLM-named twins
        self.prompt_tokens = Counter("inferneo_prompt_tokens", "Prompt tokens processed", ["model"], registry=None)
        self.generation_tokens = Counter("inferneo_generation_tokens", "Tokens generated", ["model"], registry=None)
        self.ttft = Histogram("inferneo_time_to_first_token_seconds", "From request arrival to its first token",
                              ["model"], buckets=TTFT_BUCKETS, registry=None)
        self.latency = Histogram("inferneo_request_latency_seconds", "From request arrival to its last token",
                                 ["model", "endpoint"], buckets=LATENCY_BUCKETS, registry=None)
        self.routed = Counter("inferneo_routed_requests", "Requests without a model routed by a rule (rule=\"\": "
                              "the default model)", ["rule", "model"], registry=r)
        self.ab_requests = Counter("inferneo_ab_requests", "Requests of an A/B test by arm and HTTP status",
                                   ["test", "arm", "model", "status"], registry=r)
        self.ab_latency = Histogram("inferneo_ab_latency_seconds", "Latency of an A/B test's arms (successful "
                                    "requests)", ["test", "arm"], buckets=LATENCY_BUCKETS, registry=r)
        self.ab_tokens = Counter("inferneo_ab_generation_tokens", "Tokens generated by an A/B test's arms",
                                 ["test", "arm"], registry=r)
        for source in (self.prompt_tokens, self.generation_tokens, self.ttft, self.latency,
                       _RegistryCollector(registry, in_flight, max_queue)):
            r.register(_WithVLLMNames(source))

    def render(self) -> bytes:
        return generate_latest(self.registry)
