"""Reference actors and the broker's actor with other mailboxes, for comparison only.

- :func:`minimal_pairs`: the least any actor can do, as a reference: a task
  on an ``asyncio.Queue`` that hands out and takes back drivers, with no
  timeouts, counters, logging, checks or thread-safe side.
- :class:`QueueMailboxActor`: an ``asyncio.Queue`` mailbox (no thread-safe
  side at all: the best a loop-only design could do).
- :class:`JanusGetActor`: the janus mailbox, with the actor parked in
  ``async_q.get()`` (janus wakes it through its notifier task every time).

The last two keep the actor's message handling unchanged; only receiving differs.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

import janus

from broker import Broker
from broker.actor import Actor
from broker.mailbox import Mailbox
from broker.messages import Message

_BORROW, _RETURN, _STOP = 0, 1, 2


async def _minimal_actor(mailbox: asyncio.Queue[tuple[int, Any]], idle: list[Any]) -> None:
    waiting: deque[asyncio.Future[Any]] = deque()
    get = mailbox.get
    while True:
        kind, item = await get()
        if kind == _BORROW:
            if idle:
                item.set_result(idle.pop())
            else:
                waiting.append(item)
        elif kind == _RETURN:
            if waiting:
                waiting.popleft().set_result(item)
            else:
                idle.append(item)
        else:
            return


async def minimal_pairs(
    drivers: list[Any], concurrency: int, total: int, hold: bool = False
) -> tuple[int, float]:
    """Borrow+release pairs through the minimal actor: (pairs done, seconds).

    With ``hold``, each borrower keeps its driver across one loop iteration.
    """
    loop = asyncio.get_running_loop()
    mailbox: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    actor = loop.create_task(_minimal_actor(mailbox, list(drivers)))
    put = mailbox.put_nowait
    per_worker = total // concurrency
    done = 0

    async def worker() -> None:
        nonlocal done
        for _ in range(per_worker):
            waiter: asyncio.Future[Any] = loop.create_future()
            put((_BORROW, waiter))
            driver = await waiter
            if hold:
                await asyncio.sleep(0)
            put((_RETURN, driver))
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    put((_STOP, None))
    await actor
    return done, seconds


class QueueMailbox(Mailbox[Message]):
    """An ``asyncio.Queue`` mailbox: no thread-safe side at all."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self._shut = False

    def post(self, message: Message) -> bool:
        if self._shut:
            return False
        self._queue.put_nowait(message)
        return True

    def post_threadsafe(self, message: Message) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, message)
        except RuntimeError:
            return False
        return True

    def drain(self, holds_mail: bool = False) -> None:
        while not self._queue.empty():
            self._handle(self._queue.get_nowait())

    async def wait(self) -> None:
        self._handle(await self._queue.get())

    def shut(self) -> list[Message]:
        self._shut = True
        left = []
        while not self._queue.empty():
            left.append(self._queue.get_nowait())
        return left


class JanusGetMailbox(Mailbox[Message]):
    """The janus mailbox, read by ``async_q.get()`` (janus's notifier wakes it each time)."""

    def post(self, message: Message) -> bool:
        try:
            self._inbox.put_nowait(message)
        except janus.AsyncQueueShutDown:
            return False
        return True

    async def wait(self) -> None:
        self._handle(await self._inbox.get())


class QueueMailboxActor(Actor):
    mailbox_class = QueueMailbox


class JanusGetActor(Actor):
    mailbox_class = JanusGetMailbox


class _VariantBroker(Broker):
    actor_class: type[Actor] = Actor

    def _new_actor(self, loop: asyncio.AbstractEventLoop) -> Actor:
        from broker.registry import loop_key

        return self.actor_class(
            self.config, loop, loop_key(), self.driver_factory, self._actor_stopped
        )


class QueueMailboxBroker(_VariantBroker):
    actor_class = QueueMailboxActor


class JanusGetBroker(_VariantBroker):
    actor_class = JanusGetActor
