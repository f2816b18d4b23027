"""Every read of asyncio's private names, in one place, each guarded.

asyncio does not say publicly which loop runs on this thread without
raising, whether a loop has begun its last step, or which kernel handles a
loop holds. The broker needs each of these once; a Python release that
renames one degrades that feature (documented beside each), never the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import socket
import threading
from asyncio import selector_events
from typing import Any

__all__ = ["kernel_handles", "running_loop", "shutting_down", "started_inside"]

#: The running loop of this thread, or None; never raises (what ``get_running_loop``
#: does without the exception, at the cost of a C call instead of a raise).
running_loop = asyncio._get_running_loop


def shutting_down(loop: asyncio.AbstractEventLoop) -> bool:
    """True once ``loop`` has begun its last step (``shutdown_asyncgens``); never on uvloop."""
    # The flag asyncio sets when that step begins; no public way to ask.
    return bool(getattr(loop, "_asyncgens_shutdown_called", False))


def started_inside(loop: asyncio.AbstractEventLoop | None) -> bool:
    """Whether this thread is the one running ``loop`` (after a fork: still inside it)."""
    # The thread id asyncio records while a loop runs (after a fork it still says so).
    return getattr(loop, "_thread_id", None) == threading.get_ident()


def kernel_handles(loop: asyncio.AbstractEventLoop | None) -> tuple[set[int], set[int]]:
    """The epoll descriptors and sockets an asyncio selector loop holds.

    Its wake-up socket pair and its own transports' sockets; a descriptor
    other code registered (``add_reader``) is left out. Empty for loops whose
    handles are not visible from Python (uvloop) and closed loops.
    """
    pollers: set[int] = set()
    sockets: set[int] = set()
    if isinstance(loop, selector_events.BaseSelectorEventLoop):
        with contextlib.suppress(Exception):
            _collect(loop, pollers, sockets)
    return pollers, sockets


def _collect(
    loop: selector_events.BaseSelectorEventLoop, pollers: set[int], sockets: set[int]
) -> None:
    # The loop's selector, its wake-up sockets and its transports' callbacks
    # have no public accessor: each read is guarded, and a miss finds nothing.
    selector: Any = getattr(loop, "_selector", None)
    if selector is None:
        return  # closed
    epoll: Any = getattr(selectors, "EpollSelector", ())
    if isinstance(selector, epoll):
        pollers.add(selector.fileno())
    for name in ("_ssock", "_csock"):  # the loop's wake-up socket pair
        wake: socket.socket | None = getattr(loop, name, None)
        if wake is not None and wake.fileno() >= 0:
            sockets.add(wake.fileno())
    # The base class of asyncio's socket transports.
    transport_type: Any = getattr(selector_events, "_SelectorTransport", ())
    for key in selector.get_map().values():
        for handle in key.data or ():
            # The callback a handle will run: a method of the transport that registered it.
            owner = getattr(getattr(handle, "_callback", None), "__self__", None)
            if isinstance(owner, transport_type):
                sockets.add(key.fd)
