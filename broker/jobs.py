"""The actor's jobs: making, checking and closing a driver, each in a task of its own.

Each job returns its report (a message for the actor) and never raises but
for cancellation; the actor never waits on the I/O inside.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
import weakref
from collections.abc import Callable, Coroutine
from typing import Any

from neo4j import AsyncDriver
from neo4j.exceptions import ServiceUnavailable

from broker import log
from broker.auth_guard import AuthGuard, is_auth_failure
from broker.config import Neo4jConnectionConfig
from broker.errors import AuthBackoff, describe
from broker.messages import Checked, Closed, Created
from broker.pooled import PooledDriver
from broker.uri import redact_uri

__all__ = ["DriverFactory", "check", "close", "close_quietly", "create"]

#: Makes one (not yet connected) driver from a config.
DriverFactory = Callable[[Neo4jConnectionConfig], AsyncDriver]

#: Runs a closing our own timeout could not wait for, in a task of its own.
Linger = Callable[[Coroutine[Any, Any, None]], None]

#: Each driver's I/O still running after our timeout gave up on it, and how
#: long at most to wait for it (the driver's own timeouts end it before).
_running: weakref.WeakKeyDictionary[AsyncDriver, tuple[asyncio.Task[Any], float]] = (
    weakref.WeakKeyDictionary()
)


async def create(
    config: Neo4jConnectionConfig,
    factory: DriverFactory,
    guard: AuthGuard,
    generation: int,
    started: float,
    verify: bool,
    linger: Linger | None = None,
) -> Created:
    """Make a driver, verify it (if ``verify``) and run ``on_create``.

    ``connection_acquisition_timeout`` bounds the whole creation; an error
    names the phase that failed: ``credentials``, ``connect``, ``verify`` or
    ``on_create``, and a timeout of ours names the server and the user.
    After a failed login (``guard``) it fails at once without contacting the
    server, unless it is the one login the guard lets through.
    """
    driver: AsyncDriver | None = None
    limit = config.connection_acquisition_timeout
    began = time.monotonic()
    phase, auth, admitted = "credentials", None, None
    try:
        async with asyncio.timeout(limit):
            auth = await config.auth_for_new_driver()
            config = config.for_driver(auth)
            phase, admitted = "connect", guard.admit(auth)
            if isinstance(admitted, AuthBackoff):
                return Created(None, admitted, contextvars.copy_context(), started, phase="login")
            driver = factory(config)
            if verify or admitted == "probe":
                phase = "verify"  # a login after a failure is always a real one
                await _uncancelled(driver, driver.verify_connectivity(), config)
                guard.succeeded()
            seconds = time.monotonic() - began
            hook = config.on_create
            if hook is not None:
                phase = "on_create"
                await hook(driver)
    except BaseException as exc:
        if driver is not None:
            await _drop(driver, exc, linger)
        if isinstance(exc, asyncio.CancelledError):
            if admitted is not None:
                guard.abandoned()
            # No other local may hold the error as it propagates: its traceback
            # holds this frame, which holds the driver (and its sockets).
            raise
        return _failed(config, guard, exc, auth, admitted, started, phase)
    pooled = PooledDriver(driver, time.monotonic(), generation, auth)
    return Created(pooled, None, contextvars.copy_context(), started, seconds)


def _failed(
    config: Neo4jConnectionConfig,
    guard: AuthGuard,
    exc: BaseException,
    auth: object,
    admitted: object,
    started: float,
    phase: str,
) -> Created:
    """The report of a creation that failed (not cancelled), the guard told."""
    error = _login_failed(guard, exc, auth) if admitted is not None else exc
    if isinstance(exc, TimeoutError):
        error = _timed_out(config, phase, config.connection_acquisition_timeout)
    context = contextvars.copy_context()
    return Created(None, error, context, started, 0.0, phase == "on_create", phase)


async def _drop(driver: AsyncDriver, exc: BaseException, linger: Linger | None) -> None:
    """Close a driver whose creation failed; after our timeout, once its own I/O has ended."""
    if isinstance(exc, TimeoutError) and linger is not None:
        linger(close_quietly(driver))  # its connect may go on: report now, close after
    else:
        await close_quietly(driver)


def _login_failed(guard: AuthGuard, exc: BaseException, auth: object) -> BaseException:
    """Tell the guard how a login ended; the error to report."""
    if is_auth_failure(exc):
        return guard.failed(exc, auth)
    guard.abandoned()  # no answer about the credentials
    return exc


def _timed_out(config: Neo4jConnectionConfig, phase: str, limit: float) -> Exception:
    """Our own creation timeout, named for what it cut short (never with a secret)."""
    where = f"{redact_uri(config.uri)} as {config.username!r}"
    bound = f"{limit:g} s (connection_acquisition_timeout)"
    if phase == "credentials":
        return TimeoutError(f"credentials() did not return within {bound}, for {where}")
    if phase == "on_create":
        hook = getattr(config.on_create, "__qualname__", repr(config.on_create))
        return TimeoutError(f"the on_create hook {hook} did not finish within {bound}")
    # Reported the way the driver reports a server it cannot reach.
    return ServiceUnavailable(f"could not connect to {where} within {bound} ({phase})")


async def check(
    config: Neo4jConnectionConfig, guard: AuthGuard, pooled: PooledDriver, hook: bool, verify: bool
) -> Checked:
    """Run ``on_return`` (if ``hook``) and verify the driver (if ``verify`` or the hook failed)."""
    hook_error: Exception | None = None
    timeout = config.health_check_timeout
    on_return = config.on_return
    if hook and on_return is not None:
        try:
            async with asyncio.timeout(timeout):
                await on_return(pooled.driver)
        except Exception as exc:
            hook_error = exc
    if not verify and hook_error is None:
        return Checked(pooled, verified=False)
    try:
        async with asyncio.timeout(timeout):
            driver = pooled.driver
            await _uncancelled(driver, driver.verify_connectivity(), config)
    except Exception as exc:
        if is_auth_failure(exc):
            exc = guard.failed(exc, pooled.auth)  # type: ignore[assignment]
        return Checked(pooled, exc, hook_error)
    return Checked(pooled, None, hook_error)


async def close(pooled: PooledDriver) -> Closed:
    """Close a driver."""
    await close_quietly(pooled.driver)
    return Closed(pooled)


async def close_quietly(driver: AsyncDriver) -> None:
    """Close ``driver`` once its I/O has ended; an error other than cancellation is only logged.

    Cancelled while it waits for that I/O, it still closes the driver.
    """
    cancelled = await _settle(driver)
    try:
        await driver.close()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the driver is being dropped either way
        if log.enabled(log.DEBUG):
            log.emit(log.DEBUG, "driver.close_error", error=describe(exc))
    if cancelled:
        raise asyncio.CancelledError


async def _uncancelled(
    driver: AsyncDriver, io: Coroutine[Any, Any, None], config: Neo4jConnectionConfig
) -> None:
    """Await the driver's ``io``, which our cancellation (our own timeout) does not reach.

    The driver leaves its socket open when cancelled while it connects, so
    the I/O runs in a task of its own until the driver's own timeouts end
    it; :func:`close_quietly` waits for it before closing the driver.
    """
    task = asyncio.ensure_future(io)
    bound = max(config.connection_timeout, config.connection_acquisition_timeout) + 1.0
    _running[driver] = (task, bound)
    task.add_done_callback(functools.partial(_forget, weakref.ref(driver)))
    try:
        await asyncio.shield(task)
    finally:
        # This frame may outlive the call in an error's traceback: it must not
        # keep the driver (and its sockets) or the task (and its error) alive.
        del task, driver


def _forget(driver: weakref.ref[AsyncDriver], task: asyncio.Task[Any]) -> None:
    alive = driver()
    if alive is not None and _running.get(alive, (None, 0.0))[0] is task:
        del _running[alive]


async def _settle(driver: AsyncDriver) -> bool:
    """Let the driver's running I/O end (cancelled past its bound); True if we were cancelled."""
    running = _running.get(driver)
    if running is None or running[0].done():
        return False
    task, bound = running
    cancelled = False
    try:
        await asyncio.wait({task}, timeout=bound)
    except asyncio.CancelledError:  # the loop is ending: there is no time left to wait
        cancelled = True
    if not task.done():
        task.cancel()
        await asyncio.wait({task})
    return cancelled
