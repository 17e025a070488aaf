"""``GET /metrics``: the service in Prometheus' text format (``prometheus_client``, one registry per app).

Queue figures and the latency histogram are read from the store at each scrape, so every API process
in front of one store reports the same numbers::

    pmgen_queue_depth                         generations waiting
    pmgen_generations_running                 generations claimed by a worker now
    pmgen_generations{status}                 generations per status (queued, running, done, failed)
    pmgen_generation_latency_seconds          histogram: accepted → done, over done generations
    pmgen_replicas                            model replicas on Ray Serve, else worker threads here (0: ingress only)
    pmgen_waits_parked                        long polls parked on this process
    pmgen_batched_generations_total{size}     generations run through this process (its workers or the replicas
                                              it dispatches to), by the size of the batch they ran in
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
"""Upper bounds (seconds) of the accepted → done histogram."""
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServiceCollector(Collector):
    """Collects the figures above from a :class:`pmgen.serve.service.Service` at each scrape."""

    def __init__(self, service: Any):
        self.service = service

    def collect(self) -> Iterator[Any]:
        svc = self.service
        counts = svc.store.counts()
        yield GaugeMetricFamily("pmgen_queue_depth", "Generations waiting in the store's queue.", counts["queued"])
        yield GaugeMetricFamily("pmgen_generations_running", "Generations claimed by a worker now.",
                                counts["running"])
        by_status = GaugeMetricFamily("pmgen_generations", "Stored generations per status.", labels=["status"])
        for status, n in counts.items():
            by_status.add_metric([status], n)
        yield by_status
        cumulative, total, seconds = svc.store.latency_buckets(LATENCY_BUCKETS)
        buckets = [(f"{b:g}", c) for b, c in zip(LATENCY_BUCKETS, cumulative)] + [("+Inf", total)]
        yield HistogramMetricFamily("pmgen_generation_latency_seconds", "Generations accepted → done (seconds).",
                                    buckets=buckets, sum_value=seconds)
        yield GaugeMetricFamily("pmgen_replicas", "Model replicas on Ray Serve, else model worker threads in this "
                                "process (0: an ingress only).",
                                svc.replicas)
        yield GaugeMetricFamily("pmgen_waits_parked", "Long polls parked on this process.", svc.waits.parked)
        batches = CounterMetricFamily("pmgen_batched_generations", "Generations run through this process, by the "
                                      "size of the (dynamic) batch they ran in.", labels=["size"])
        for size, n in sorted(svc.worker.batches.items() if svc.worker is not None else ()):
            batches.add_metric([str(size)], n)
        yield batches


def metrics_registry(service: Any) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(service))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus' text exposition format."""
    return generate_latest(registry)
