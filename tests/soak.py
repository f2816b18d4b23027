"""A long run of mixed load and faults: ``make soak`` (10 minutes by default).

Load from several threads x short-lived loops goes through a fault proxy to
an embedded server. Every cycle plays the faults in turn: connection resets,
a blackhole, slow handshakes, and the server killed with SIGKILL and
restarted. At the end it prints borrows, errors by type, the recovery time
after each fault, and checks that nothing was left open.

``SOAK_SECONDS`` sets the length (``python -m tests.soak``).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from broker import Broker, Neo4jConnectionConfig
from broker.testing import EmbeddedServer
from broker.testing.faults import FaultProxy
from broker.testing.sockets import open_connections
from tests.load import Load, Outcome, cross_loop_errors, errors_by_type, recovery_seconds


@dataclass
class Fault:
    name: str
    start: Callable[[], None]
    end: Callable[[], None]
    seconds: float
    began: float = 0.0
    ended: float = 0.0


def run(seconds: float, out: Callable[[str], None] = print) -> dict[str, object]:
    with EmbeddedServer() as server:
        proxy = FaultProxy("127.0.0.1", server.bolt_port).start()
        try:
            return _soak(server, proxy, seconds, out)
        finally:
            proxy.stop()


def _soak(
    server: EmbeddedServer, proxy: FaultProxy, seconds: float, out: Callable[[str], None]
) -> dict[str, object]:
    config = Neo4jConnectionConfig(
        uri=proxy.uri,
        username=server.auth[0],
        password=server.auth[1],
        pool_max_size=3,
        pool_min_size=1,
        borrow_timeout=2.0,
        connection_timeout=1.0,
        connection_acquisition_timeout=2.0,
        max_transaction_retry_time=1.0,
        health_check_interval=0.5,
        health_check_timeout=1.0,
    )
    b = Broker(config)
    load = Load(b, threads=4, concurrency=4, loop_seconds=2.0, query_timeout=2.0).start()

    def kill() -> None:
        server.kill()

    def restart() -> None:
        server.restart()

    def unblock() -> None:
        proxy.pass_through()
        proxy.reset_all()

    def no_delay() -> None:
        proxy.delay_handshake(0.0)

    def cycle() -> list[Fault]:
        return [
            Fault("resets", lambda: proxy.reset_all() and None, lambda: None, 0.1),
            Fault("blackhole", proxy.blackhole, unblock, 3.0),
            Fault("slow handshakes", lambda: proxy.delay_handshake(1.5), no_delay, 4.0),
            Fault("kill -9 and restart", kill, restart, 2.0),
        ]

    started = time.monotonic()
    done: list[Fault] = []
    calm = 5.0
    while time.monotonic() - started < seconds:
        for fault in cycle():
            if time.monotonic() - started >= seconds:
                break
            time.sleep(calm)
            fault.began = time.monotonic()
            fault.start()
            time.sleep(fault.seconds)
            fault.end()
            fault.ended = time.monotonic()
            done.append(fault)
            out(f"  {fault.ended - started:6.1f} s  {fault.name}")
    time.sleep(calm)
    outcomes = load.stop()
    b.close(timeout=5)
    return _report(b, outcomes, done, started, proxy, out)


def _report(
    b: Broker,
    outcomes: list[Outcome],
    faults: list[Fault],
    started: float,
    proxy: FaultProxy,
    out: Callable[[str], None],
) -> dict[str, object]:
    ok = sum(1 for o in outcomes if o.error is None)
    errors = errors_by_type(outcomes)
    longest = max((o.seconds for o in outcomes), default=0.0)
    out(f"\nSoak: {time.monotonic() - started:.0f} s, {b.totals()['borrows']} borrows")
    out(f"  attempts {len(outcomes)}, succeeded {ok}, failed {sum(errors.values())}")
    for name, count in errors.most_common():
        out(f"    {name:<22} {count}")
    out(f"  longest attempt {longest:.2f} s; cross-loop errors {len(cross_loop_errors(outcomes))}")
    recoveries: dict[str, list[float]] = {}
    first_ok: dict[str, list[float]] = {}
    failed_during: dict[str, int] = {}
    for fault, following in zip(faults, [*faults[1:], None], strict=True):
        until = following.began if following is not None else float("inf")
        recovered = recovery_seconds(outcomes, fault.ended, until)
        if recovered is not None:
            recoveries.setdefault(fault.name, []).append(recovered)
        successes = [o.ended for o in outcomes if o.started >= fault.ended and o.error is None]
        if successes:
            first_ok.setdefault(fault.name, []).append(min(successes) - fault.ended)
        failed_during[fault.name] = failed_during.get(fault.name, 0) + sum(
            1 for o in outcomes if o.error is not None and fault.began <= o.ended < until
        )
    out("  after each fault ends (worst of its runs): first success, last failure")
    for name, values in recoveries.items():
        first = max(first_ok.get(name, [float("nan")]))
        out(
            f"    {name:<22} {first:5.2f} s, {max(values):5.2f} s  "
            f"({len(values)} runs, {failed_during[name]} failed attempts)"
        )
    totals = b.totals()
    out(
        f"  drivers: created {totals['created']}, closed {totals['closed']}, "
        f"discarded {totals['discarded']}, borrow timeouts {totals['timeouts']}"
    )
    # The broker's drivers connect to the proxy; the proxy's own upstream links
    # (in this process too) close on their own schedule and are not counted.
    sockets = open_connections(proxy.port)
    out(f"  Bolt sockets still open: {sockets}")
    return {
        "outcomes": len(outcomes),
        "ok": ok,
        "errors": dict(errors),
        "longest": longest,
        "cross_loop": len(cross_loop_errors(outcomes)),
        "recoveries": {k: max(v) for k, v in recoveries.items()},
        "faults": len(faults),
        "totals": totals,
        "sockets": sockets,
    }


def main() -> None:
    # Faults make the broker and the driver log warnings by the thousand: keep
    # them off the terminal, the summary says what happened.
    logging.getLogger("broker").setLevel(logging.CRITICAL)
    logging.getLogger("neo4j").setLevel(logging.CRITICAL)
    seconds = float(os.environ.get("SOAK_SECONDS", "600"))
    print(f"Soak for {seconds:.0f} s: load from 4 threads x short-lived loops, faults in turn")
    summary = run(seconds)
    bad = summary["cross_loop"] or summary["sockets"] or not summary["ok"]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
