"""After os.fork() the child never uses, counts, closes or collects its parent's pools."""

from __future__ import annotations

import asyncio
import os

import pytest

from broker import Broker, Neo4jConnectionConfig
from broker.testing import BoltServer
from tests.helpers import bolt_port, run_strict


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_child_starts_with_no_pools_and_no_counts(bolt_config: Neo4jConnectionConfig) -> None:
    b = Broker(bolt_config.replace(pool_min_size=0))

    async def driver_id() -> int:
        async with b.borrow() as conn:
            await conn.driver.execute_query("RETURN 1")
            return id(conn.driver)

    loop = asyncio.new_event_loop()
    parent_driver = loop.run_until_complete(driver_id())
    assert b.totals()["created"] == 1 and len(b.stats_sync()) == 1
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        code = 1
        try:
            fresh = b.stats_sync() == {} and b.totals()["created"] == 0
            child_driver = asyncio.run(driver_id())
            code = 0 if fresh and child_driver != parent_driver else 2
        finally:
            os.write(write, bytes([code]))
            os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.close(read)
    os.waitpid(pid, 0)
    assert answer == bytes([0]), f"child reported {answer!r}"
    loop.run_until_complete(b.aclose())
    loop.close()


PARENT_WITH_A_TRANSACTION_OPEN = """
    import asyncio, gc, json, os, statistics, sys, threading, time
    from concurrent.futures import ThreadPoolExecutor
    import broker
    from broker import runner
    from broker.testing.sockets import open_connections

    child_ends, loop_kind, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if loop_kind == "uvloop":
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    b = broker.Broker(broker.Neo4jConnectionConfig.from_env().replace(pool_min_size=0))
    db = os.environ.get("NEO4J_DATABASE") or None
    mark = f"fork-{os.getpid()}"
    state = {}

    async def open_transaction():
        # A task of this thread's persistent loop keeps a transaction open
        # across broker.run calls: between calls the loop holds it alone.
        state["loop"] = asyncio.get_running_loop()
        release, ready = asyncio.Event(), asyncio.get_running_loop().create_future()

        async def hold():
            async with b.borrow() as conn:
                async with conn.driver.session(database=db) as session:
                    tx = await session.begin_transaction()
                    await tx.run("CREATE (:ForkMark {id: $id})", id=mark)
                    ready.set_result(None)
                    await release.wait()
                    query = "MATCH (n:ForkMark {id: $id}) RETURN count(n) AS c"
                    result = await tx.run(query, id=mark)
                    record = await result.single()
                    await tx.rollback()
                    return record["c"] if record else -1

        state["release"], state["task"] = release, asyncio.create_task(hold())
        await ready

    async def read_back():
        state["release"].set()
        return await state["task"]

    async def serve(started):
        # Nothing but call_soon_threadsafe (and the pool's 1 s timer) wakes this loop.
        stop = state["stop"] = asyncio.get_running_loop().create_future()
        started.set()
        await stop

    def wake_up_latency(loop):
        # Median time for call_soon_threadsafe to run a callback in a running loop.
        times = []
        for _ in range(10):
            done = threading.Event()
            began = time.monotonic()
            loop.call_soon_threadsafe(done.set)
            done.wait(10)
            times.append(time.monotonic() - began)
        return statistics.median(times)

    def watches_its_wake_up_socket(loop):
        selector = getattr(loop, "_selector", None)
        if selector is None:
            return None  # not a selector loop (uvloop)
        with open(f"/proc/self/fdinfo/{selector._selector.fileno()}") as info:
            watched = {int(line.split()[1]) for line in info if line.startswith("tfd:")}
        return loop._ssock.fileno() in watched

    worker = ThreadPoolExecutor(1)
    worker.submit(runner.run, open_transaction()).result()
    loop = state["loop"]
    out = {"watched_before": watches_its_wake_up_socket(loop)}
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        # The child: drop everything the parent's code held, use a pool of its own.
        os.close(report_r)
        state.clear()
        loop = None
        inherited = open_connections(port)
        async def borrow_here():
            async with b.borrow() as conn:
                await conn.driver.execute_query("RETURN 1", database_=db)
        asyncio.run(borrow_here())
        gc.collect()
        os.write(report_w, json.dumps({"inherited_sockets": inherited}).encode())
        os.close(report_w)
        if child_ends == "collect":
            os._exit(0)
        sys.exit(0)  # a normal exit: atexit, module teardown, the last collections
    os.close(report_w)
    with os.fdopen(report_r) as report:
        out["child"] = json.loads(report.read() or "{}")
    out["child_status"] = os.waitpid(pid, 0)[1]
    out["watched_after"] = watches_its_wake_up_socket(loop)
    try:
        started = threading.Event()
        serving = worker.submit(runner.run, serve(started))
        started.wait(10)
        out["latency"] = wake_up_latency(loop)
        loop.call_soon_threadsafe(state["stop"].set_result, None)
        serving.result(10)
        out["read_back"] = worker.submit(runner.run, read_back()).result(20)
        closer = threading.Thread(target=runner.shutdown, args=(10,), daemon=True)
        closer.start()
        closer.join(30)
        out["shutdown_returned"] = not closer.is_alive()
    except Exception as exc:
        out["error"] = repr(exc)
    print(json.dumps(out), flush=True)
    os._exit(0)  # the report is out; a broken loop must not hang the exit
"""


@pytest.mark.loops
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("child_ends", ["collect", "exit"])
def test_a_child_never_touches_its_parents_loops(
    bolt_config: Neo4jConnectionConfig, bolt_server: BoltServer, child_ends: str, loop_kind: str
) -> None:
    """The parent forks with a transaction open in a persistent loop.

    The child drops every reference the parent's code held, borrows from a
    pool of its own, collects garbage, and ends (``os._exit`` after a full
    collection, or a normal interpreter exit). The parent's loop still
    watches its wake-up socket and wakes at once, its transaction still
    reads its own write, and ``broker.runner.shutdown()`` returns.
    """
    if loop_kind == "uvloop":
        pytest.importorskip("uvloop")
    port = str(bolt_port(bolt_server))
    out = run_strict(PARENT_WITH_A_TRANSACTION_OPEN, bolt_config, child_ends, loop_kind, port)
    assert "error" not in out and out["child_status"] == 0, out
    assert out["read_back"] == 1, "the parent's transaction still sees its own write"
    assert out["shutdown_returned"]
    # A broken wake-up waits for the pool's next timer (up to 1 s): a median
    # far above this bound, which a working one stays far below.
    assert out["latency"] < 0.1, out
    if loop_kind == "asyncio":
        assert out["watched_before"] and out["watched_after"]
        assert out["child"]["inherited_sockets"] == 0, "the child holds no socket of the parent"
