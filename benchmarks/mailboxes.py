"""The same actor with other mailboxes, for comparison only.

- :class:`QueueMailboxActor`: an ``asyncio.Queue`` mailbox (no thread-safe
  side at all: the best a loop-only design could do).
- :class:`JanusGetActor`: the janus mailbox, with the actor parked in
  ``async_q.get()`` (janus wakes it through its notifier task every time).

Both keep the actor's message handling unchanged; only receiving differs.
"""

from __future__ import annotations

import asyncio
from typing import Any

from broker import Broker
from broker.actor import Actor
from broker.messages import Message


class QueueMailboxActor(Actor):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._queue: asyncio.Queue[Message] = asyncio.Queue()

    def post(self, message: Message) -> bool:
        if self._finished:
            return False
        self._queue.put_nowait(message)
        return True

    def post_threadsafe(self, message: Message) -> bool:
        try:
            self.loop.call_soon_threadsafe(self._queue.put_nowait, message)
        except RuntimeError:
            return False
        return True

    async def _serve(self) -> None:
        while True:
            message = await self._queue.get()
            self._handle(message)
            while not self._queue.empty():
                self._handle(self._queue.get_nowait())
            if self.pool.stopping is not None and self.pool.is_empty():
                return


class JanusGetActor(Actor):
    async def _serve(self) -> None:
        get = self._inbox.get
        while True:
            message = await get()
            self._handle(message)
            self._drain()
            if self.pool.stopping is not None and self.pool.is_empty():
                return


class _VariantBroker(Broker):
    actor_class: type[Actor] = Actor

    def _new_actor(self, loop: asyncio.AbstractEventLoop) -> Actor:
        from broker.registry import loop_key

        return self.actor_class(self.config, loop, loop_key(), self._factory, self._actor_stopped)


class QueueMailboxBroker(_VariantBroker):
    actor_class = QueueMailboxActor


class JanusGetBroker(_VariantBroker):
    actor_class = JanusGetActor
