"""broker.prometheus: per-loop pool metrics, read from a real broker."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import broker
import broker.prometheus
from broker import runner


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def clean_runner() -> Iterator[None]:
    yield
    runner.shutdown(timeout=10)


async def query(b: broker.Broker) -> None:
    async with b.borrow() as conn:
        records, _, _ = await conn.driver.execute_query("RETURN 1 AS x")
        assert records[0]["x"] == 1


def run_in_thread(name: str, target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, name=name)
    thread.start()
    return thread


def test_per_loop_gauges_and_counters(
    bolt_config: broker.Neo4jConnectionConfig, registry: CollectorRegistry, clean_runner: None
) -> None:
    b = broker.Broker(bolt_config.replace(pool_min_size=0, pool_max_size=3))
    broker.prometheus.register(registry, b)
    held, release = threading.Event(), threading.Event()

    async def hold() -> None:
        async with b.borrow():
            held.set()
            await asyncio.to_thread(release.wait, 10)

    def busy() -> None:
        for _ in range(3):
            broker.run(query(b))
        broker.run(hold())

    def quiet() -> None:
        for _ in range(5):
            broker.run(query(b))

    threads = [run_in_thread("metrics-busy", busy), run_in_thread("metrics-quiet", quiet)]
    threads[1].join(30)
    assert held.wait(30)
    try:
        loops = b.stats_sync()
        by_thread = {entry["thread"]: key for key, entry in loops.items()}
        busy_labels = {"loop": by_thread["metrics-busy"], "thread": "metrics-busy"}
        quiet_labels = {"loop": by_thread["metrics-quiet"], "thread": "metrics-quiet"}

        # The busy loop is running (it holds a driver), the quiet one is parked.
        assert registry.get_sample_value("broker_pool_in_use", busy_labels) == 1
        assert registry.get_sample_value("broker_pool_loop_running", busy_labels) == 1
        assert registry.get_sample_value("broker_pool_in_use", quiet_labels) == 0
        assert registry.get_sample_value("broker_pool_loop_running", quiet_labels) == 0
        assert registry.get_sample_value("broker_pool_available", quiet_labels) == 1
        assert registry.get_sample_value("broker_pool_responsive", busy_labels) == 1
        assert registry.get_sample_value("broker_pool_borrows_total", busy_labels) == 4
        assert registry.get_sample_value("broker_pool_borrows_total", quiet_labels) == 5
        assert registry.get_sample_value("broker_pool_drivers_created_total", quiet_labels) == 1
        assert registry.get_sample_value("broker_pool_max_size", quiet_labels) == 3
        assert registry.get_sample_value("broker_pool_waiting", busy_labels) == 0
        assert registry.get_sample_value("broker_loops") == 2
        assert registry.get_sample_value("broker_borrows_total") == 9
        assert registry.get_sample_value("broker_drivers_created_total") == 2
    finally:
        release.set()
        threads[0].join(30)

    # The exposition is valid text format, with one series per loop.
    text = generate_latest(registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {s.labels["thread"] for s in families["broker_pool_drivers"].samples} == {
        "metrics-busy",
        "metrics-quiet",
    }
    assert families["broker_pool_borrows"].type == "counter"

    # Ended loops leave no per-loop series; the totals stay.
    runner.shutdown(timeout=10)
    assert registry.get_sample_value("broker_pool_in_use", busy_labels) is None
    assert registry.get_sample_value("broker_loops") == 0
    assert registry.get_sample_value("broker_drivers_closed_total") == 2
    assert registry.get_sample_value("broker_borrows_total") == 9
    b.close()


def test_default_broker_is_followed(
    bolt_config: broker.Neo4jConnectionConfig, registry: CollectorRegistry, clean_runner: None
) -> None:
    collector = broker.prometheus.register(registry, namespace="app")
    # Registration reads nothing: no pools, no connection.
    assert [m.name for m in collector.describe()][:2] == ["app_pool_available", "app_pool_in_use"]

    broker.configure(bolt_config.replace(pool_min_size=0))
    broker.run(query(broker.get_broker()))
    assert registry.get_sample_value("app_borrows_total") == 1

    broker.configure(bolt_config.replace(pool_min_size=0))  # a new default: counted afresh
    assert registry.get_sample_value("app_borrows_total") == 0
    broker.run(query(broker.get_broker()))
    assert registry.get_sample_value("app_borrows_total") == 1
    assert registry.get_sample_value("app_loops") == 1


async def test_histograms_and_new_counters_never_go_back(
    bolt_config: broker.Neo4jConnectionConfig, registry: CollectorRegistry
) -> None:
    b = broker.Broker(bolt_config.replace(pool_min_size=0, pool_max_size=1))
    broker.prometheus.register(registry, b)

    async def hold(seconds: float) -> None:
        async with b.borrow() as conn:
            await conn.driver.execute_query("RETURN 1")
            await asyncio.sleep(seconds)

    # Two at once on one driver: the second waits for the first (0.3 s hold).
    await asyncio.gather(hold(0.3), hold(0.3))
    await hold(0.0)
    samples = await asyncio.to_thread(lambda: generate_latest(registry).decode())
    families = {f.name: f for f in text_string_to_metric_families(samples)}
    assert families["broker_borrow_wait_seconds"].type == "histogram"
    assert families["broker_hold_seconds"].type == "histogram"

    def value(name: str, **labels: str) -> float:
        found = registry.get_sample_value(name, labels)
        assert found is not None, (name, labels)
        return found

    assert value("broker_borrow_wait_seconds_count") == 3
    assert value("broker_borrow_wait_seconds_bucket", le="0.1") <= 2, "one waited 0.3 s"
    assert value("broker_borrow_wait_seconds_bucket", le="+Inf") == 3
    assert value("broker_borrow_wait_seconds_sum") >= 0.3
    assert value("broker_hold_seconds_count") == 3
    assert value("broker_hold_seconds_bucket", le="0.25") == 1, "one held ~0 s, two 0.3 s"
    assert value("broker_hold_seconds_bucket", le="+Inf") == 3
    assert value("broker_hold_seconds_sum") >= 0.6
    loop = {"loop": here_key(b), "thread": threading.current_thread().name}
    assert value("broker_pool_requests_queued_total", **loop) == 2
    assert value("broker_pool_usage_seconds_total", **loop) >= 0.6
    assert value("broker_requests_queued_total") == 2

    # pop_stats() resets its own view, never what Prometheus reads.
    (popped,) = b.pop_stats().values()
    assert popped["borrows"] == 3
    assert value("broker_pool_borrows_total", **loop) == 3
    assert value("broker_borrow_wait_seconds_count") == 3
    assert value("broker_requests_queued_total") == 2
    await b.aclose()
    # The loop's pool has ended: its series go, the totals and histograms stay.
    assert value("broker_hold_seconds_count") == 3 and value("broker_borrows_total") == 3


def here_key(b: broker.Broker) -> str:
    (actor,) = b.actors()
    return actor.key


def test_every_counter_is_exported_per_loop_and_in_total() -> None:
    """A counter added to the pool's Counters is exported, or this fails."""
    import dataclasses
    import typing

    from broker.stats import COUNTER_SPECS, Counters, PoolStats

    names = {m.name for m in broker.prometheus.BrokerCollector(namespace="b").describe()}
    fields = [f.name for f in dataclasses.fields(Counters)]
    assert [spec.name for spec in COUNTER_SPECS] == fields
    for spec in COUNTER_SPECS:
        assert f"b_pool_{spec.metric}" in names, f"{spec.name} is not exported per loop"
        assert f"b_{spec.metric}" in names, f"{spec.name} is not exported in total"
    assert set(fields) <= set(typing.get_type_hints(PoolStats)), "stats() must report it"
