"""``broker.patch_neo4j()``: ``neo4j.AsyncGraphDatabase.driver(...)`` returns loop-safe drivers.

For code that makes its own driver (a storage class's ``initialize()``) and
cannot be changed. While the patch is on, each call returns a new
:class:`~broker.loopsafe.LoopSafeDriver`, served by the pools of one broker per
distinct set of settings in the process: the default broker when the
settings match its configuration, otherwise a broker made for them once and
reused by every later call with the same settings (and closed, like the
default one, by ``broker.celery.close_pools()``). Closing such a driver
ends that stand-in only, so a class that makes and closes its driver per
task opens no new connection per task on a persistent loop.

The URI, ``auth`` and the driver's own options are taken as given: the four
the configuration owns (``max_connection_pool_size``, ``connection_timeout``,
``connection_acquisition_timeout``, ``max_transaction_retry_time``) go to
its fields, every other one to ``driver_options``, unchanged. Pool settings
(``pool_max_size``, timeouts ...) come from the default broker's
configuration. An ``auth`` that cannot be shared by drivers of several loops
(an auth manager, whose lock belongs to one loop), or settings the
configuration refuses, get the driver's own ``AsyncDriver``, with a
``patch.not_loop_safe`` warning saying why. The synchronous
``GraphDatabase.driver`` is never touched.
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Any

import neo4j

from broker import default, log
from broker.broker import Broker
from broker.config import Neo4jConnectionConfig
from broker.loopsafe import LoopSafeDriver

__all__ = ["PatchHandle", "patch_neo4j"]

# The configuration's own fields among the driver's options.
_OWNED = (
    "max_connection_pool_size",
    "connection_timeout",
    "connection_acquisition_timeout",
    "max_transaction_retry_time",
)

_lock = threading.Lock()
_holds = 0  # handles not undone yet; the patch is on while there is one
_original: Any = neo4j.AsyncGraphDatabase.__dict__["driver"]
# One broker per distinct set of settings: (config, non-basic auth, broker).
_brokers: list[tuple[Neo4jConnectionConfig, Any, Broker]] = []


class PatchHandle:
    """Keeps the patch on until :meth:`undo` (or the end of a ``with`` block)."""

    def __init__(self) -> None:
        self._held = True

    @property
    def active(self) -> bool:
        """True until this handle is undone."""
        return self._held

    def undo(self) -> None:
        """Give up this handle; the patch goes off with the last one (harmless twice)."""
        global _holds
        with _lock:
            if not self._held:
                return
            self._held = False
            _holds -= 1
            if _holds == 0:
                neo4j.AsyncGraphDatabase.driver = _original  # type: ignore[method-assign]

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"<PatchHandle {'active' if self._held else 'undone'}>"


def patch_neo4j() -> PatchHandle:
    """Turn the patch on (it stays on while any handle is not undone); return a handle."""
    global _holds
    with _lock:
        _holds += 1
        if _holds == 1:
            neo4j.AsyncGraphDatabase.driver = classmethod(_driver)  # type: ignore[method-assign,assignment]
    return PatchHandle()


def is_patched() -> bool:
    """True while ``neo4j.AsyncGraphDatabase.driver`` returns loop-safe drivers."""
    return neo4j.AsyncGraphDatabase.__dict__["driver"] is not _original


def _driver(cls: Any, /, uri: str, *, auth: Any = None, **options: Any) -> neo4j.AsyncDriver:
    """The patched ``AsyncGraphDatabase.driver``."""
    settings = _settings(uri, auth, dict(options))
    if isinstance(settings, str):
        if log.enabled(log.WARNING):
            log.emit(log.WARNING, "patch.not_loop_safe", reason=settings)
        driver: neo4j.AsyncDriver = _original.__get__(None, cls)(uri, auth=auth, **options)
        return driver
    return LoopSafeDriver(_Resolver(*settings))


def _settings(
    uri: str, auth: Any, options: dict[str, Any]
) -> tuple[Neo4jConnectionConfig, Any] | str:
    """The configuration for these settings (and a non-basic auth), or why there is none."""
    owned = {name: options.pop(name) for name in _OWNED if name in options}
    extra: Any = None
    if isinstance(auth, tuple | list) and len(auth) == 2 and all(isinstance(p, str) for p in auth):
        credentials: dict[str, Any] = {"username": auth[0], "password": auth[1]}
    elif isinstance(auth, neo4j.Auth):
        if (
            auth.scheme == "basic"
            and not getattr(auth, "realm", None)
            and not getattr(auth, "parameters", None)
        ):
            credentials = {"username": auth.principal, "password": auth.credentials}
        else:
            extra = auth
            credentials = {"credentials": _StaticAuth(auth)}
    elif hasattr(auth, "get_auth"):
        return "an auth manager belongs to one event loop: pass (user, password) or neo4j.Auth"
    else:
        return f"auth of type {type(auth).__name__} is not supported by the broker"
    base = default.get_broker().config
    try:
        config = base.replace(
            uri=uri, driver_options=options, **{"credentials": None, **credentials, **owned}
        )
    except (ValueError, TypeError) as exc:
        return f"the broker's configuration refused these settings: {exc}"
    return config, extra


class _StaticAuth:
    """``credentials=`` for a non-basic ``neo4j.Auth``: the same one for every driver."""

    def __init__(self, auth: neo4j.Auth) -> None:
        self._auth = auth

    def __call__(self) -> neo4j.Auth:
        return self._auth

    def __repr__(self) -> str:
        return "<static auth>"


class _Resolver:
    """The broker a patched driver uses now: the default one while its settings match."""

    def __init__(self, config: Neo4jConnectionConfig, extra: Any) -> None:
        self._config = config
        self._extra = extra
        self._cache: tuple[Broker | None, Broker | None] = (None, None)

    def __call__(self) -> Broker:
        current = default.get_broker()
        seen, chosen = self._cache
        if seen is current and chosen is not None and not chosen.closed:
            return chosen
        chosen = _broker_for(self._config, self._extra, current)
        self._cache = (current, chosen)
        return chosen


def _broker_for(config: Neo4jConnectionConfig, extra: Any, current: Broker) -> Broker:
    if extra is None and current.config.credentials is None and current.config == config:
        return current
    with _lock:
        for known, known_extra, known_broker in _brokers:
            if known == config and known_extra == extra and not known_broker.closed:
                return known_broker
        made = Broker(config)
        _brokers[:] = [entry for entry in _brokers if not entry[2].closed]
        _brokers.append((config, extra, made))
    default.close_with_process(made)  # a worker's shutdown closes it too
    return made
