"""Structured events of the broker, without configuring anyone's logging.

When the application has configured structlog, events go through its
configuration (logger name ``broker``). When it has not, they are handed to
the stdlib logger ``broker`` (structlog's default would print every event,
debug included, to stdout). Events then reach whatever handlers the
application set up; with none, Python shows warnings and errors only.

To see every event as JSON with only the stdlib::

    handler = logging.StreamHandler()
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processor=structlog.processors.JSONRenderer()))
    logging.getLogger("broker").addHandler(handler)
    logging.getLogger("broker").setLevel(logging.DEBUG)
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import structlog

__all__ = ["LOGGER_NAME", "debug_enabled", "emit"]

LOGGER_NAME = "broker"

DEBUG = logging.DEBUG
INFO = logging.INFO
WARNING = logging.WARNING
ERROR = logging.ERROR

_stdlib_logger = logging.getLogger(LOGGER_NAME)
_fallback = structlog.wrap_logger(
    _stdlib_logger,
    processors=[
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
    ],
    wrapper_class=structlog.stdlib.BoundLogger,
)

_METHODS = {DEBUG: "debug", INFO: "info", WARNING: "warning", ERROR: "error"}


def _target() -> Any:
    if structlog.is_configured():
        return structlog.get_logger(LOGGER_NAME)
    return _fallback


def enabled(level: int) -> bool:
    """Whether an event at ``level`` would go anywhere (cheap; call before building one)."""
    if not structlog.is_configured():
        return _stdlib_logger.isEnabledFor(level)
    check = getattr(structlog.get_logger(LOGGER_NAME).bind(), "is_enabled_for", None)
    return True if check is None else bool(check(level))


def debug_enabled() -> bool:
    """Whether debug events would go anywhere."""
    return enabled(DEBUG)


def emit(level: int, event: str, **fields: Any) -> None:
    """Send one event. Never raises: logging must not break the pool."""
    with contextlib.suppress(Exception):  # a broken log setup must not break borrowing
        getattr(_target(), _METHODS[level])(event, **fields)
