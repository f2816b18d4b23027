"""Connection and pool settings, checked once at construction.

The field names and defaults of the seed design are kept, so code written for
it keeps working; the pool's own knobs (timeouts, health checks, lifetimes)
are added with defaults a service can run on. As in the seed, a field left
out takes its value from the environment (``NEO4J_URI`` ...) when set there.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import neo4j
from neo4j.auth_management import AsyncAuthManager

from broker.uri import check_port, redact_uri, split_userinfo

if TYPE_CHECKING:
    from neo4j import AsyncDriver

__all__ = [
    "SEED_INDEXES",
    "SUPPORTED_SCHEMES",
    "CredentialsProvider",
    "DatabasePreparer",
    "DriverHook",
    "IndexSpec",
    "Neo4jConnectionConfig",
    "ReconnectFailed",
    "check_sizes",
    "check_timeout",
    "redact_uri",
]

T = TypeVar("T")

#: URI schemes of the Bolt drivers (direct and routing, plain and TLS).
SUPPORTED_SCHEMES = frozenset({"bolt", "bolt+s", "bolt+ssc", "neo4j", "neo4j+s", "neo4j+ssc"})

#: ``(driver, workspace) -> database name``: prepares a workspace's database.
DatabasePreparer = Callable[["AsyncDriver", str], Awaitable[str]]

#: Called with no arguments for each new driver, sync or async. Returns
#: ``(username, password)``, a password (for ``username``), a ``neo4j.Auth``,
#: or a new ``neo4j.auth_management.AsyncAuthManager`` for that driver alone.
CredentialsProvider = Callable[[], Any]

#: ``async (driver) -> None``: run on a new driver (``on_create``) or on a
#: returned one (``on_return``).
DriverHook = Callable[["AsyncDriver"], Awaitable[None]]

#: ``(pool stats) -> None``, sync or async: a pool could not reach
#: ``pool_min_size`` for ``reconnect_timeout`` seconds.
ReconnectFailed = Callable[[Mapping[str, Any]], Any]

# Fields holding code, not values: never read from the environment or shown.
_CALLABLE_FIELDS = frozenset(
    {"database_preparer", "credentials", "on_create", "on_return", "reconnect_failed"}
)

# Driver settings the config owns; driver_options may not set them again.
_OWNED_DRIVER_OPTIONS = frozenset(
    {
        "auth",
        "max_connection_pool_size",
        "connection_timeout",
        "connection_acquisition_timeout",
        "max_transaction_retry_time",
    }
)

_ENV_PREFIX = "NEO4J_"

#: ``(label, property)``: an index to ensure in each workspace's database. A
#: label of None stands for the workspace's own name used as a label.
IndexSpec = tuple[str | None, str]

#: The seed's schema: one index on ``:base(entity_id)``, the label and
#: property every query of its graph storage matches on.
SEED_INDEXES: tuple[IndexSpec, ...] = (("base", "entity_id"),)

# Fields read from the environment, with the value used when it is not set.
_BUILT_IN: dict[str, Any] = {}
_CREDENTIALS = frozenset({"username", "password"})


class _NotGiven(str):
    """A credential from the environment or the defaults, not from the caller.

    Credentials embedded in the URI win over these, never over arguments.
    """

    __slots__ = ()


def _env(name: str, default: T) -> T:
    """A field whose default is ``NEO4J_<NAME>`` when set, else ``default``."""
    _BUILT_IN[name] = default
    made: T = field(default_factory=lambda: _env_value(name, os.environ))
    return made


def _env_value(name: str, environ: Mapping[str, str]) -> Any:
    raw = environ.get(_ENV_PREFIX + name.upper())
    value = _BUILT_IN[name] if raw is None or raw == "" else _parse_env(name, raw)
    return _NotGiven(value) if name in _CREDENTIALS else value


@dataclass(frozen=True, repr=False)
class Neo4jConnectionConfig:
    """How to reach Neo4j, and how large each loop's pool of drivers may grow.

    A pooled unit is one ``neo4j.AsyncDriver``, which keeps its own sockets
    (``max_connection_pool_size``). Each event loop gets its own pool of at
    most ``pool_max_size`` drivers. Durations are in seconds; ``None`` turns
    the matching maintenance off.

    As in the seed, a field that is not given takes its value from the
    environment, read the way :meth:`from_env` reads it (``NEO4J_URI``,
    ``NEO4J_PASSWORD``, ``NEO4J_POOL_MAX_SIZE`` ...); arguments always win.

    Credentials embedded in the URI (``bolt://user:pass@host``) are taken out
    of it and used when no password is given. The password never appears in
    the repr, in an error or in a log line.
    """

    uri: str = _env("uri", "neo4j://localhost:7687")
    username: str = _env("username", "neo4j")
    password: str = _env("password", "")
    #: Sockets inside one driver (the driver's own pool).
    max_connection_pool_size: int = _env("max_connection_pool_size", 50)
    connection_timeout: float = _env("connection_timeout", 30.0)
    connection_acquisition_timeout: float = _env("connection_acquisition_timeout", 30.0)
    max_transaction_retry_time: float = _env("max_transaction_retry_time", 30.0)
    #: Drivers per event loop: in use, idle and being created together.
    pool_max_size: int = _env("pool_max_size", 10)
    #: Drivers each loop keeps ready once it has started.
    pool_min_size: int = _env("pool_min_size", 2)
    #: How long ``borrow()`` waits for a driver unless told otherwise.
    borrow_timeout: float = _env("borrow_timeout", 30.0)
    #: A driver idle longer than this is verified before it is handed out.
    health_check_interval: float | None = _env("health_check_interval", 60.0)
    #: How long one health check may take before the driver is discarded.
    health_check_timeout: float = _env("health_check_timeout", 10.0)
    #: Drivers older than this are closed when they come back.
    max_lifetime: float | None = _env("max_lifetime", 3600.0)
    #: Idle drivers above ``pool_min_size`` are closed after this long.
    max_idle_time: float | None = _env("max_idle_time", 600.0)
    #: How long a closing pool waits for drivers still in use.
    close_timeout: float = _env("close_timeout", 10.0)
    #: The database of every workspace; None: one per workspace where the
    #: server can create it, else the server's default.
    database: str | None = _env("database", None)
    #: Indexes each workspace's preparation ensures (see ``IndexSpec``).
    indexes: tuple[IndexSpec, ...] = SEED_INDEXES
    #: Replaces the default workspace preparation (see ``broker.workspace``).
    database_preparer: DatabasePreparer | None = field(default=None, compare=False)
    #: Other ``neo4j.AsyncGraphDatabase.driver`` options, passed unchanged.
    driver_options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    #: Borrowers that may wait at once in one loop; beyond, ``TooManyWaiters``. 0: no limit.
    max_waiting: int = _env("max_waiting", 0)
    #: A driver handed out this many times is replaced when it comes back.
    max_borrows: int | None = _env("max_borrows", None)
    #: After this long unable to reach ``pool_min_size``, ``reconnect_failed`` is called.
    reconnect_timeout: float | None = _env("reconnect_timeout", 300.0)
    #: After a failed login, no other is tried for this long, doubling on
    #: each failure up to ``auth_retry_max`` (one login at a time, broker-wide).
    auth_retry_first: float = _env("auth_retry_first", 1.0)
    auth_retry_max: float = _env("auth_retry_max", 60.0)
    #: Credentials evaluated for each new driver (see :data:`CredentialsProvider`).
    credentials: CredentialsProvider | None = field(default=None, compare=False)
    #: Verify a driver made for a waiting borrower before handing it out; off
    #: saves a round trip per new driver (the borrower's first query proves
    #: the connection). Drivers made to reach ``pool_min_size`` are always verified.
    verify_on_create: bool = _env("verify_on_create", True)
    #: Run once on each new driver, after it was verified, before its first borrow.
    on_create: DriverHook | None = field(default=None, compare=False)
    #: Run on each returned driver; if it fails, the driver is verified or discarded.
    on_return: DriverHook | None = field(default=None, compare=False)
    #: Called when a pool stayed below ``pool_min_size`` for ``reconnect_timeout``.
    reconnect_failed: ReconnectFailed | None = field(default=None, compare=False)
    #: Sessions of one loop-safe driver (``broker.driver()``) sharing one pooled driver at once.
    sessions_per_driver: int = _env("sessions_per_driver", 16)

    def __post_init__(self) -> None:
        self._check_uri()
        for name in ("username", "password"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string")
        for name in ("max_connection_pool_size", "max_waiting", "sessions_per_driver"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {type(value).__name__}")
            if value < 1 and name != "max_waiting":
                raise ValueError(f"{name} must be at least 1, got {value}")
        check_sizes(self.pool_min_size, self.pool_max_size, "pool_min_size", "pool_max_size")
        if not isinstance(self.verify_on_create, bool):
            raise ValueError(
                "verify_on_create must be True or False, "
                f"got {type(self.verify_on_create).__name__}"
            )
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be zero (no limit) or more, got {self.max_waiting}")
        if self.max_borrows is not None and (
            isinstance(self.max_borrows, bool)
            or not isinstance(self.max_borrows, int)
            or self.max_borrows < 1
        ):
            raise ValueError(
                f"max_borrows must be an integer of 1 or more, or None, got {self.max_borrows!r}"
            )
        for name in sorted(_CALLABLE_FIELDS - {"database_preparer"}):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise ValueError(f"{name} must be a callable or None, got {type(value).__name__}")
        self._check_durations()
        if self.database is not None and (not isinstance(self.database, str) or not self.database):
            raise ValueError("database must be a non-empty string or None")
        object.__setattr__(self, "indexes", _check_indexes(self.indexes))
        if self.database_preparer is not None and not callable(self.database_preparer):
            raise ValueError("database_preparer must be an async callable (driver, workspace)")
        self._check_driver_options()

    def _check_durations(self) -> None:
        for name in (
            "connection_timeout",
            "connection_acquisition_timeout",
            "borrow_timeout",
            "health_check_timeout",
            "close_timeout",
        ):
            _check_duration(name, getattr(self, name), allow_none=False, allow_zero=False)
        _check_duration("max_transaction_retry_time", self.max_transaction_retry_time, False, True)
        _check_duration("health_check_interval", self.health_check_interval, True, True)
        _check_duration("max_lifetime", self.max_lifetime, True, False)
        _check_duration("max_idle_time", self.max_idle_time, True, False)
        _check_duration("reconnect_timeout", self.reconnect_timeout, True, False)
        _check_duration("auth_retry_first", self.auth_retry_first, False, True)
        _check_duration("auth_retry_max", self.auth_retry_max, False, True)

    def _check_driver_options(self) -> None:
        if not isinstance(self.driver_options, Mapping):
            raise ValueError("driver_options must be a mapping of driver settings")
        if "auth" in self.driver_options:
            raise ValueError(
                "driver_options may not set auth: use username and password, or "
                "credentials=, a callable run for each new driver that may return a new "
                "auth manager (one auth manager cannot be shared by drivers of different "
                "event loops: its lock belongs to one loop)"
            )
        clash = sorted(_OWNED_DRIVER_OPTIONS & set(self.driver_options))
        if clash:
            raise ValueError(
                f"driver_options may not set {', '.join(clash)}: use the config fields instead"
            )
        object.__setattr__(self, "driver_options", MappingProxyType(dict(self.driver_options)))

    def _check_uri(self) -> None:
        if not isinstance(self.uri, str) or not self.uri:
            raise ValueError("uri must be a non-empty string such as 'neo4j://host:7687'")
        # Every message names the URI redacted, and reads nothing from the
        # original but what the redacted form shows too.
        shown = redact_uri(self.uri)
        try:
            parts = urllib.parse.urlsplit(self.uri)
            shown_parts = urllib.parse.urlsplit(shown)
        except ValueError:
            raise ValueError(f"uri {shown!r} is not a valid URI") from None
        if "@" in self.uri and "@" not in parts.netloc:
            raise ValueError(
                f"uri {shown!r} has an '@' outside its host part: write credentials as "
                "scheme://user:password@host:port with any '/', '?' or '#' in them "
                "percent-encoded (%2F, %3F, %23), or pass username= and password= instead"
            )
        check_port(shown_parts, shown)
        scheme = shown_parts.scheme.lower()
        if scheme not in SUPPORTED_SCHEMES:
            raise ValueError(
                f"unknown URI scheme {scheme!r} in {shown!r}; "
                f"use one of {', '.join(sorted(SUPPORTED_SCHEMES))}"
            )
        if not shown_parts.hostname:
            raise ValueError(f"uri {shown!r} names no host")
        bare, user, password = split_userinfo(self.uri)
        if bare != self.uri:
            object.__setattr__(self, "uri", bare)
            if isinstance(self.password, _NotGiven) or not self.password:
                if user:
                    object.__setattr__(self, "username", user)
                object.__setattr__(self, "password", password or "")
        for name in _CREDENTIALS:
            value = getattr(self, name)
            if isinstance(value, _NotGiven):
                object.__setattr__(self, name, str(value))

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.name not in {"password", "driver_options", *_CALLABLE_FIELDS}
        )
        options = sorted(self.driver_options)
        return f"Neo4jConnectionConfig({shown}, password='***', driver_options={options!r})"

    def replace(self, **changes: Any) -> Self:
        """A copy with some fields changed, checked like a new config."""
        return dataclasses.replace(self, **changes)

    def driver_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``neo4j.AsyncGraphDatabase.driver``."""
        auth = self.__dict__.get("_driver_auth")
        return {
            "auth": (self.username, self.password) if auth is None else auth,
            "max_connection_pool_size": self.max_connection_pool_size,
            "connection_timeout": self.connection_timeout,
            "connection_acquisition_timeout": self.connection_acquisition_timeout,
            "max_transaction_retry_time": self.max_transaction_retry_time,
            **self.driver_options,
        }

    async def auth_for_new_driver(self) -> Any:
        """What the next driver authenticates with: ``credentials()`` if set."""
        provider = self.credentials
        if provider is None:
            return (self.username, self.password)
        value = provider()
        if inspect.isawaitable(value):
            value = await value
        if isinstance(value, str):
            return (self.username, value)
        if (
            isinstance(value, tuple)
            and len(value) == 2
            and all(isinstance(part, str) for part in value)
        ) or isinstance(value, neo4j.Auth | AsyncAuthManager):
            return value
        # Never show the value: it may hold a secret.
        raise TypeError(
            "credentials() must return (username, password), a password, a neo4j.Auth "
            f"or an AsyncAuthManager, got {type(value).__name__}"
        )

    def for_driver(self, auth: Any) -> Self:
        """This config, with ``auth`` (from :meth:`auth_for_new_driver`) as the driver's auth."""
        if auth == (self.username, self.password) and self.credentials is None:
            return self
        if isinstance(auth, tuple):
            twin = dataclasses.replace(self, username=auth[0], password=auth[1], credentials=None)
        else:
            twin = dataclasses.replace(self, credentials=None)
        object.__setattr__(twin, "_driver_auth", auth)
        return twin

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> Neo4jConnectionConfig:
        """Read ``NEO4J_URI``, ``NEO4J_USERNAME``, ``NEO4J_PASSWORD``,
        ``NEO4J_DATABASE`` and ``NEO4J_<FIELD>`` for each numeric field
        (``NEO4J_POOL_MAX_SIZE``, ``NEO4J_BORROW_TIMEOUT`` ...).

        ``Neo4jConnectionConfig()`` reads the same variables; this form also
        takes another mapping than ``os.environ``. Keyword arguments win over
        the environment.
        """
        env = os.environ if environ is None else environ
        values = {name: _env_value(name, env) for name in _BUILT_IN if name not in overrides}
        values.update(overrides)
        return cls(**values)


_INT_FIELDS = frozenset(
    {"max_connection_pool_size", "pool_max_size", "pool_min_size", "max_waiting", "max_borrows"}
    | {"sessions_per_driver"}
)
_OPTIONAL_FIELDS = frozenset(
    {"health_check_interval", "max_lifetime", "max_idle_time", "max_borrows", "reconnect_timeout"}
)
_STRING_FIELDS = frozenset({"uri", "username", "password", "database"})
_BOOL_FIELDS = frozenset({"verify_on_create"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _parse_env(name: str, raw: str) -> Any:
    variable = _ENV_PREFIX + name.upper()
    if name in _STRING_FIELDS:
        return raw
    text = raw.strip()
    if name in _BOOL_FIELDS:
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"{variable} must be true or false (1/0, yes/no, on/off), got {text!r}")
    if name in _OPTIONAL_FIELDS and text.lower() in {"none", "off"}:
        return None
    try:
        return int(text) if name in _INT_FIELDS else float(text)
    except ValueError:
        kind = "an integer" if name in _INT_FIELDS else "a number"
        raise ValueError(f"{variable} must be {kind}, got {text!r}") from None


def _check_indexes(indexes: Any) -> tuple[IndexSpec, ...]:
    message = (
        "indexes must be a sequence of (label, property) pairs of non-empty strings; "
        "a label of None stands for the workspace's own label"
    )
    if isinstance(indexes, str | bytes) or not isinstance(indexes, tuple | list):
        raise ValueError(message)
    checked: list[IndexSpec] = []
    for pair in indexes:
        if isinstance(pair, str | bytes) or not isinstance(pair, tuple | list) or len(pair) != 2:
            raise ValueError(f"{message}, got {pair!r}")
        label, prop = pair
        if not (label is None or (isinstance(label, str) and label)):
            raise ValueError(f"{message}, got {pair!r}")
        if not isinstance(prop, str) or not prop:
            raise ValueError(f"{message}, got {pair!r}")
        checked.append((label, prop))
    return tuple(checked)


def check_sizes(
    min_size: Any, max_size: Any, min_name: str = "min_size", max_name: str = "max_size"
) -> None:
    """Raise ``ValueError`` unless ``0 <= min_size <= max_size`` and ``max_size >= 1``."""
    for name, value in ((max_name, max_size), (min_name, min_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {type(value).__name__}")
    if max_size < 1:
        raise ValueError(f"{max_name} must be at least 1, got {max_size}")
    if min_size < 0:
        raise ValueError(f"{min_name} must not be negative, got {min_size}")
    if min_size > max_size:
        raise ValueError(f"{min_name} ({min_size}) must not exceed {max_name} ({max_size})")


def check_timeout(timeout: Any) -> float:
    """A wait in seconds given to a call (``borrow(timeout=...)``): zero or more, or ValueError."""
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or math.isnan(timeout)
        or timeout < 0
    ):
        raise ValueError(f"timeout must be zero or more seconds, got {timeout!r}")
    return float(timeout)


def _check_duration(name: str, value: Any, allow_none: bool, allow_zero: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        kind = "a number of seconds or None" if allow_none else "a number of seconds"
        raise ValueError(f"{name} must be {kind}, got {type(value).__name__}")
    if math.isnan(value) or math.isinf(value) or value < 0 or (value == 0 and not allow_zero):
        bound = "zero or more" if allow_zero else "more than zero"
        raise ValueError(f"{name} must be {bound} seconds, got {value!r}")
