"""The benchmark cannot silently measure nothing: each scenario ran its work."""

from __future__ import annotations

import pytest

from benchmarks.scenarios import SCENARIOS
from broker.testing import BoltServer

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_runs_its_work(name: str, bolt_server: BoltServer) -> None:
    result = SCENARIOS[name](bolt_server, True)
    assert result.rows and result.checks
    for row in result.rows:
        assert row.work > 0, row
        assert row.value == row.value and row.value >= 0, row  # not NaN
    timed = [r for r in result.rows if r.unit.endswith("/s") or r.unit.startswith("µs")]
    assert timed and all(r.value > 0 for r in timed)
    if name == "celery":
        drivers = {r.case[:3]: r.drivers for r in result.rows}
        assert drivers["(a)"] == 40, "a new driver for each of the 40 tasks"
        assert drivers["(c)"] is not None and drivers["(c)"] <= 4 * 4, "reused per thread"
    if name == "loops":
        by_unit = {r.case: r for r in result.rows}
        assert by_unit["loops left in the registry after gc"].value == 0
    if name == "loops":
        assert {r.case for r in result.rows if r.unit == "loops"} == {
            "loops left in the registry after gc"
        }
