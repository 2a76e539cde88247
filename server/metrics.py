"""`/metrics` in Prometheus' text format (prometheus-client), one registry per server."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from llmx.engine.engine import Engine, Request

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# engine stat -> (metric name, help, gauge or counter)
_ENGINE_STATS = {
    "running": ("llmx_requests_running", "Requests the engine is computing.", "gauge"),
    "waiting": ("llmx_requests_waiting", "Requests waiting for the engine.", "gauge"),
    "kv_blocks_used": ("llmx_kv_blocks_used", "KV cache blocks holding data (requests' and the prefix cache's).",
                       "gauge"),
    "kv_blocks_total": ("llmx_kv_blocks_total", "KV cache blocks in the pool.", "gauge"),
    "kv_blocks_cached": ("llmx_kv_blocks_cached", "KV cache blocks the prefix cache holds.", "gauge"),
    "prefix_hit_tokens": ("llmx_prefix_cache_hit_tokens", "Prompt tokens taken from the prefix cache.", "counter"),
    "preemptions": ("llmx_preemptions", "Requests preempted for KV cache room.", "counter"),
    "draft_tokens": ("llmx_spec_draft_tokens", "Tokens proposed by speculative decoding.", "counter"),
    "accepted_tokens": ("llmx_spec_accepted_tokens", "Proposed tokens the model accepted.", "counter"),
    "acceptance_rate": ("llmx_spec_acceptance_rate", "Accepted over proposed tokens so far.", "gauge"),
    "tokens_per_step": ("llmx_spec_tokens_per_step", "Tokens per verify step, accepted ones and the model's own.",
                        "gauge"),
}


class _EngineCollector(Collector):
    def __init__(self, engines: Callable[[], dict[str, Engine]]):
        self._engines = engines

    def collect(self) -> Iterator:
        stats = {name: engine.stats() for name, engine in self._engines().items()}
        for key, (name, help_text, kind) in _ENGINE_STATS.items():
            family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, help_text, labels=["model"])
            for model, values in stats.items():
                family.add_metric([model], values[key])
            yield family


class Metrics:
    def __init__(self, engines: Callable[[], dict[str, Engine]], cache_hits: Callable[[], int]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llmx_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("llmx_prompt_tokens", "Prompt tokens of finished requests.", ["model"],
                                     registry=r)
        self.generated_tokens = Counter("llmx_generation_tokens", "Tokens generated.", ["model"], registry=r)
        self.ttft = Histogram("llmx_time_to_first_token_seconds", "Time to first token.", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("llmx_inter_token_latency_seconds", "Time between a request's tokens.", ["model"],
                             buckets=LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(engines))
        r.register(_CacheHits(cache_hits))

    def finished(self, model: str, request: Request) -> None:
        self.prompt_tokens.labels(model).inc(len(request.prompt_ids))
        self.generated_tokens.labels(model).inc(len(request.token_ids))
        if request.first_token_at is not None:
            self.ttft.labels(model).observe(request.first_token_at - request.submitted_at)
        times = request.token_times
        for a, b in zip(times, times[1:], strict=False):
            self.itl.labels(model).observe(b - a)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CacheHits(Collector):
    def __init__(self, hits: Callable[[], int]):
        self._hits = hits

    def collect(self) -> Iterator:
        family = CounterMetricFamily("llmx_response_cache_hits", "Responses served from the response cache.")
        family.add_metric([], self._hits())
        yield family
