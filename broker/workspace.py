"""Workspace databases: which database a workspace uses, and the indexes it needs.

The default preparation, for the schema the seed design served:

1. A configured ``database`` (``NEO4J_DATABASE``) is every workspace's
   database, as in the seed; it is created (Neo4j Enterprise) if missing.
2. Otherwise the workspace gets the database name the seed gave it when that
   name is valid (so databases made by the seed's code are found again), or
   a derived valid one. ``SHOW DATABASES`` on ``system`` says whether it
   exists and which database is the server's default (probing with a query
   would cost more, and on some servers leaves the connection bound to the
   missing name). If it does not exist, ``CREATE DATABASE ... IF NOT
   EXISTS`` (Neo4j Enterprise); a server that refuses (Community, ArcadeDB)
   gets its own default database.
3. ``CREATE INDEX IF NOT EXISTS`` for each configured index, by default the
   seed's ``:base(entity_id)``, in that database.

Names are never spliced into Cypher unquoted: database names travel as
parameters, labels and properties are quoted identifiers.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
import unicodedata
import weakref
from collections.abc import Iterable

import neo4j
import neo4j.exceptions

from broker import log
from broker.config import SEED_INDEXES, DatabasePreparer, IndexSpec

__all__ = [
    "MAX_WORKSPACE_LENGTH",
    "Preparations",
    "check_workspace",
    "database_name",
    "prepare_workspace",
    "quote_identifier",
    "seed_database_name",
]

#: Longest workspace accepted (label names much longer than this fail on some servers).
MAX_WORKSPACE_LENGTH = 200

_NOT_NAME = re.compile(r"[^a-z0-9]+")
# What the seed replaced with a dash in a workspace to name its database.
_NOT_SEED_NAME = re.compile(r"[^a-zA-Z0-9-]")
# Neo4j's rules: 3 to 63 characters, an ASCII letter first; ``system`` and
# names starting with it are reserved.
_VALID_NAME = re.compile(r"[a-z][a-z0-9.-]{2,62}")
_NOT_FOUND = "Neo.ClientError.Database.DatabaseNotFound"


def check_workspace(workspace: object) -> str:
    """The workspace unchanged, or :class:`ValueError` saying what is wrong with it."""
    if not isinstance(workspace, str):
        raise ValueError(f"workspace must be a string, got {type(workspace).__name__}")
    if not workspace.strip():
        raise ValueError("workspace must not be empty or blank")
    if len(workspace) > MAX_WORKSPACE_LENGTH:
        raise ValueError(
            f"workspace is {len(workspace)} characters long; "
            f"at most {MAX_WORKSPACE_LENGTH} are allowed"
        )
    if any(unicodedata.category(ch) in {"Cc", "Cs"} for ch in workspace):
        raise ValueError("workspace must not contain control characters")
    return workspace


def quote_identifier(name: str) -> str:
    """``name`` as a Cypher identifier (label, type, property), safe to splice."""
    return "`" + name.replace("`", "``") + "`"


def seed_database_name(workspace: str) -> str:
    """The database name the seed design gave ``workspace`` (as the server stores it).

    The seed replaced every character other than ASCII letters, digits and
    dashes with a dash; Neo4j folds database names to lower case.
    """
    return _NOT_SEED_NAME.sub("-", check_workspace(workspace)).lower()


def _is_valid_name(name: str) -> bool:
    return _VALID_NAME.fullmatch(name) is not None and not name.startswith("system")


def database_name(workspace: str) -> str:
    """A valid database name for ``workspace``: the seed's wherever it is valid.

    Lowercase ASCII letters, digits and dashes, starting with a letter, 3 to
    63 characters. Where the seed's name is valid it is used, so a database
    the seed made is found again; as in the seed, workspaces that differ only
    in case or in the characters it replaced share that name. A workspace the
    seed named invalidly gets a derived name with a short hash of itself
    appended, distinct for distinct workspaces.
    """
    seed = seed_database_name(workspace)
    if _is_valid_name(seed):
        return seed
    base = _NOT_NAME.sub("-", workspace.lower()).strip("-")
    if not base or not base[0].isalpha() or base.startswith("system"):
        base = ("ws-" + base).rstrip("-")
    digest = hashlib.sha256(workspace.encode()).hexdigest()[:10]
    return f"{base[:50].rstrip('-')}-{digest}"


async def prepare_workspace(
    driver: neo4j.AsyncDriver,
    workspace: str,
    *,
    database: str | None = None,
    indexes: Iterable[IndexSpec] = SEED_INDEXES,
) -> str:
    """Prepare ``workspace``'s database and indexes; return the database to use.

    ``database`` is used for every workspace when given (the configured
    one); ``indexes`` are ``(label, property)`` pairs, a label of None
    standing for the workspace's own name.
    """
    check_workspace(workspace)
    statements = [_index_statement(workspace, label, prop) for label, prop in indexes]
    if database is None:
        database = await _workspace_database(driver, workspace)
    try:
        await _ensure(driver, database, statements)
    except neo4j.exceptions.ClientError as exc:
        # A configured database that does not exist yet: the seed created it.
        if exc.code != _NOT_FOUND or await _create_database(driver, database) is not None:
            raise
        await _ensure(driver, database, statements)
    return database


async def _workspace_database(driver: neo4j.AsyncDriver, workspace: str) -> str:
    wanted = database_name(workspace)
    records, _, _ = await driver.execute_query(
        "SHOW DATABASES YIELD name, default", database_="system", routing_=neo4j.RoutingControl.READ
    )
    if wanted in {str(r["name"]).lower() for r in records}:
        return wanted
    refused = await _create_database(driver, wanted)
    if refused is None:
        return wanted
    # Community editions and other servers cannot create databases.
    default = next((str(r["name"]) for r in records if r["default"]), None)
    if default is None:
        raise refused
    return default


async def _create_database(
    driver: neo4j.AsyncDriver, name: str
) -> neo4j.exceptions.ClientError | None:
    """``CREATE DATABASE``; the server's refusal if it cannot (not Enterprise)."""
    try:
        async with driver.session(database="system") as session:
            result = await session.run("CREATE DATABASE $name IF NOT EXISTS WAIT", {"name": name})
            await result.consume()
    except neo4j.exceptions.ClientError as exc:
        return exc
    return None


def _index_statement(workspace: str, label: str | None, prop: str) -> str:
    target = quote_identifier(workspace if label is None else label)
    return f"CREATE INDEX IF NOT EXISTS FOR (n:{target}) ON (n.{quote_identifier(prop)})"


async def _ensure(driver: neo4j.AsyncDriver, database: str, statements: list[str]) -> None:
    """Run each index statement. An index the server refuses (no schema rights,
    a label it rejects) is logged and skipped, as the seed did: a preparation
    that worked there must not fail here. Connection errors still raise."""
    for statement in statements:
        try:
            await driver.execute_query(statement, database_=database)
        except (neo4j.exceptions.ClientError, neo4j.exceptions.DatabaseError) as exc:
            if exc.code == _NOT_FOUND:
                raise
            log.emit(
                log.WARNING,
                "workspace.index_failed",
                database=database,
                statement=statement,
                error=f"{type(exc).__name__}: {exc.code}",
            )


class Preparations:
    """Each workspace's database, prepared once per broker and cached across loops.

    Concurrent preparations of one workspace in one loop share one run; a
    caller cancelled while it prepared leaves the others to try themselves.
    Failures are not cached. ``preparer`` may be replaced (tests count calls).
    """

    def __init__(self, preparer: DatabasePreparer) -> None:
        self.preparer = preparer
        self._done: dict[str, str] = {}
        self._lock = threading.Lock()  # guards _running's entries; never held across an await
        self._running: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[str, asyncio.Future[str]]
        ] = weakref.WeakKeyDictionary()

    async def prepare(self, driver: neo4j.AsyncDriver, workspace: str) -> str:
        """The database of ``workspace``, prepared with ``driver`` unless it was already."""
        check_workspace(workspace)
        loop = asyncio.get_running_loop()
        with self._lock:
            running = self._running.setdefault(loop, {})
        while True:
            cached = self._done.get(workspace)
            if cached is not None:
                return cached
            shared = running.get(workspace)
            if shared is None:
                break
            try:
                return await asyncio.shield(shared)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not shared.cancelled() or (task is not None and task.cancelling()):
                    raise
                # The caller that was preparing it was cancelled: try ourselves.
        return await self._run(running, loop, driver, workspace)

    async def _run(
        self,
        running: dict[str, asyncio.Future[str]],
        loop: asyncio.AbstractEventLoop,
        driver: neo4j.AsyncDriver,
        workspace: str,
    ) -> str:
        shared: asyncio.Future[str] = loop.create_future()
        running[workspace] = shared
        try:
            name = await self.preparer(driver, workspace)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                shared.cancel()
            else:
                shared.set_exception(exc)
                shared.exception()  # retrieved here; followers re-raise it
            raise
        finally:
            running.pop(workspace, None)
        self._done[workspace] = name
        shared.set_result(name)
        return name
