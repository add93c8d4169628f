"""Prometheus metrics of a server process (text format at GET /metrics)."""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class BackendMetrics:
    """Counters and histograms updated by the request handlers; Redis-backed gauges collected at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.predict_latency = Histogram(
            "clipseg_predict_seconds", "Wall time of a /predict request", registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
        )
        self.tasks = Counter("clipseg_predict_tasks", "Tasks answered by /predict", ["outcome"], registry=r)
        self.regions = Counter("clipseg_predict_regions", "Regions returned by /predict", registry=r)
        self.errors = Counter("clipseg_errors", "Errors by kind", ["kind"], registry=r)
        self.requests = Counter("clipseg_http_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.webhooks = Counter("clipseg_webhooks", "Webhook events", ["action", "outcome"], registry=r)
        self.model_info = Info("clipseg_model", "Model being served", registry=r)
        self._collectors: list[Callable[[], list[GaugeMetricFamily]]] = []

        outer = self

        class _Dynamic:
            def collect(self):
                for fn in outer._collectors:
                    try:
                        yield from fn()
                    except Exception:  # noqa: BLE001 - a scrape must not fail because Redis is down
                        outer.errors.labels("metrics_collect").inc()

        r.register(_Dynamic())

    def add_collector(self, fn: Callable[[], list[GaugeMetricFamily]]) -> None:
        """Register a function returning gauge families computed at scrape time (queue depth, corrections, ...)."""
        self._collectors.append(fn)

    def set_model(self, name: str, version: str | None) -> None:
        self.model_info.info({"model": name, "version": version or ""})

    def render(self) -> bytes:
        return generate_latest(self.registry)


def gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(labels or {}))
    family.add_metric(list((labels or {}).values()), value)
    return family


def spool_gauges(inbox) -> list[GaugeMetricFamily]:
    """Webhook events set aside by the spool (`clipseg spool` lists them), and whether the spool can be written."""
    if inbox is None:
        return []
    counts = inbox.counts()
    return [
        gauge("clipseg_spool_rejected", "Webhook events rejected as invalid (kept in spool/rejected/)", counts["rejected"]),
        gauge("clipseg_spool_quarantined", "Webhook events that failed repeatedly (kept in spool/quarantine/)",
              counts["quarantined"]),
        gauge("clipseg_spool_write_failing", "1 while the spool cannot be written (webhooks answer 503)",
              float(inbox.spool_error is not None)),
    ]
