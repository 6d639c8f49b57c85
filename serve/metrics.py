"""Prometheus metrics of one server (its own CollectorRegistry, so several servers in one process
do not collide): requests, latency, batch sizes, generated tokens, and the adapter cache."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from loraplex.serve.targets import Events


class Metrics(Events):
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("loraplex_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.latency = Histogram("loraplex_request_seconds", "Time to answer a request (to the last byte)",
                                 ["endpoint"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.batch_size = Histogram("loraplex_batch_size", "Requests per gathered batch (per lane)", ["kind"],
                                    registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.generated = Counter("loraplex_generated_tokens", "Tokens generated", registry=r)
        self.resident_g = Gauge("loraplex_adapters_resident", "Adapters resident in the slot bank", registry=r)
        self.hits = Counter("loraplex_adapter_cache_hits", "Adapter lookups served from the slot bank", registry=r)
        self.misses = Counter("loraplex_adapter_cache_misses", "Adapters copied into the slot bank on demand", registry=r)
        self.reads = Counter("loraplex_adapter_blob_reads", "Adapters read from the registry's blobs (not in host memory)",
                             registry=r)
        self.evictions = Counter("loraplex_adapter_cache_evictions", "Adapters evicted (least recently used)",
                                 registry=r)

    # Events (called by the engine on the batching thread)
    def cache(self, hit: bool) -> None:
        (self.hits if hit else self.misses).inc()

    def evicted(self) -> None:
        self.evictions.inc()

    def resident(self, n: int) -> None:
        self.resident_g.set(n)

    def read(self) -> None:
        self.reads.inc()

    # the scheduler and the app
    def batch(self, kind: str, n: int) -> None:
        self.batch_size.labels(kind).observe(n)

    def tokens(self, n: int) -> None:
        self.generated.inc(n)

    def answered(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)
