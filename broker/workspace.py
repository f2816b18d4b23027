"""Workspace databases: one database (or the default one) and an index per workspace.

The default preparation, for the schema the seed design served:

1. Derive a database name from the workspace (Neo4j's naming rules).
2. ``SHOW DATABASES`` on ``system`` says whether it exists and which database
   is the server's default (probing with a query would cost more, and on some
   servers leaves the connection bound to the missing name).
3. If it does not exist, ``CREATE DATABASE ... IF NOT EXISTS`` (Neo4j
   Enterprise). A server that refuses (Community, ArcadeDB) gets the
   configured ``database``, else its own default.
4. ``CREATE INDEX IF NOT EXISTS`` on ``entity_id`` for the workspace's label.

Names are never spliced into Cypher unquoted: the database name travels as a
parameter and the label is a quoted identifier.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import neo4j
import neo4j.exceptions

__all__ = [
    "MAX_WORKSPACE_LENGTH",
    "check_workspace",
    "database_name",
    "prepare_workspace",
    "quote_identifier",
]

#: Longest workspace accepted (label names much longer than this fail on some servers).
MAX_WORKSPACE_LENGTH = 200

_NOT_NAME = re.compile(r"[^a-z0-9]+")


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


def database_name(workspace: str) -> str:
    """A valid database name for ``workspace``, distinct for distinct workspaces.

    Lowercase ASCII letters, digits and dashes, starting with a letter, 3 to
    63 characters. A workspace that is not already such a name gets a short
    hash of itself appended, so ``"Ws 1"`` and ``"ws-1"`` never share one.
    """
    check_workspace(workspace)
    base = _NOT_NAME.sub("-", workspace.lower()).strip("-")
    if not base or not base[0].isalpha():
        base = ("ws-" + base).rstrip("-")
    if base == workspace and 3 <= len(base) <= 63:
        return base
    digest = hashlib.sha256(workspace.encode()).hexdigest()[:10]
    return f"{base[:50].rstrip('-')}-{digest}"


async def prepare_workspace(
    driver: neo4j.AsyncDriver, workspace: str, *, fallback_database: str | None = None
) -> str:
    """Prepare ``workspace``'s database and index; return the database to use."""
    label = check_workspace(workspace)
    wanted = database_name(workspace)
    records, _, _ = await driver.execute_query(
        "SHOW DATABASES YIELD name, default", database_="system", routing_=neo4j.RoutingControl.READ
    )
    names = {str(r["name"]) for r in records}
    default = next((str(r["name"]) for r in records if r["default"]), None)
    if wanted in names:
        database = wanted
    else:
        try:
            async with driver.session(database="system") as session:
                result = await session.run(
                    "CREATE DATABASE $name IF NOT EXISTS WAIT", {"name": wanted}
                )
                await result.consume()
            database = wanted
        except neo4j.exceptions.ClientError:
            # Community editions and other servers cannot create databases.
            fallback = fallback_database or default
            if fallback is None:
                raise
            database = fallback
    statement = f"CREATE INDEX IF NOT EXISTS FOR (n:{quote_identifier(label)}) ON (n.entity_id)"
    await driver.execute_query(statement, database_=database)
    return database
