"""When a loop ends, its drivers have been closed in that loop, whenever its pool was born.

Some of these run a script in a child interpreter with asyncio's debug mode
and ``-W error::ResourceWarning``, so that a task left pending or a socket
left open shows up on its stderr instead of somewhere in a later test.
"""

from __future__ import annotations

import asyncio

import pytest

from broker import Broker, Neo4jConnectionConfig
from broker.testing import BoltServer
from broker.testing.faults import FaultProxy
from tests.helpers import bolt_port, eventually, run_strict
from tests.test_logging import capture_structlog

BORN_DURING_TEARDOWN = """
    import asyncio, gc, json, sys
    import broker
    from broker.testing.sockets import open_connections

    where, ending, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    b = broker.Broker(broker.Neo4jConnectionConfig.from_env().replace(pool_min_size=0))
    out = {}

    async def last_checkpoint():
        try:
            async with b.borrow() as conn:
                await conn.driver.execute_query("RETURN 1")
            out["checkpoint"] = "written"
        except broker.BrokerClosed as exc:
            out["checkpoint"] = f"refused: {exc}"

    async def background():
        try:
            await asyncio.sleep(3600)
        finally:
            await last_checkpoint()

    async def generator():
        try:
            yield
        finally:
            await last_checkpoint()

    started = []

    async def main():
        # The loop's first borrow happens while asyncio.run tears the loop down.
        if where == "task":
            started.append(asyncio.create_task(background()))
            await asyncio.sleep(0)
        else:
            started.append(generator())
            await started[-1].__anext__()

    if ending == "run":
        asyncio.run(main())
    else:
        with asyncio.Runner() as runner:
            runner.run(main())
    out["sockets"] = open_connections(port)
    out["totals"] = b.totals()
    out["loops"] = len(b.stats_sync())
    started.clear()
    gc.collect()
    print(json.dumps(out))
"""


@pytest.mark.loops
@pytest.mark.parametrize(
    ("where", "ending"),
    [("task", "run"), ("task", "runner"), ("generator", "run")],
    ids=["cancelled-task/asyncio.run", "cancelled-task/Runner", "async-generator/asyncio.run"],
)
def test_first_borrow_during_loop_teardown(
    bolt_config: Neo4jConnectionConfig, bolt_server: BoltServer, where: str, ending: str
) -> None:
    """A task's ``finally`` borrows after ``asyncio.run`` listed the tasks to cancel.

    Its pool must still be closed, in that loop, before ``asyncio.run``
    returns. A borrow that comes even later (an async generator's
    ``finally``, run by ``shutdown_asyncgens``) is refused with BrokerClosed.
    """
    out = run_strict(BORN_DURING_TEARDOWN, bolt_config, where, ending, str(bolt_port(bolt_server)))
    if where == "task":
        assert out["checkpoint"] == "written"
    else:
        assert out["checkpoint"].startswith("refused: ") and "shutting down" in out["checkpoint"]
    assert out["sockets"] == 0, "every Bolt socket was closed before asyncio.run returned"
    assert out["totals"]["created"] == out["totals"]["closed"]
    assert out["loops"] == 0


@pytest.mark.parametrize("job", ["check", "create"])
def test_a_job_cut_short_by_the_loop_end_is_not_a_failure(
    bolt_config: Neo4jConnectionConfig, bolt_server: BoltServer, job: str
) -> None:
    """A health check or a creation cancelled because its loop ends logs no warning."""
    events = capture_structlog()
    with FaultProxy("127.0.0.1", bolt_port(bolt_server)) as proxy:
        b = Broker(
            bolt_config.replace(
                uri=proxy.uri,
                pool_min_size=0,
                health_check_interval=0,  # every idle driver is checked before reuse
                close_timeout=2,
            )
        )

        async def main() -> None:
            if job == "check":
                async with b.borrow() as conn:
                    await conn.driver.execute_query("RETURN 1")
                proxy.blackhole()  # the check hangs
            else:
                proxy.delay_handshake(60)  # the creation hangs
            waiting = asyncio.create_task(b.borrow().__aenter__())
            await eventually(lambda: len(b.actors()) == 1, what="the pool started")
            (actor,) = b.actors()
            busy = "checking" if job == "check" else "creating"
            await eventually(lambda: actor.snapshot()[busy] == 1, what=f"{busy} a driver")
            assert not waiting.done()
            # main returns: asyncio.run cancels the borrower, the job and the actor.

        asyncio.run(main())
    troubles = [e for e in events if e.get("level") in ("warning", "error")]
    assert troubles == [], troubles
    totals = b.totals()
    assert totals["errors"] == 0 and totals["discarded"] == 0
    assert totals["created"] == totals["closed"]
    b.close()
