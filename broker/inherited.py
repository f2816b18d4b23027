"""What a forked child inherited from its parent's event loops: kept, and cut off.

After ``os.fork()`` the child holds copies of the parent's loops, pools,
drivers and sockets, but the kernel objects behind them are shared with the
parent: each loop's epoll instance and wake-up sockets, and every Bolt
connection. A child that closed, ran or garbage-collected those copies would
remove the parent's wake-up socket from the shared epoll instance, or write
ROLLBACK and RESET onto the parent's connections. So, in the child:

- every inherited loop and pool stays referenced for the child's whole life,
  past interpreter teardown, so nothing ever finalizes them; and
- every kernel handle an inherited asyncio loop knows (its epoll instance,
  its wake-up sockets, its transports' sockets) is pointed at a private
  placeholder in the child's own descriptor table, so nothing the child does
  with those descriptor numbers reaches the parent, and the child no longer
  keeps the parent's connections open.

Loops whose handles are not visible from Python (uvloop) are kept, not cut
off, and so is a loop that the forking thread was running at the time
(the child is still inside it). An inherited loop must never be run in the
child.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
from collections.abc import Iterable
from typing import Any

from broker.asyncio_internals import kernel_handles, started_inside

__all__ = ["detach", "keep"]

_kept: list[Any] = []
_immortal_in: int | None = None  # the process whose _kept outlives interpreter teardown


def keep(objects: Iterable[Any]) -> None:
    """Hold ``objects`` for the rest of this process's life, teardown included."""
    global _immortal_in
    _kept.extend(objects)
    if _immortal_in is None:
        # One reference that is never given back: module teardown then cannot
        # free the list, nor the collector finalize anything it holds.
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.pythonapi.Py_IncRef(ctypes.py_object(_kept))
            _immortal_in = os.getpid()


def detach(loops: Iterable[asyncio.AbstractEventLoop | None]) -> None:
    """Point each inherited loop's kernel handles at private placeholders (in the child)."""
    pollers: set[int] = set()
    sockets: set[int] = set()
    for loop in loops:
        if started_inside(loop):
            continue  # forked from inside this very loop: the child is still running it
        found_pollers, found_sockets = kernel_handles(loop)
        pollers |= found_pollers
        sockets |= found_sockets
    if not pollers and not sockets:
        return
    # A socket whose peer is gone: writes fail (EPIPE), reads see end of file.
    dead, peer = socket.socketpair()
    peer.close()
    poller = select.epoll() if pollers and hasattr(select, "epoll") else None
    try:
        for fd in sockets:
            with contextlib.suppress(OSError):
                os.dup2(dead.fileno(), fd, inheritable=False)
        if poller is not None:
            for fd in pollers:
                with contextlib.suppress(OSError):
                    os.dup2(poller.fileno(), fd, inheritable=False)
    finally:
        dead.close()
        if poller is not None:
            poller.close()
