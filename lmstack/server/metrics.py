"""Prometheus metrics for `GET /metrics`, named and bucketed like vLLM's (prefix `lmstack:`).

Every series carries a `model_name` label, the served model's name, as vLLM's do: a
dashboard or query written for vLLM's series (`{model_name="..."}`) selects ours, and
several servers behind one Prometheus stay apart. Embedding metrics carry the embedding
model's name.

Per-request latencies are observed by the server as requests finish. Engine-wide state
(queue lengths, KV usage, token and preemption counters) is read from engine.stats() at
scrape time by a custom collector, so it is always current and never double-counted when
several apps share one engine. Each app has its own CollectorRegistry.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lmstack.engine.outputs import RequestOutput

# vLLM's buckets, so dashboards built for vLLM read ours unchanged.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5]
TTFT_BUCKETS += [5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0]
ITL_BUCKETS += [7.5, 10.0, 20.0, 40.0, 80.0]
REQUEST_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0]
REQUEST_BUCKETS += [60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
# An embedding request is one forward pass of a small encoder, shared with other requests.
EMBEDDING_BUCKETS = [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]
BATCH_SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]


def queue_time(out: RequestOutput) -> float | None:
    """Arrival to first scheduling (a request that timed out in the queue: to its end)."""
    start = out.first_scheduled_time or out.finish_time
    return None if start is None else start - out.arrival_time


def memory_limit_bytes() -> int:
    """The memory this process may use: the cgroup limit if one is set, else physical RAM.
    process_resident_memory_bytes / this is what the memory alert watches."""
    try:
        raw = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if raw.isdigit():
            return int(raw)
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class _EngineCollector(Collector):
    """Engine state and counters, read from engine.stats() on every scrape."""

    GAUGES = (
        ("num_requests_running", "num_running", "Requests in the running batch."),
        ("num_requests_waiting", "num_waiting", "Requests waiting to be scheduled."),
        ("kv_cache_usage_perc", "kv_cache_usage", "Fraction of KV-cache blocks in use (0-1)."),
    )
    COUNTERS = (
        ("prompt_tokens", "prompt_tokens", "Prompt tokens processed."),
        ("generation_tokens", "generation_tokens", "Tokens generated."),
        ("request_timeouts", "num_timeouts", "Requests ended by their timeout."),
        ("preemptions", "num_preemptions", "Sequences preempted for KV-cache space."),
        ("prefix_cache_queries", "prefix_cache_queries", "Prompt blocks looked up."),
        ("prefix_cache_hits", "prefix_cache_hits", "Prompt blocks found in the prefix cache."),
    )

    def __init__(self, engine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self.memory_limit = memory_limit_bytes()

    def _family(self, kind, name: str, doc: str, value, labels: dict | None = None) -> Metric:
        labels = {"model_name": self.model_name, **(labels or {})}
        family = kind(name, doc, labels=list(labels))
        family.add_metric(list(labels.values()), value)
        return family

    def collect(self) -> Iterator[Metric]:
        precision = self.engine.precision
        yield self._family(
            GaugeMetricFamily,
            "lmstack:model_precision_info",
            "The weights' precision (--dtype, auto resolved) and the CPU it was chosen for.",
            1,
            {"dtype": precision["dtype"], "cpu": precision["cpu"]},
        )
        stats = self.engine.stats()
        yield self._family(
            GaugeMetricFamily,
            "lmstack:memory_limit_bytes",
            "Memory this server may use (cgroup limit or physical RAM).",
            self.memory_limit,
        )
        for name, key, doc in self.GAUGES:
            yield self._family(GaugeMetricFamily, f"lmstack:{name}", doc, stats.get(key, 0))
        for name, key, doc in self.COUNTERS:
            # CounterMetricFamily exposes `<name>_total`, like Counter.
            yield self._family(CounterMetricFamily, f"lmstack:{name}", doc, stats.get(key, 0))


class ServerMetrics:
    """The OpenAI app's metrics for one served model (`model_name` on every series)."""

    def __init__(self, engine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        reg = self.registry
        label = {"model_name": model_name}
        self.ttft = Histogram(
            "lmstack:time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            list(label),
            buckets=TTFT_BUCKETS,
            registry=reg,
        ).labels(**label)
        self.inter_token = Histogram(
            "lmstack:inter_token_latency_seconds",
            "Time between successive tokens of one request, as the server receives them.",
            list(label),
            buckets=ITL_BUCKETS,
            registry=reg,
        ).labels(**label)
        self.e2e = Histogram(
            "lmstack:e2e_request_latency_seconds",
            "Time from arrival to the last token.",
            list(label),
            buckets=REQUEST_BUCKETS,
            registry=reg,
        ).labels(**label)
        self.queue = Histogram(
            "lmstack:request_queue_time_seconds",
            "Time a request waited before it was scheduled.",
            list(label),
            buckets=REQUEST_BUCKETS,
            registry=reg,
        ).labels(**label)
        # Counter appends `_total`: these expose lmstack:request_success_total and so on.
        self.success = Counter(
            "lmstack:request_success",
            "Finished engine requests, by finish reason.",
            ["model_name", "finished_reason"],
            registry=reg,
        )
        self.rejected = Counter(
            "lmstack:requests_rejected",
            "Requests refused admission: queue full (429) or server draining (503).",
            ["model_name", "reason"],
            registry=reg,
        )
        reg.register(_EngineCollector(engine, model_name))

    def reject(self, reason: str) -> None:
        """A request refused admission: `queue_full` (429) or `draining` (503)."""
        self.rejected.labels(model_name=self.model_name, reason=reason).inc()

    def observe_finished(self, out: RequestOutput) -> None:
        reason = out.finish_reason or "unknown"
        self.success.labels(model_name=self.model_name, finished_reason=reason).inc()
        if out.ttft is not None:
            self.ttft.observe(out.ttft)
        if out.latency is not None:
            self.e2e.observe(out.latency)
        waited = queue_time(out)
        if waited is not None:
            self.queue.observe(waited)

    def observe_abort(self) -> None:
        """An engine request the server abandoned (client gone): no final output arrives."""
        self.success.labels(model_name=self.model_name, finished_reason="abort").inc()

    def render(self) -> bytes:
        """The exposition text (engine figures from the step thread's latest snapshot)."""
        return generate_latest(self.registry)


class EmbeddingMetrics:
    """/v1/embeddings on the app's registry, labelled with the embedding model's name.

    `batches` counts forward passes (calls of the embedder): requests / batches is how
    many requests the batcher served per pass.
    """

    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        label = {"model_name": model_name}
        names = list(label)

        def counter(name: str, doc: str):
            return Counter(name, doc, names, registry=registry).labels(**label)

        self.requests = counter("lmstack:embedding_requests", "Embedding requests answered.")
        self.inputs = counter("lmstack:embedding_inputs", "Inputs embedded (texts or id lists).")
        self.prompt_tokens = counter(
            "lmstack:embedding_prompt_tokens", "Tokens embedded, counted by the embedder."
        )
        self.batches = counter(
            "lmstack:embedding_batches", "Forward passes of the embedder (one per batch)."
        )
        self.batch_inputs = Histogram(
            "lmstack:embedding_batch_inputs",
            "Inputs per forward pass of the embedder, over every request in the batch.",
            names,
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        ).labels(**label)
        self.latency = Histogram(
            "lmstack:embedding_request_latency_seconds",
            "Time from a valid embedding request to its vectors (queue and forward pass).",
            names,
            buckets=EMBEDDING_BUCKETS,
            registry=registry,
        ).labels(**label)
