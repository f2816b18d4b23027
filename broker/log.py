"""Structured events of the broker, and one call to show them.

When the application has configured structlog, events go through its
configuration (logger name ``broker``). When it has not, they are handed to
the stdlib logger ``broker`` (structlog's default would print every event,
debug included, to stdout) as records that any handler prints as one
readable line::

    driver.created driver=1 loop=MainThread/loop-1 thread=MainThread ... task_id=...

and that structlog's ``ProcessorFormatter`` renders with every field (as
JSON, say). With no logging set up, Python shows warnings and errors only,
on standard error. :func:`configure` shows more in one call::

    broker.log.configure(level="DEBUG")              # readable lines
    broker.log.configure(level="DEBUG", json=True)   # JSON objects, every field
    broker.log.configure(json=True, stream=sys.stdout)   # INFO and up, to stdout
"""

from __future__ import annotations

import contextlib
import json as jsonlib
import logging
import re
import sys
import threading
from collections.abc import Mapping
from typing import Any, TextIO

import structlog

__all__ = ["LOGGER_NAME", "Event", "configure", "debug_enabled", "emit", "enabled"]

LOGGER_NAME = "broker"

DEBUG = logging.DEBUG
INFO = logging.INFO
WARNING = logging.WARNING
ERROR = logging.ERROR

_METHODS = {DEBUG: "debug", INFO: "info", WARNING: "warning", ERROR: "error"}

# Fields a line leaves to the handler's own format; JSON keeps them.
_NOT_IN_LINE = frozenset({"event", "level", "timestamp"})
# Strings shown without quotes in a line.
_BARE = re.compile(r"[\w.:/@+-]+")

_render_json = False  # set by configure(json=...)


def render_line(fields: Mapping[str, Any]) -> str:
    """``event key=value ...``: the event name, then its fields in order."""
    parts = [str(fields.get("event", ""))]
    for key, value in fields.items():
        if key not in _NOT_IN_LINE:
            shown = value if isinstance(value, str) and _BARE.fullmatch(value) else repr(value)
            parts.append(f"{key}={shown}")
    return " ".join(parts)


def render_json(fields: Mapping[str, Any]) -> str:
    """The event as one JSON object, every field included, its name first."""
    return jsonlib.dumps({"event": fields.get("event"), **fields}, default=repr, ensure_ascii=False)


class Event(dict[str, Any]):
    """An event's fields that read as one line wherever a handler prints them.

    A plain ``logging.Formatter`` shows ``str(event)``; structlog's
    ``ProcessorFormatter`` takes the fields themselves.
    """

    __slots__ = ()

    def __str__(self) -> str:
        return render_json(self) if _render_json else render_line(self)


def _as_record(logger: Any, method: str, event_dict: Any) -> Any:
    return structlog.stdlib.ProcessorFormatter.wrap_for_formatter(logger, method, Event(event_dict))


_stdlib_logger = logging.getLogger(LOGGER_NAME)
_fallback = structlog.wrap_logger(
    _stdlib_logger,
    processors=[
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso"),
        _as_record,
    ],
    wrapper_class=structlog.stdlib.BoundLogger,
)

# structlog's live configuration: configure() and reset_defaults() replace its
# attributes, so comparing their identities tells when a cached logger is stale
# without building get_config()'s dict on every check. get_config() is the
# fallback should a structlog release rename it.
_live_config: Any = getattr(getattr(structlog, "_config", None), "_CONFIG", None)


def _config_parts() -> tuple[Any, Any, Any, Any]:
    live = _live_config
    if live is not None:
        return (
            live.default_processors,
            live.default_wrapper_class,
            live.logger_factory,
            live.default_context_class,
        )
    config = structlog.get_config()
    return (
        config["processors"],
        config["wrapper_class"],
        config["logger_factory"],
        config["context_class"],
    )


# The application's structlog logger for the broker, bound once per
# configuration: the configuration's objects (held, so that their identities
# stay unique), the logger and its level check.
_bound: tuple[Any, Any, Any, Any, Any, Any] | None = None


def _configured() -> tuple[Any, Any]:
    """The bound logger of the current structlog configuration, and its level check."""
    global _bound
    cached = _bound
    live = _live_config
    if (
        cached is not None
        and live is not None
        and cached[0] is live.default_processors
        and cached[1] is live.default_wrapper_class
        and cached[2] is live.logger_factory
        and cached[3] is live.default_context_class
    ):
        return cached[4], cached[5]
    parts = _config_parts()
    if cached is not None and all(a is b for a, b in zip(cached[:4], parts, strict=True)):
        return cached[4], cached[5]
    logger = structlog.get_logger(LOGGER_NAME).bind()
    check = getattr(logger, "is_enabled_for", None) or getattr(logger, "isEnabledFor", None)
    _bound = (*parts, logger, check)
    return logger, check


def enabled(level: int) -> bool:
    """Whether an event at ``level`` would go anywhere (cheap; call before building one)."""
    live = _live_config
    if not (live.is_configured if live is not None else structlog.is_configured()):
        return _stdlib_logger.isEnabledFor(level)
    try:
        _, check = _configured()
        return True if check is None else bool(check(level))
    except Exception:  # a broken log setup must not break borrowing
        return True


def debug_enabled() -> bool:
    """Whether debug events would go anywhere."""
    return enabled(DEBUG)


def emit(level: int, event: str, **fields: Any) -> None:
    """Send one event. Never raises: logging must not break the pool."""
    with contextlib.suppress(Exception):  # a broken log setup must not break borrowing
        target = _configured()[0] if structlog.is_configured() else _fallback
        getattr(target, _METHODS[level])(event, **fields)


# -- configure() --------------------------------------------------------------------


class _Stderr(logging.StreamHandler[TextIO]):
    """Standard error as it is when a line is written, while the root logger has no handler.

    Once the application gives the root logger a handler (a Celery worker
    does at start), events reach that handler instead, so none is printed twice.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _: TextIO) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


_configure_lock = threading.Lock()
_handler: logging.Handler | None = None  # the handler configure() added


def configure(
    level: int | str | None = None, *, json: bool = False, stream: TextIO | None = None
) -> None:
    """Show the broker's events, each exactly once. Safe to call again: it replaces.

    Without ``stream``, events join the application's logging: the root
    logger's handlers (a Celery worker's log, ``logging.basicConfig`` ...),
    or standard error while the root logger has none. With ``stream``, they
    are written there and not passed on. ``level`` None follows the root
    logger's level (a Celery worker's ``--loglevel``) when events join the
    application's logging, and means ``INFO`` with a ``stream`` (the root's
    default, WARNING, would show nearly nothing there); otherwise events
    from that level up are shown. ``json`` turns each event into a JSON
    object with every field, timestamp and level included.

    An application that configured structlog keeps its own processors; this
    call then only sets the stdlib logger ``broker``'s level and handler.
    """
    global _handler, _render_json
    numeric = _level_number(INFO if level is None and stream is not None else level)
    handler: logging.Handler = _Stderr() if stream is None else logging.StreamHandler(stream)
    plain = "%(message)s" if json else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(plain))
    with _configure_lock:
        if _handler is not None:
            _stdlib_logger.removeHandler(_handler)
        _render_json = json
        _stdlib_logger.addHandler(handler)
        _handler = handler
        _stdlib_logger.propagate = stream is None
        _stdlib_logger.setLevel(numeric)


def _level_number(level: int | str | None) -> int:
    if level is None:
        return logging.NOTSET
    if isinstance(level, bool) or not isinstance(level, int | str):
        raise ValueError(f"level must be a logging level or its name, got {level!r}")
    if isinstance(level, int):
        return level
    number = logging.getLevelName(level.upper())
    if not isinstance(number, int):
        raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
    return number


def _reset() -> None:
    """Undo :func:`configure` (for tests)."""
    global _handler, _render_json, _bound
    with _configure_lock:
        if _handler is not None:
            _stdlib_logger.removeHandler(_handler)
        _handler = None
        _render_json = False
        _bound = None
