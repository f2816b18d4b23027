"""Which actor serves which event loop, for one broker.

Loops are the keys, held weakly and compared by identity, never by
``id(loop)``: an id can be reused once a loop is gone, a loop object cannot.
Actors are held weakly too: each loop holds its own actor (through the
actor's maintenance timer), so a loop that is closed or dropped takes its
actor and its entry with it.

A lock guards the mapping while an actor is added, removed or listed. It is
never held across I/O or an ``await`` and never touches pool state. Lookups
of an existing actor (every borrow) take no lock.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import weakref
from collections.abc import Callable

from broker.actor import Actor
from broker.asyncio_internals import shutting_down
from broker.errors import BrokerClosed

__all__ = ["LoopRegistry", "loop_key"]

_loop_numbers = itertools.count(1)


def loop_key() -> str:
    """A readable, process-unique name for the calling thread's new loop."""
    return f"{threading.current_thread().name}/loop-{next(_loop_numbers)}"


class LoopRegistry:
    """The live actors of one broker, one per event loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._actors: weakref.WeakValueDictionary[weakref.ref[asyncio.AbstractEventLoop], Actor] = (
            weakref.WeakValueDictionary()
        )
        # Cancelled actors still closing their drivers, replaced by a new one.
        self._retiring: weakref.WeakSet[Actor] = weakref.WeakSet()
        self._closed = False

    def get(self, loop: asyncio.AbstractEventLoop) -> Actor | None:
        """The loop's running actor, if it has one."""
        actor = self._actors.get(weakref.ref(loop))
        if actor is None or actor.finished or actor.retiring:
            return None
        return actor

    def start(
        self, loop: asyncio.AbstractEventLoop, make: Callable[[asyncio.AbstractEventLoop], Actor]
    ) -> Actor:
        """The loop's actor, made and started if it has none (call in that loop)."""
        with self._lock:
            if self._closed:
                raise BrokerClosed("the broker is closed")
            if shutting_down(loop):
                raise BrokerClosed("this event loop is shutting down; its pool is closed")
            key = weakref.ref(loop)
            actor = self._actors.get(key)
            if actor is None or actor.finished or actor.retiring:
                if actor is not None and not actor.finished:
                    self._retiring.add(actor)  # counted until it has stopped
                actor = make(loop)
                self._actors[key] = actor
                actor.start()
            return actor

    def retire(self, actor: Actor) -> None:
        """Forget a stopped actor (unless a new one serves its loop already)."""
        with self._lock:
            key = weakref.ref(actor.loop)
            if self._actors.get(key) is actor:
                del self._actors[key]
            self._retiring.discard(actor)

    def actors(self) -> list[Actor]:
        """The live actors, at this moment."""
        with self._lock:
            return [a for a in self._actors.values() if not a.finished]

    def entries(self) -> list[Actor]:
        """Every actor still registered, stopping and replaced ones included."""
        with self._lock:
            return [*self._actors.values(), *self._retiring]

    def close(self) -> list[Actor]:
        """Refuse new actors from now on; return the live ones to shut down."""
        with self._lock:
            self._closed = True
            return [a for a in self._actors.values() if not a.finished]

    @property
    def closed(self) -> bool:
        return self._closed

    def forget_all(self) -> list[Actor]:
        """After a fork: forget every actor of the parent without touching it; return them."""
        inherited = [*self._actors.values(), *self._retiring]
        self._lock = threading.Lock()
        self._actors = weakref.WeakValueDictionary()
        self._retiring = weakref.WeakSet()
        return inherited
