"""Prometheus metrics with prometheus_client: one registry per program, the library's process
metrics (RSS, CPU, open fds), and the latency histograms users alert on."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# from a few milliseconds (a runtime-API update) to a minute (a drain)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

Reading = tuple[str, str, str, float]  # name, "counter" or "gauge", help, value


class _Readings(Collector):
    """Counters and gauges read from the program's own state at scrape time."""

    def __init__(self, read: Callable[[], Iterable[Reading]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        for name, kind, text, value in self._read():
            if kind == "counter":
                yield CounterMetricFamily(name.removesuffix("_total"), text, value=value)
            else:
                yield GaugeMetricFamily(name, text, value=value)


class Registry:
    def __init__(self, read: Callable[[], Iterable[Reading]]) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.registry.register(_Readings(read))

    def histogram(self, name: str, text: str) -> Histogram:
        return Histogram(name, text, buckets=BUCKETS, registry=self.registry)

    def text(self) -> str:
        return generate_latest(self.registry).decode()
