"""Small helpers shared by tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from broker.testing import BoltServer


def bolt_port(server: BoltServer) -> int:
    """The port of the server's Bolt URI."""
    return int(server.uri.rsplit(":", 1)[1])


async def eventually(check: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Wait (letting the loop run) until ``check()`` holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout} s: {what or check}")
        await asyncio.sleep(0.01)


def eventually_sync(check: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """:func:`eventually` for code outside a loop."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout} s: {what or check}")
        time.sleep(0.01)
