"""Bad input: a clear error each time, nothing lost, and no Cypher injection."""

from __future__ import annotations

import asyncio
import re
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import neo4j
import pytest

import broker
from broker import Broker, BrokerClosed, BrokerError, Neo4jConnectionConfig
from broker.testing import BoltServer, EmbeddedServer, Neo4jServer
from broker.testing.faults import FaultProxy
from broker.workspace import MAX_WORKSPACE_LENGTH, database_name, quote_identifier
from tests.conftest import HOSTILE_PIECES, HOSTILE_SECRET, PLANTED_SECRETS

MakeBroker = Callable[..., Broker]
POOL_KEYS = ("available", "in_use", "creating", "checking", "total", "waiting")


async def pool_state(b: Broker) -> dict[str, int]:
    """The pool's composition, asked through the mailbox (after every pending message)."""
    stats = await b.stats()
    if not stats:
        return dict.fromkeys(POOL_KEYS, 0)
    (snapshot,) = stats.values()
    return {key: snapshot[key] for key in POOL_KEYS}


@dataclass
class Case:
    name: str
    action: Callable[[Broker, Broker], Awaitable[Any]]
    error: type[BaseException] | None
    message: str = ""
    config: dict[str, Any] | None = None


async def _config_error(b: Broker, other: Broker) -> None:
    Neo4jConnectionConfig(uri=b.config.uri, pool_min_size=3, pool_max_size=1)


async def _unknown_scheme(b: Broker, other: Broker) -> None:
    Neo4jConnectionConfig(uri="gopher://db.example:7687")


async def _delimiters_in_uri_password(b: Broker, other: Broker) -> None:
    Neo4jConnectionConfig(uri=f"bolt://neo4j:{HOSTILE_SECRET}@db.example:7687")


async def _slash_in_uri_password(b: Broker, other: Broker) -> None:
    # Parsed as is, the URI's port would be "slashA-91e".
    Neo4jConnectionConfig(uri="bolt://neo4j:slashA-91e/hashB-27c@db.example:7687")


async def _bad_port_after_uri_password(b: Broker, other: Broker) -> None:
    Neo4jConnectionConfig(uri=f"bolt://neo4j:{_encoded()}@db.example:76877")


def _encoded() -> str:
    return urllib.parse.quote(HOSTILE_SECRET, safe="")


async def _borrow(b: Broker, other: Broker) -> None:
    async with b.borrow(timeout=15):
        pass


async def _sync_with(b: Broker, other: Broker) -> None:
    with b.borrow():  # type: ignore[attr-defined]
        pass


async def _no_running_loop(b: Broker, other: Broker) -> None:
    def in_plain_thread() -> None:
        coroutine = b.borrow().__await__()
        try:
            coroutine.send(None)
        finally:
            coroutine.close()

    await asyncio.to_thread(in_plain_thread)


async def _after_close(b: Broker, other: Broker) -> None:
    await b.aclose()
    await b.borrow()


async def _release_twice(b: Broker, other: Broker) -> None:
    conn = await b.borrow()
    await conn.release()
    await conn.release()
    conn.release_sync()


async def _use_after_release(b: Broker, other: Broker) -> None:
    conn = await b.borrow()
    await conn.release()
    _ = conn.driver


async def _reuse_handle(b: Broker, other: Broker) -> None:
    conn = await b.borrow()
    await conn.release()
    await conn


async def _other_brokers_handle(b: Broker, other: Broker) -> None:
    conn = await other.borrow()
    try:
        await b.release(conn)
    finally:
        await conn.release()


async def _release_not_a_handle(b: Broker, other: Broker) -> None:
    await b.release("not a connection")  # type: ignore[arg-type]


def _prepare(workspace: Any) -> Callable[[Broker, Broker], Awaitable[str]]:
    async def action(b: Broker, other: Broker) -> str:
        async with b.borrow() as conn:
            return await conn.prepare_database(workspace)

    return action


CASES = [
    Case("invalid config values", _config_error, ValueError, "must not exceed pool_max_size"),
    Case("unknown URI scheme", _unknown_scheme, ValueError, "unknown URI scheme 'gopher'"),
    Case(
        "'/', '?', '#' in a URI's password",
        _delimiters_in_uri_password,
        ValueError,
        r"uri 'bolt://\*\*\*@db.example:7687' has an '@' outside its host part",
    ),
    Case("'/' in a URI's password", _slash_in_uri_password, ValueError, "outside its host part"),
    Case(
        "bad port after a URI's password",
        _bad_port_after_uri_password,
        ValueError,
        r"port 76877 in uri 'bolt://\*\*\*@db.example:76877' is out of range",
    ),
    Case(
        "wrong password in the URI, every delimiter encoded",
        _borrow,
        neo4j.exceptions.AuthError,
        "",
        {"uri": "hostile credentials"},
    ),
    Case(
        "wrong password",
        _borrow,
        neo4j.exceptions.AuthError,
        "",
        {"password": PLANTED_SECRETS[1]},
    ),
    Case(
        "unreachable port", _borrow, neo4j.exceptions.ServiceUnavailable, "", {"uri": "unreachable"}
    ),
    Case("sync with-statement", _sync_with, BrokerError, r"async with broker.borrow\(\)"),
    Case("no running loop", _no_running_loop, BrokerError, r"broker.run\(\.\.\.\)"),
    Case("borrow after close", _after_close, BrokerClosed, "closed"),
    Case("release twice", _release_twice, None),
    Case("use after release", _use_after_release, BrokerError, "was released; borrow again"),
    Case("await a used handle", _reuse_handle, BrokerError, "already borrowed once"),
    Case("another broker's handle", _other_brokers_handle, BrokerError, "another broker"),
    Case("not a handle", _release_not_a_handle, BrokerError, "expected a Connection"),
    Case("workspace: empty", _prepare(""), ValueError, "must not be empty"),
    Case("workspace: blank", _prepare("   "), ValueError, "must not be empty"),
    Case(
        "workspace: 1,000 characters",
        _prepare("w" * 1000),
        ValueError,
        f"1000 characters long; at most {MAX_WORKSPACE_LENGTH}",
    ),
    Case("workspace: not a string", _prepare(42), ValueError, "must be a string"),
    Case("workspace: control characters", _prepare("ws\x00drop"), ValueError, "control characters"),
    Case("workspace: backticks", _prepare("ws`) DETACH DELETE n //"), None),
    Case("workspace: quotes", _prepare('O\'Brien "quoted"'), None),
    Case("workspace: semicolons", _prepare("ws; MATCH (n) DETACH DELETE n;"), None),
    Case("workspace: Cypher keywords", _prepare("MATCH"), None),
    Case("workspace: unicode", _prepare("工作区-ünï-😀"), None),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_bad_input_gives_a_clear_error_and_loses_nothing(
    case: Case, make_broker: MakeBroker, bolt_server: BoltServer
) -> None:
    changes = dict(case.config or {})
    with FaultProxy("127.0.0.1", 9) as dead:
        dead.refuse()
        if changes.get("uri") == "unreachable":
            changes.update(uri=dead.uri, connection_timeout=2.0, connection_acquisition_timeout=3.0)
        if changes.get("uri") == "hostile credentials":
            host = bolt_server.uri.partition("://")[2]
            user = urllib.parse.quote(bolt_server.auth[0], safe="")
            changes.update(uri=f"bolt://{user}:{_encoded()}@{host}", password="")
        b = make_broker(pool_max_size=2, pool_min_size=0, **changes)
        if case.config == {"uri": "hostile credentials"}:
            assert b.config.password == HOSTILE_SECRET, "taken out of the URI"
        other = make_broker(pool_min_size=0)
        if not case.config:
            async with b.borrow():  # a warm pool: one idle driver
                pass
        before = await pool_state(b)
        if case.error is None:
            await case.action(b, other)
        else:
            with pytest.raises(case.error) as caught:
                await case.action(b, other)
            text = str(caught.value)
            assert re.search(case.message, text), text
            for secret in (*PLANTED_SECRETS, HOSTILE_SECRET, *HOSTILE_PIECES):
                assert secret not in text
        after = await pool_state(b)
        if case.name != "borrow after close":
            assert after == before, f"pool changed: {before} -> {after}"


DROPPER = "Canary) DETACH DELETE n //"


async def test_hostile_workspace_cannot_inject_cypher(
    make_broker: MakeBroker, bolt_server: BoltServer
) -> None:
    """A name that drops data when spliced raw is harmless through the broker."""
    b = make_broker(pool_min_size=0)
    victim = bolt_server.create_database()
    async with b.borrow() as conn:
        driver = conn.driver

        async def canaries(database: str) -> int:
            records, _, _ = await driver.execute_query(
                "MATCH (n:Canary) RETURN count(n) AS c", database_=database
            )
            return int(records[0]["c"])

        await driver.execute_query("UNWIND range(1, 3) AS i CREATE (:Canary)", database_=victim)
        # The proof that DROPPER is a real injection: spliced raw, it deletes.
        raw = f"MATCH (n:{DROPPER}) RETURN n"
        await driver.execute_query(raw, database_=victim)  # type: ignore[arg-type]
        assert await canaries(victim) == 0, "the raw splice must drop the canaries"

        await driver.execute_query("UNWIND range(1, 3) AS i CREATE (:Canary)", database_=victim)
        quoted = f"MATCH (n:{quote_identifier(DROPPER)}) RETURN n"
        await driver.execute_query(quoted, database_=victim)  # type: ignore[arg-type]
        assert await canaries(victim) == 3

    b2 = make_broker(pool_min_size=0, database=victim, indexes=((None, "entity_id"),))
    async with b2.borrow() as conn:
        database = await conn.prepare_database(DROPPER)
        assert database == victim, "no CREATE DATABASE here: the configured database"
        assert await canaries(victim) == 3, "preparing the hostile workspace dropped nothing"
        records, _, _ = await conn.driver.execute_query(
            "SHOW INDEXES YIELD labelsOrTypes", database_=victim
        )
        assert [DROPPER] in [r["labelsOrTypes"] for r in records], "indexed under its literal name"


def test_database_names_are_the_seeds_where_valid_else_distinct() -> None:
    seed_valid = {"ws-1": "ws-1", "WS-1": "ws-1", "ws 1": "ws-1", "ws_1": "ws-1", "Ws.x": "ws-x"}
    for workspace, name in seed_valid.items():
        assert database_name(workspace) == name, "named as the seed named it"
    names = {
        ws: database_name(ws)
        for ws in ["工作区", "1abc", "a", "x" * 200, "system", "System-1", "_x", DROPPER]
    }
    for workspace, name in names.items():
        assert re.fullmatch(r"[a-z][a-z0-9-]{2,62}", name), (workspace, name)
        assert not name.startswith("system"), "reserved by Neo4j"
    assert len(set(names.values())) == len(names), "distinct workspaces, distinct databases"
    assert set(names.values()).isdisjoint(seed_valid.values())


async def test_custom_preparer_is_used(make_broker: MakeBroker, bolt_server: BoltServer) -> None:
    seen: list[str] = []

    async def preparer(driver: neo4j.AsyncDriver, workspace: str) -> str:
        seen.append(workspace)
        await driver.verify_connectivity()
        return bolt_server.default_database

    b = make_broker(pool_min_size=0, database_preparer=preparer)
    async with b.borrow() as conn:
        assert await conn.prepare_database("any") == bolt_server.default_database
        assert await conn.prepare_database("any") == bolt_server.default_database
    assert seen == ["any"]


async def test_default_preparation_falls_back_to_the_servers_default(
    make_broker: MakeBroker, bolt_server: BoltServer
) -> None:
    b = make_broker(pool_min_size=0, database=None)
    async with b.borrow() as conn:
        database = await conn.prepare_database("fallback-ws")
    if isinstance(bolt_server, EmbeddedServer):
        # ArcadeDB refuses CREATE DATABASE in Cypher, like Neo4j Community.
        assert database == bolt_server.default_database != "neo4j"
    elif isinstance(bolt_server, Neo4jServer):  # Community: its one database
        assert database == "neo4j"
    else:  # a real Neo4j: its own database (Enterprise) or its default (Community)
        assert database in {database_name("fallback-ws"), bolt_server.default_database}


def test_module_level_close_then_configure(bolt_config: Neo4jConnectionConfig) -> None:
    broker.configure(bolt_config)

    async def query() -> int:
        async with broker.borrow() as conn:
            records, _, _ = await conn.driver.execute_query("RETURN 5 AS v")
            return int(records[0]["v"])

    assert asyncio.run(query()) == 5
    broker.close()
    with pytest.raises(BrokerClosed, match=r"broker\.configure\(\.\.\.\) makes a new default"):
        asyncio.run(query())
    broker.configure(bolt_config)
    assert asyncio.run(query()) == 5


def test_closed_brokers_say_what_to_do(bolt_config: Neo4jConnectionConfig) -> None:
    async def borrow_from(b: Broker) -> None:
        async with b.borrow():
            pass

    own = Broker(bolt_config)
    own.close()
    with pytest.raises(BrokerClosed, match=r"make a new Broker\(config\)") as caught:
        asyncio.run(borrow_from(own))
    assert "configure" not in str(caught.value), "configure() does not reopen this one"

    replaced = broker.configure(bolt_config)
    broker.configure(bolt_config)
    with pytest.raises(BrokerClosed, match=r"replaced by broker\.configure\(\)"):
        asyncio.run(borrow_from(replaced))
    asyncio.run(borrow_from(broker.get_broker()))
