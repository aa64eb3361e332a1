"""Prometheus metrics, vLLM-compatible names under the `pdserve:` prefix.

The router records request-level series (TTFT, inter-token latency, E2E, tokens,
finished requests by reason, KV transfer bytes/seconds/failures, routing decisions);
worker gauges (running, waiting, KV usage per role) are read from the router's latest
worker load reports at scrape time, so /metrics on the router covers the whole cluster."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

if TYPE_CHECKING:
    from router.core import Router

_LAT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
        7.5, 10.0, 20.0, 40.0, 80.0)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        lb = ["model_name"]
        self.model = model_name
        self.ttft = Histogram("pdserve:time_to_first_token_seconds", "Time to first token.",
                              lb, buckets=_LAT, registry=registry)
        self.itl = Histogram("pdserve:inter_token_latency_seconds", "Time between output chunks, per token.",
                             lb, buckets=_LAT, registry=registry)
        self.e2e = Histogram("pdserve:e2e_request_latency_seconds", "End-to-end request latency.",
                             lb, buckets=_LAT, registry=registry)
        self.queue_time = Histogram("pdserve:request_queue_time_seconds",
                                    "Admission to dispatch (reservation granted).",
                                    lb, buckets=_LAT, registry=registry)
        self.prompt_tokens = Counter("pdserve:prompt_tokens", "Prompt tokens processed.", lb,
                                     registry=registry)
        self.generation_tokens = Counter("pdserve:generation_tokens", "Tokens generated.", lb,
                                         registry=registry)
        self.success = Counter("pdserve:request_success", "Finished requests by finish reason.",
                               lb + ["finished_reason"], registry=registry)
        self.failures = Counter("pdserve:request_failure", "Requests ended with an error, by kind.",
                                lb + ["kind"], registry=registry)
        self.prefix_queries = Counter("pdserve:prefix_cache_queries", "Prompt tokens looked up in a prefix cache.",
                                      lb, registry=registry)
        self.prefix_hits = Counter("pdserve:prefix_cache_hits", "Prompt tokens found in a prefix cache.",
                                   lb, registry=registry)
        self.kv_bytes = Counter("pdserve:kv_transfer_bytes", "KV bytes moved from prefill to decode workers.",
                                lb + ["transport"], registry=registry)
        self.kv_seconds = Histogram("pdserve:kv_transfer_seconds", "Prefill worker's time from first token to decode ack.",
                                    lb + ["transport"], buckets=_LAT, registry=registry)
        self.kv_failures = Counter("pdserve:kv_transfer_failures", "Failed prefill/KV transfers by reason.",
                                   lb + ["reason"], registry=registry)
        self.routing = Counter("pdserve:routing_decisions", "Requests by path and policy.",
                               lb + ["path", "policy"], registry=registry)

    def labels(self, metric: Any, **kw: str) -> Any:
        return metric.labels(model_name=self.model, **kw)


class _WorkerCollector:
    """Scrape-time gauges from the router's view of its workers."""

    def __init__(self, router: "Router") -> None:
        self.router = router

    def collect(self):
        model = self.router.config.model_name
        running = GaugeMetricFamily("pdserve:num_requests_running", "Sequences in running batches.",
                                    labels=["model_name", "role", "worker"])
        waiting = GaugeMetricFamily("pdserve:num_requests_waiting", "Sequences queued (or awaiting KV).",
                                    labels=["model_name", "role", "worker"])
        usage = GaugeMetricFamily("pdserve:kv_cache_usage_perc", "KV cache usage (1 = full).",
                                  labels=["model_name", "role", "worker"])
        healthy = GaugeMetricFamily("pdserve:worker_healthy", "1 when the router sends work to it.",
                                    labels=["model_name", "role", "worker"])
        inflight = GaugeMetricFamily("pdserve:router_requests_inflight", "Requests admitted and not finished.",
                                     labels=["model_name"])
        inflight.add_metric([model], self.router.ledger.inflight)
        for role, table in (("prefill", self.router.prefill), ("decode", self.router.decode)):
            for wid, w in table.items():
                v = w.view
                lab = [model, role, wid]
                running.add_metric(lab, v.num_running)
                waiting.add_metric(lab, v.num_waiting)
                total = max(1, v.kv_blocks_total)
                usage.add_metric(lab, 1.0 - min(v.kv_blocks_free, total) / total if v.kv_blocks_total else 0.0)
                healthy.add_metric(lab, 1.0 if v.healthy else 0.0)
        transport = GaugeMetricFamily("pdserve:kv_transport_info", "KV transport in use.",
                                      labels=["model_name", "transport"])
        transport.add_metric([model, self.router.transport_name], 1.0)
        yield from (running, waiting, usage, healthy, inflight, transport)


def make_registry(router: "Router") -> CollectorRegistry:
    """A registry for the router's /metrics: attaches RouterMetrics to the router."""
    reg = CollectorRegistry()
    router.metrics = RouterMetrics(reg, router.config.model_name)
    reg.register(_WorkerCollector(router))
    return reg
