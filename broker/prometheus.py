"""Prometheus metrics of the pools: one series per event loop.

Install with ``neo4j-loop-broker[prometheus]``, then register the collector once per
process (a Celery worker, a web app)::

    import prometheus_client
    import broker.prometheus

    broker.prometheus.register()            # the default broker
    prometheus_client.start_http_server(9100)

Every scrape reads :meth:`broker.Broker.stats_sync` (loops that are parked
between tasks are read directly, running ones are asked) and exports, with
``loop`` and ``thread`` labels:

- gauges ``broker_pool_available``, ``broker_pool_in_use``,
  ``broker_pool_creating``, ``broker_pool_checking``, ``broker_pool_closing``,
  ``broker_pool_drivers`` (all drivers of the loop), ``broker_pool_waiting``,
  ``broker_pool_max_size``, ``broker_pool_min_size``,
  ``broker_pool_responsive``, ``broker_pool_loop_running``;
- counters ``broker_pool_borrows_total``, ``broker_pool_timeouts_total``,
  ``broker_pool_cancellations_total``, ``broker_pool_errors_total``,
  ``broker_pool_drivers_created_total``, ``broker_pool_drivers_closed_total``,
  ``broker_pool_drivers_discarded_total``, ``broker_pool_rejected_total``,
  ``broker_pool_requests_queued_total``, ``broker_pool_connect_errors_total``,
  ``broker_pool_returns_bad_total``, ``broker_pool_drivers_lost_total``,
  ``broker_pool_hook_errors_total``, and the time sums
  ``broker_pool_wait_seconds_total``, ``broker_pool_usage_seconds_total``,
  ``broker_pool_connect_seconds_total``.

A loop's series go away when the loop ends. The same counters summed over
every loop the broker ever served, which never go back, are exported
without labels (``broker_borrows_total``, ``broker_drivers_created_total``
...), with the number of live loops in ``broker_loops``, and two histograms
over every loop: ``broker_borrow_wait_seconds`` (how long each borrow waited
for its driver) and ``broker_hold_seconds`` (how long each driver was held).

Every exported counter reads counters that only grow: ``pop_stats()``
resets its own view only.

Under a prefork Celery worker each child process has its own pools, and so
its own collector to scrape.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

try:
    from prometheus_client.core import (
        REGISTRY,
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "broker.prometheus needs prometheus_client: pip install 'neo4j-loop-broker[prometheus]'"
    ) from exc

from broker import default
from broker.broker import Broker
from broker.stats import COUNTER_SPECS, GAUGES, CounterSpec

__all__ = ["BrokerCollector", "register"]

_LABELS = ("loop", "thread")

_HISTOGRAMS = {
    "borrow_wait": ("borrow_wait_seconds", "How long each borrow waited for its driver"),
    "hold": ("hold_seconds", "How long each borrowed driver was held"),
}


class BrokerCollector:
    """Exports a broker's per-loop pool counters (the default broker unless given).

    Without ``source`` the current default broker is read at every scrape, so
    a later :func:`broker.configure` is followed. ``timeout`` bounds how long
    a scrape waits for a running loop to answer.
    """

    def __init__(
        self, source: Broker | None = None, *, namespace: str = "broker", timeout: float = 0.5
    ) -> None:
        self._source = source
        self._namespace = namespace
        self._timeout = timeout

    def _broker(self) -> Broker:
        return self._source if self._source is not None else default.get_broker()

    def describe(self) -> list[Metric]:
        """The metric families, without reading the pools (used at registration)."""
        return list(self._families().values())

    def collect(self) -> Iterator[Metric]:
        """One sample per loop and metric, plus the process-wide totals."""
        source = self._broker()
        stats = source.stats_sync(self._timeout)
        families = self._families()
        for entry in stats.values():
            labels = [str(entry.get("loop", "")), str(entry.get("thread", ""))]
            for key in GAUGES:
                families[key].add_metric(labels, float(entry.get(key, 0)))  # type: ignore[arg-type]
            for spec in COUNTER_SPECS:
                value = float(entry.get(spec.name, 0))  # type: ignore[arg-type]
                families[spec.name].add_metric(labels, _in_unit(value, spec))
            for flag in ("responsive", "loop_running"):
                families[flag].add_metric(labels, 1.0 if entry.get(flag) else 0.0)
        totals = source.totals()
        for spec in COUNTER_SPECS:
            value = float(totals.get(spec.name, 0))
            families[f"all_{spec.name}"].add_metric([], _in_unit(value, spec))
        families["loops"].add_metric([], float(len(stats)))
        for key, histogram in source.histograms().items():
            buckets = [(_le(bound), float(count)) for bound, count in histogram.cumulative()]
            families[f"histogram_{key}"].add_metric([], buckets, histogram.sum)
        yield from families.values()

    def _families(self) -> dict[str, Any]:
        ns = self._namespace
        families: dict[str, Any] = {}
        for key, (name, text) in GAUGES.items():
            families[key] = GaugeMetricFamily(f"{ns}_{name}", text, labels=_LABELS)
        for spec in COUNTER_SPECS:
            families[spec.name] = CounterMetricFamily(
                f"{ns}_pool_{spec.metric}", spec.help, labels=_LABELS
            )
        families["responsive"] = GaugeMetricFamily(
            f"{ns}_pool_responsive",
            "0 if the loop was running but its pool did not answer the scrape in time",
            labels=_LABELS,
        )
        families["loop_running"] = GaugeMetricFamily(
            f"{ns}_pool_loop_running",
            "1 if the loop was running (busy with a task) at the scrape",
            labels=_LABELS,
        )
        for spec in COUNTER_SPECS:
            families[f"all_{spec.name}"] = CounterMetricFamily(
                f"{ns}_{spec.metric}", f"{spec.help}, over every loop"
            )
        families["loops"] = GaugeMetricFamily(f"{ns}_loops", "Event loops with a live pool")
        for key, (name, text) in _HISTOGRAMS.items():
            families[f"histogram_{key}"] = HistogramMetricFamily(f"{ns}_{name}", text)
        return families


def _in_unit(value: float, spec: CounterSpec) -> float:
    """Durations are kept in milliseconds and exported in seconds."""
    return value / 1000 if spec.unit == "ms" else value


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def register(
    registry: Any = None,
    source: Broker | None = None,
    *,
    namespace: str = "broker",
    timeout: float = 0.5,
) -> BrokerCollector:
    """Make a :class:`BrokerCollector` and register it (default: the global registry)."""
    collector = BrokerCollector(source, namespace=namespace, timeout=timeout)
    (registry if registry is not None else REGISTRY).register(collector)
    return collector
