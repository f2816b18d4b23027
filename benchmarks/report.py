"""Markdown tables of the last ``make bench`` run, to paste into docs/performance.md.

Usage: ``python -m benchmarks.report [results.json] [--only overhead,celery-shaped,...]``.
Reads ``benchmarks/results/latest.json`` unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

LATEST = Path(__file__).parent / "results" / "latest.json"


def _number(value: float, unit: str) -> str:
    if unit in {"fds", "loops"}:
        return f"{value:.0f}"
    return f"{value:,.1f}" if abs(value) < 100 else f"{value:,.0f}"


def tables(data: dict[str, Any], only: set[str] | None = None) -> str:
    meta = data["meta"]
    lines = [
        f"Run: {meta.get('seconds')} s, Python {meta.get('python')}, {meta.get('cpus')} CPUs, "
        f"neo4j driver {meta.get('neo4j driver')}, {meta.get('server')}"
        + (f", load average {meta['load average']}" if meta.get("load average") else ""),
        "",
    ]
    scenarios: dict[str, list[dict[str, Any]]] = {}
    for row in data["rows"]:
        scenarios.setdefault(row["scenario"], []).append(row)
    for name, rows in scenarios.items():
        if only and name not in only:
            continue
        lines += [
            f"**{name}**",
            "",
            "| case | value | unit | work | drivers |",
            "| --- | ---: | --- | ---: | ---: |",
        ]
        for r in rows:
            drivers = "" if r["drivers"] is None else str(r["drivers"])
            value = _number(r["value"], r["unit"])
            lines.append(f"| {r['case']} | {value} | {r['unit']} | {r['work']} | {drivers} |")
        lines.append("")
    lines += ["**checks**", "", "| check | ratio | target | |", "| --- | ---: | --- | --- |"]
    for c in data["checks"]:
        verdict = "met" if c["ok"] else "**missed**"
        if c["target"] == "(reported)":
            verdict = ""
        lines.append(f"| {c['name']} | {c['ratio']:.3f} | {c['target']} | {verdict} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", nargs="?", default=str(LATEST))
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    args = parser.parse_args()
    only = {name.strip() for name in args.only.split(",") if name.strip()} or None
    print(tables(json.loads(Path(args.results).read_text()), only))


if __name__ == "__main__":
    main()
