"""Prometheus metrics of one inference app (its own registry, so several apps can live in one process).
Request count and latency by route come from services/http_metrics.py, shared with the job API."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram

from services.http_metrics import LATENCY_BUCKETS, HttpMetrics

SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class InferenceMetrics(HttpMetrics):
    def __init__(self) -> None:
        super().__init__("chorus_inference")
        r = self.registry
        self.rows = Counter("chorus_inference_rows", "Rows classified.", registry=r)
        self.pairs = Counter("chorus_inference_pairs", "(row, member) pairs run through the model.", registry=r)
        self.batch_pairs = Histogram(
            "chorus_inference_batch_pairs", "(row, member) pairs per batch.", buckets=SIZE_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "chorus_inference_batch_requests", "Requests merged into one batch.", buckets=SIZE_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "chorus_inference_batch_seconds", "Model time per batch.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.lazy_loads = Counter(
            "chorus_inference_lazy_loads", "Ensembles loaded by their first classify request.", registry=r
        )
        self.adapter_loads = Histogram(
            "chorus_inference_ensemble_load_seconds", "Ensemble load time.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.loaded_adapters = Gauge(
            "chorus_inference_loaded_adapters", "Adapters resident in device slots.", registry=r
        )
        self.pinned_adapters = Gauge(
            "chorus_inference_pinned_adapters", "Adapters pinned by loaded ensembles or requests.", registry=r
        )
        self.cached_adapters = Gauge(
            "chorus_inference_host_cached_adapters", "Verified adapters in host memory.", registry=r
        )
        self.loaded_ensembles = Gauge("chorus_inference_loaded_ensembles", "Ensembles being served.", registry=r)
        self.queued = Gauge("chorus_inference_queued_requests", "Requests waiting for the model.", registry=r)

    def bind(
        self,
        *,
        resident: Callable[[], float],
        pinned: Callable[[], float],
        cached: Callable[[], float],
        ensembles: Callable[[], float],
        queued: Callable[[], float],
    ) -> None:
        self.loaded_adapters.set_function(resident)
        self.pinned_adapters.set_function(pinned)
        self.cached_adapters.set_function(cached)
        self.loaded_ensembles.set_function(ensembles)
        self.queued.set_function(queued)

    def on_batch(self, requests: int, pairs: int, seconds: float) -> None:
        self.batch_requests.observe(requests)
        self.batch_pairs.observe(pairs)
        self.batch_seconds.observe(seconds)
        self.pairs.inc(pairs)
