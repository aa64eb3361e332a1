"""A worker's own Prometheus endpoint (beside the router's cluster-wide /metrics).

Scrape-time gauges and counters read from the worker's engine: queue sizes, KV pool
use, prefix-cache queries and hits, and (decode workers) open reservations. Served by
prometheus_client's HTTP server on the worker's internal address."""
from __future__ import annotations

import logging
from typing import Any, Callable

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

logger = logging.getLogger(__name__)


class _WorkerCollector:
    def __init__(self, worker_id: str, role: str, model: str, engine: Any,
                 extra: Callable[[], dict[str, float]]) -> None:
        self.labels = [model, role, worker_id]
        self.engine, self.extra = engine, extra

    def collect(self):
        names = ["model_name", "role", "worker"]
        st = self.engine.stats()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(self.labels, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric(self.labels, value)
            return c
        yield gauge("pdserve:num_requests_running", "Sequences in the running batch.", st["num_running"])
        yield gauge("pdserve:num_requests_waiting", "Sequences waiting to be scheduled.", st["num_waiting"])
        yield gauge("pdserve:kv_cache_usage_perc", "KV blocks in use / total.", st["kv_cache_usage"])
        yield gauge("pdserve:kv_cache_blocks_total", "KV blocks in the pool.", st["kv_blocks_total"])
        yield gauge("pdserve:kv_cache_blocks_cached", "Evictable prefix-cache blocks.", st["kv_blocks_cached"])
        yield counter("pdserve:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      self.engine.kv.prefix_queries_tokens)
        yield counter("pdserve:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                      self.engine.kv.prefix_hit_tokens)
        for name, value in self.extra().items():
            yield gauge(f"pdserve:{name}", name.replace("_", " "), value)


def serve_worker_metrics(worker_id: str, role: str, model: str, engine: Any, host: str,
                         port: int, extra: Callable[[], dict[str, float]] = dict) -> str:
    """Start the endpoint (port 0: any free port); returns "host:port"."""
    registry = CollectorRegistry()
    registry.register(_WorkerCollector(worker_id, role, model, engine, extra))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    bound = server.server_address[1]
    logger.info("worker %s metrics on http://%s:%d/metrics", worker_id, host, bound)
    return f"{host}:{bound}"
