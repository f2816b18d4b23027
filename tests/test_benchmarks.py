"""The benchmark cannot silently measure nothing: each scenario ran its work."""

from __future__ import annotations

import tracemalloc

import pytest

from benchmarks import memory
from benchmarks.scenarios import SCENARIOS
from broker.testing import BoltServer


def test_heap_figure_ignores_garbage_freed_meanwhile() -> None:
    """What an earlier measurement left and the loops' window frees is not theirs."""
    tracemalloc.start()
    try:
        earlier = [bytearray(1 << 20)]

        async def start() -> None:
            earlier.clear()  # freed while the loops are measured

        per_loop = memory._measure(4, 1, start, heap=True)
    finally:
        tracemalloc.stop()
    assert per_loop >= 0


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_runs_its_work(name: str, bolt_server: BoltServer) -> None:
    result = SCENARIOS[name](bolt_server, True)
    assert result.rows and result.checks
    for row in result.rows:
        assert row.work > 0, row
        assert row.value == row.value, row  # not NaN
        # RSS differences may come out below zero (the allocator gives memory back).
        assert row.value >= 0 or "RSS" in row.case, row
    timed = [r for r in result.rows if r.unit.endswith("/s") or r.unit.startswith("µs")]
    assert all(r.value > 0 for r in timed)
    assert timed or name == "memory"
    if name == "celery":
        drivers = {r.case.split(")")[0]: r.drivers for r in result.rows}
        assert drivers["local, (a"] == 40, "a new driver for each of the 40 tasks"
        assert drivers["TLS +1 ms, (a"] == 20, "a new driver for each of the 20 tasks"
        for network in ("local", "TLS +1 ms"):
            reused = drivers[f"{network}, (c"]
            assert reused is not None and reused <= 4 * 4, "reused per thread"
    if name == "loopsafe":
        drivers = {r.case: r.drivers for r in result.rows}
        assert drivers["gather 32: hand-kept driver"] == 1
        assert drivers["gather 32 sessions, 32 per driver"] == 1, "one shared driver"
        assert drivers["gather 32 sessions, 16 per driver"] == 2
    if name == "overhead":
        networks = {r.case.split(",")[0] for r in result.rows}
        assert networks == {"local", "TLS +1 ms"}
    if name == "memory":
        assert {r.drivers for r in result.rows if "broker without drivers" in r.case} == {0}
        # Python's heap is measured exactly: a pool always costs something.
        heap = [r for r in result.rows if r.case.endswith("heap")]
        assert heap and all(r.value > 0 for r in heap)
    if name == "loops":
        by_unit = {r.case: r for r in result.rows}
        assert by_unit["loops left in the registry after gc"].value == 0
    if name == "loops":
        assert {r.case for r in result.rows if r.unit == "loops"} == {
            "loops left in the registry after gc"
        }
