"""Neo4jConnectionConfig: seed defaults, validation, the environment, secrets."""

from __future__ import annotations

import os
import urllib.parse
from typing import Any

import pytest

from broker import Neo4jConnectionConfig
from broker.config import redact_uri
from tests.conftest import HOSTILE_SECRET, PLANTED_SECRETS, SecretWatch

SECRET = PLANTED_SECRETS[1]
URI_SECRET = PLANTED_SECRETS[0]
#: HOSTILE_SECRET as a URI must carry it: every delimiter percent-encoded.
ENCODED = urllib.parse.quote(HOSTILE_SECRET, safe="")
#: Its pieces with '@', ':' and '%', which may stay as they are in a URI's user part.
AT_COLON_PERCENT = HOSTILE_SECRET.partition("?")[2]


def leaked(text: str) -> list[str]:
    """The secrets in play (and pieces of the hostile one) that ``text`` shows."""
    return sorted(secret for secret in SecretWatch.secrets() if secret in text)


@pytest.fixture
def no_neo4j_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """An environment without any NEO4J_* variable (the suite may run with them set)."""
    for name in list(os.environ):
        if name.startswith("NEO4J_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_seed_fields_and_defaults(no_neo4j_env: pytest.MonkeyPatch) -> None:
    config = Neo4jConnectionConfig()
    assert config.uri == "neo4j://localhost:7687"
    assert config.username == "neo4j"
    assert config.max_connection_pool_size == 50
    assert config.connection_timeout == 30.0
    assert config.connection_acquisition_timeout == 30.0
    assert config.max_transaction_retry_time == 30.0
    assert config.pool_max_size == 10
    assert config.pool_min_size == 2
    assert config.password == ""
    assert config.database is None
    assert config.indexes == (("base", "entity_id"),)


def test_no_arguments_read_the_environment(no_neo4j_env: pytest.MonkeyPatch) -> None:
    """As in the seed: Neo4jConnectionConfig() takes NEO4J_URI and the rest."""
    no_neo4j_env.setenv("NEO4J_URI", "bolt://env-host:7688")
    no_neo4j_env.setenv("NEO4J_USERNAME", "env-user")
    no_neo4j_env.setenv("NEO4J_PASSWORD", SECRET)
    no_neo4j_env.setenv("NEO4J_DATABASE", "env-db")
    no_neo4j_env.setenv("NEO4J_POOL_MAX_SIZE", "4")
    config = Neo4jConnectionConfig()
    assert config.uri == "bolt://env-host:7688"
    assert (config.username, config.password, config.database) == ("env-user", SECRET, "env-db")
    assert config.pool_max_size == 4
    assert config == Neo4jConnectionConfig.from_env()
    assert SECRET not in repr(config)
    # Arguments win, field by field.
    explicit = Neo4jConnectionConfig(uri="neo4j://arg-host", pool_max_size=6, database=None)
    assert (explicit.uri, explicit.pool_max_size, explicit.database) == (
        "neo4j://arg-host",
        6,
        None,
    )
    assert (explicit.username, explicit.password) == ("env-user", SECRET)
    # replace() keeps what the config holds, even once the environment changed.
    no_neo4j_env.setenv("NEO4J_URI", "bolt://other-host:7687")
    no_neo4j_env.setenv("NEO4J_POOL_MAX_SIZE", "9")
    changed = config.replace(pool_min_size=1)
    assert (changed.uri, changed.pool_max_size, changed.pool_min_size) == (
        "bolt://env-host:7688",
        4,
        1,
    )
    # from_env() with a mapping of its own reads only that mapping.
    assert Neo4jConnectionConfig.from_env({}).uri == "neo4j://localhost:7687"
    assert Neo4jConnectionConfig.from_env({}).password == ""


def test_environment_errors_name_the_variable(no_neo4j_env: pytest.MonkeyPatch) -> None:
    no_neo4j_env.setenv("NEO4J_POOL_MAX_SIZE", "ten")
    with pytest.raises(ValueError, match="NEO4J_POOL_MAX_SIZE must be an integer"):
        Neo4jConnectionConfig()
    assert Neo4jConnectionConfig(pool_max_size=3).pool_max_size == 3, "an argument wins"


def test_uri_credentials_beat_the_environments_not_arguments(
    no_neo4j_env: pytest.MonkeyPatch,
) -> None:
    no_neo4j_env.setenv("NEO4J_USERNAME", "env-user")
    no_neo4j_env.setenv("NEO4J_PASSWORD", "env-password")
    in_uri = Neo4jConnectionConfig(uri=f"bolt://alice:{URI_SECRET}@db.example:7687")
    assert (in_uri.username, in_uri.password) == ("alice", URI_SECRET)
    assert type(in_uri.password) is str and type(in_uri.username) is str
    given = Neo4jConnectionConfig(
        uri=f"bolt://alice:{URI_SECRET}@db.example:7687", username="carol", password=SECRET
    )
    assert (given.username, given.password) == ("carol", SECRET)
    plain = Neo4jConnectionConfig(uri="bolt://db.example:7687")
    assert (plain.username, plain.password) == ("env-user", "env-password")
    assert type(plain.password) is str


def test_indexes_are_label_property_pairs() -> None:
    config = Neo4jConnectionConfig(indexes=[["base", "entity_id"], (None, "entity_id")])
    assert config.indexes == (("base", "entity_id"), (None, "entity_id"))
    assert Neo4jConnectionConfig(indexes=()).indexes == ()
    hash(config)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"pool_max_size": 0}, "pool_max_size must be at least 1"),
        ({"pool_min_size": -1}, "pool_min_size must not be negative"),
        ({"pool_min_size": 5, "pool_max_size": 3}, "must not exceed pool_max_size"),
        ({"max_connection_pool_size": 0}, "max_connection_pool_size must be at least 1"),
        ({"pool_max_size": 2.5}, "pool_max_size must be an integer"),
        ({"pool_max_size": True}, "pool_max_size must be an integer"),
        ({"borrow_timeout": 0}, "borrow_timeout must be more than zero"),
        ({"borrow_timeout": -1.0}, "borrow_timeout must be more than zero"),
        ({"connection_timeout": float("nan")}, "connection_timeout must be more than zero"),
        ({"connection_timeout": "30"}, "connection_timeout must be a number"),
        ({"max_idle_time": 0}, "max_idle_time must be more than zero"),
        ({"health_check_interval": -5}, "health_check_interval must be zero or more"),
        ({"uri": "http://localhost:7474"}, "unknown URI scheme 'http'"),
        ({"uri": "mongodb://localhost"}, "unknown URI scheme 'mongodb'"),
        ({"uri": "localhost:7687"}, "unknown URI scheme"),
        ({"uri": ""}, "uri must be a non-empty string"),
        ({"uri": "bolt://"}, "names no host"),
        ({"uri": "bolt://host:76877"}, r"port 76877 .*is out of range \(1-65535\)"),
        ({"uri": f"bolt://neo4j:{SECRET}@host:76877"}, r"port 76877 .*is out of range"),
        ({"uri": "bolt://[::1]:76877"}, r"port 76877 .*is out of range"),
        ({"uri": "bolt://host:0"}, r"port 0 .*is out of range"),
        ({"uri": "bolt://host:http"}, r"port 'http' .*is not a number"),
        ({"uri": "bolt://[::1"}, "is not a valid URI"),
        ({"database": ""}, "database must be a non-empty string"),
        ({"driver_options": {"auth": ("a", "b")}}, "driver_options may not set auth"),
        ({"driver_options": {"max_connection_pool_size": 3}}, "may not set max_connection"),
        ({"database_preparer": "not callable"}, "database_preparer must be"),
        ({"indexes": "base.entity_id"}, "indexes must be a sequence of"),
        ({"indexes": [("base",)]}, r"\(label, property\) pairs .* got \('base',\)"),
        ({"indexes": [("", "entity_id")]}, "non-empty strings"),
        ({"indexes": [("base", None)]}, "non-empty strings"),
        ({"indexes": ["base"]}, "got 'base'"),
    ],
)
def test_invalid_values_raise_value_error(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        Neo4jConnectionConfig(password=SECRET, **changes)
    assert SECRET not in str(caught.value)


def test_password_never_in_repr_str_or_errors() -> None:
    config = Neo4jConnectionConfig(uri="bolt://db:7687", password=SECRET)
    assert SECRET not in repr(config)
    assert SECRET not in str(config)
    with pytest.raises(ValueError, match="pool_max_size") as caught:
        config.replace(pool_max_size=-1)
    assert SECRET not in str(caught.value)


def test_credentials_in_uri_are_moved_out_and_redacted() -> None:
    config = Neo4jConnectionConfig(uri=f"bolt://alice:{URI_SECRET}@db.example:7687")
    assert config.uri == "bolt://db.example:7687"
    assert (config.username, config.password) == ("alice", URI_SECRET)
    assert URI_SECRET not in repr(config)
    assert config.driver_kwargs()["auth"] == ("alice", URI_SECRET)
    # Explicit credentials win over the URI's, which are still removed.
    explicit = Neo4jConnectionConfig(
        uri=f"neo4j://bob:{URI_SECRET}@db.example", username="carol", password=SECRET
    )
    assert explicit.uri == "neo4j://db.example"
    assert (explicit.username, explicit.password) == ("carol", SECRET)
    with pytest.raises(ValueError, match="unknown URI scheme") as caught:
        Neo4jConnectionConfig(uri=f"http://alice:{URI_SECRET}@db.example")
    assert URI_SECRET not in str(caught.value)
    assert "***@db.example" in str(caught.value)
    assert redact_uri(f"bolt://x:{URI_SECRET}@[::1]:7687") == "bolt://***@[::1]:7687"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        # '/', '?' or '#' left in: the URI's host part ends inside the password.
        (f"bolt://neo4j:{HOSTILE_SECRET}@db.example:7687", "percent-encode"),
        ("bolt://neo4j:slashA-91e/hashB-27c@db.example:7687", "percent-encode"),
        ("bolt://neo4j:hashB-27c#queryC-53d@db.example:7687", "percent-encode"),
        ("bolt://neo4j:queryC-53d?atD-48f@db.example:7687", "percent-encode"),
        ("bolt://slashA-91e/hashB-27c@db.example:7687", "percent-encode"),
        ("bolt://neo4j:slashA-91e/hashB-27c@db.example:76x87", "percent-encode"),
        ("gopher://neo4j:slashA-91e/hashB-27c@db.example:7687", "percent-encode"),
        ("neo4j:slashA-91e/hashB-27c@db.example:7687", "percent-encode"),
        ("neo4j:hashB-27c@db.example:7687", "percent-encode"),
        # '@', ':' and '%' left in, or everything encoded: the URI parses.
        (f"bolt://neo4j:{AT_COLON_PERCENT}@db.example:76877", r"port 76877 .*out of range"),
        (f"bolt://neo4j:{AT_COLON_PERCENT}@db.example:http", r"port 'http' .*not a number"),
        (f"bolt://neo4j:{AT_COLON_PERCENT}@", "names no host"),
        (f"bolt://neo4j:{ENCODED}@db.example:76877", r"port 76877 .*out of range"),
        (f"bolt://neo4j:{ENCODED}@db.example:x1", r"port 'x1' .*not a number"),
        (f"gopher://neo4j:{ENCODED}@db.example", "unknown URI scheme 'gopher'"),
        (f"bolt://neo4j:{ENCODED}@[::1", "is not a valid URI"),
    ],
    ids=[
        "every-delimiter",
        "slash",
        "hash",
        "question-mark",
        "slash-no-user",
        "slash-bad-port",
        "slash-unknown-scheme",
        "slash-no-slashes",
        "no-slashes",
        "at-colon-percent-port-range",
        "at-colon-percent-port-text",
        "at-colon-percent-no-host",
        "encoded-port-range",
        "encoded-port-text",
        "encoded-unknown-scheme",
        "encoded-bad-ipv6",
    ],
)
def test_uri_passwords_with_delimiters_never_show_in_errors(uri: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        Neo4jConnectionConfig(uri=uri)
    text = str(caught.value)
    assert leaked(text) == [], text
    assert "***@" in text, "the URI is shown, redacted"
    assert leaked(redact_uri(uri)) == []


@pytest.mark.parametrize(
    ("written", "password"),
    [
        (ENCODED, HOSTILE_SECRET),
        (AT_COLON_PERCENT, AT_COLON_PERCENT),
        (urllib.parse.quote(AT_COLON_PERCENT, safe=""), AT_COLON_PERCENT),
    ],
    ids=["encoded", "at-colon-percent", "at-colon-percent-encoded"],
)
def test_uri_passwords_with_delimiters_are_taken_out(written: str, password: str) -> None:
    uri = f"neo4j://neo4j:{written}@db.example:7687/path?policy=eu#top"
    config = Neo4jConnectionConfig(uri=uri)
    assert config.password == password
    assert config.uri == "neo4j://db.example:7687/path?policy=eu#top"
    assert leaked(repr(config)) == []
    assert redact_uri(uri) == "neo4j://***@db.example:7687/path?policy=eu#top"
    with pytest.raises(ValueError, match="pool_max_size") as caught:
        config.replace(pool_max_size=0)
    assert leaked(str(caught.value)) == []


def test_from_env_reads_every_field() -> None:
    env = {
        "NEO4J_URI": "neo4j+s://graph.example:7687",
        "NEO4J_USERNAME": "svc",
        "NEO4J_PASSWORD": SECRET,
        "NEO4J_DATABASE": "graph",
        "NEO4J_POOL_MAX_SIZE": "4",
        "NEO4J_POOL_MIN_SIZE": "0",
        "NEO4J_MAX_CONNECTION_POOL_SIZE": "7",
        "NEO4J_CONNECTION_TIMEOUT": "2.5",
        "NEO4J_BORROW_TIMEOUT": "3",
        "NEO4J_HEALTH_CHECK_INTERVAL": "off",
        "NEO4J_MAX_LIFETIME": "120",
        "NEO4J_VERIFY_ON_CREATE": " Off ",
    }
    config = Neo4jConnectionConfig.from_env(env)
    assert config.verify_on_create is False
    assert config.uri == "neo4j+s://graph.example:7687"
    assert (config.username, config.password, config.database) == ("svc", SECRET, "graph")
    assert (config.pool_max_size, config.pool_min_size) == (4, 0)
    assert config.max_connection_pool_size == 7
    assert config.connection_timeout == 2.5
    assert config.borrow_timeout == 3.0
    assert config.health_check_interval is None
    assert config.max_lifetime == 120.0
    assert Neo4jConnectionConfig.from_env(env, pool_max_size=9).pool_max_size == 9


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("NEO4J_POOL_MAX_SIZE", "ten", "NEO4J_POOL_MAX_SIZE must be an integer, got 'ten'"),
        ("NEO4J_BORROW_TIMEOUT", "soon", "NEO4J_BORROW_TIMEOUT must be a number"),
        ("NEO4J_POOL_MAX_SIZE", "0", "pool_max_size must be at least 1"),
        ("NEO4J_URI", "ftp://x", "unknown URI scheme 'ftp'"),
        ("NEO4J_VERIFY_ON_CREATE", "maybe", "NEO4J_VERIFY_ON_CREATE must be true or false"),
    ],
)
def test_from_env_rejects_bad_values(name: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Neo4jConnectionConfig.from_env({name: value, "NEO4J_PASSWORD": SECRET})


@pytest.mark.parametrize("scheme", ["bolt", "bolt+s", "bolt+ssc", "neo4j", "neo4j+s", "neo4j+ssc"])
def test_tls_schemes_and_driver_options_pass_through(scheme: str) -> None:
    config = Neo4jConnectionConfig(
        uri=f"{scheme}://db.example:7687",
        driver_options={"user_agent": "svc/1", "keep_alive": False},
    )
    assert config.uri == f"{scheme}://db.example:7687"
    kwargs = config.driver_kwargs()
    assert kwargs["user_agent"] == "svc/1" and kwargs["keep_alive"] is False
    with pytest.raises(TypeError):
        config.driver_options["user_agent"] = "changed"  # type: ignore[index]


@pytest.mark.parametrize(
    ("uri", "options", "encrypted"),
    [
        ("bolt://db.example:7687", {}, False),
        ("neo4j://db.example:7687", {}, False),
        ("bolt+s://db.example:7687", {}, True),
        ("bolt+ssc://db.example:7687", {}, True),
        ("neo4j+s://db.example:7687", {}, True),
        ("neo4j+ssc://db.example:7687", {}, True),
        ("bolt://db.example:7687", {"encrypted": True}, True),
    ],
)
async def test_tls_settings_reach_the_driver_unchanged(
    uri: str, options: dict[str, Any], encrypted: bool
) -> None:
    import neo4j

    from broker.broker import default_driver_factory

    config = Neo4jConnectionConfig(uri=uri, password=SECRET, driver_options=options)
    driver = default_driver_factory(config)
    try:
        assert driver.encrypted is encrypted
        routing = uri.startswith("neo4j")
        assert isinstance(driver, neo4j.AsyncNeo4jDriver if routing else neo4j.AsyncBoltDriver)
    finally:
        await driver.close()


def test_verify_on_create_is_a_bool() -> None:
    assert Neo4jConnectionConfig(password=SECRET).verify_on_create is True
    with pytest.raises(ValueError, match="verify_on_create must be True or False, got str"):
        Neo4jConnectionConfig(password=SECRET, verify_on_create="no")  # type: ignore[arg-type]
