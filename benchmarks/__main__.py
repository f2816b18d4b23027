"""``make bench``: every scenario side by side on one server, one table of ratios.

Usage: ``python -m benchmarks [--quick] [--only overhead,celery,...,rival]``.
Writes ``benchmarks/results/latest.json`` and ``latest.csv`` too
(``latest-neo4j.*`` when run on Neo4j: ``BROKER_TEST_SERVER=neo4j``, or
``make bench SERVER=neo4j``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import janus
import neo4j

from benchmarks.scenarios import SCENARIOS, Result
from broker.testing import Neo4jServer, server_from_env
from broker.testing.selection import bench_server

RESULTS = Path(__file__).parent / "results"


def print_table(result: Result, seconds: float) -> None:
    width = max(len(r.case) for r in result.rows) + 2
    print(
        f"\n{'scenario':<16}{'case':<{width}}{'value':>12}  {'unit':<10}{'work':>8}{'drivers':>9}"
    )
    print("-" * (16 + width + 41))
    for r in result.rows:
        drivers = "" if r.drivers is None else str(r.drivers)
        value = f"{r.value:>12.1f}"
        print(f"{r.scenario:<16}{r.case:<{width}}{value}  {r.unit:<10}{r.work:>8}{drivers:>9}")
    print(f"\n{'check':<{width + 16}}{'ratio':>10}  target")
    print("-" * (width + 16 + 22))
    for c in result.checks:
        verdict = "ok" if c.ok else "MISSED"
        print(f"{c.name:<{width + 16}}{c.ratio:>10.3f}  {c.target:<9}{verdict}")
    print(f"\n{len(result.rows)} rows in {seconds:.0f} s")


def write(result: Result, meta: dict[str, object], stem: str = "latest") -> None:
    RESULTS.mkdir(exist_ok=True)
    data = {
        "meta": meta,
        "rows": [dataclasses.asdict(r) for r in result.rows],
        "checks": [dataclasses.asdict(c) for c in result.checks],
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    with (RESULTS / f"{stem}.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["scenario", "case", "value", "unit", "work", "drivers"])
        for r in result.rows:
            writer.writerow([r.scenario, r.case, f"{r.value:.3f}", r.unit, r.work, r.drivers or ""])


def describe(server: object) -> str:
    if isinstance(server, Neo4jServer):
        return f"Neo4j {server.version} Community"
    return "embedded ArcadeDB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    args = parser.parse_args()
    logging.getLogger("neo4j").setLevel(logging.ERROR)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in SCENARIOS]
    if unknown:
        sys.exit(f"unknown scenario(s): {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")

    load_before = os.getloadavg()[0]
    external = server_from_env()
    server = external or bench_server().start()
    name = "external" if external else describe(server)
    stem = "latest-neo4j" if isinstance(server, Neo4jServer) else "latest"
    print(f"server: {name}", flush=True)
    started = time.monotonic()
    total = Result()
    try:
        for scenario in chosen:
            print(f"running {scenario} ...", end=" ", flush=True)
            began = time.monotonic()
            part = SCENARIOS[scenario](server, args.quick)
            print(f"{time.monotonic() - began:.0f} s", flush=True)
            total.rows += part.rows
            total.checks += part.checks
    finally:
        if external is None:
            server.stop()
    seconds = time.monotonic() - started
    print_table(total, seconds)
    if not args.quick:
        write(
            total,
            {
                "python": platform.python_version(),
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "neo4j driver": neo4j.__version__,
                "janus": janus.__version__,
                "server": name,
                "seconds": round(seconds),
                # Other work on the machine: 1-minute load average at start and end.
                "load average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                "scenarios": chosen,
            },
            stem,
        )
        print(f"results written to {RESULTS}/{stem}.json and {stem}.csv")


if __name__ == "__main__":
    main()
