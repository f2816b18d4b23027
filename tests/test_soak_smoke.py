"""The soak script itself works (a short run; ``make soak`` runs it for 10 minutes)."""

from __future__ import annotations

import pytest

from tests import soak

pytestmark = pytest.mark.slow


def test_short_soak_runs_faults_and_reports() -> None:
    lines: list[str] = []
    summary = soak.run(14.0, out=lines.append)
    assert summary["faults"] >= 2, "at least resets and a blackhole were played"
    assert summary["cross_loop"] == 0
    assert summary["sockets"] == 0
    assert isinstance(summary["ok"], int) and summary["ok"] > 100
    assert summary["errors"], "the faults were felt"
    assert any("first success" in line for line in lines)
