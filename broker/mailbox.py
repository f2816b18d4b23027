"""One loop's mailbox: a janus queue, and how its reader is woken cheaply.

Senders in the loop post on the queue's async side, other threads on its
sync side; only the loop's own thread takes mail out. janus wakes an async
getter through ``call_soon_threadsafe`` and a notifier task on every put,
which costs several loop iterations, so the reader never parks in
``get()``: it drains with ``get_nowait()`` and, when the queue is empty,
parks on a future of its own (the bell).

- A sender in another thread puts on the sync side and rings the bell with
  ``call_soon_threadsafe``.
- A sender in the loop that finds the reader parked drains the mailbox at
  once, on its own stack but in the reader's context: the same handling, in
  the same order, on the same thread, one message at a time.
- Mail posted while mail is being handled (from a hook, a callback, a log
  processor or an eager task) only rings the bell; the drain under way
  reads it next.
- A finalizer never waits for the queue's lock (the collector may run it
  inside that lock, on the loop's thread): it posts through
  ``call_soon_threadsafe``, which takes no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

import janus

__all__ = ["Mailbox"]

T = TypeVar("T")

# janus guards both sides of a queue with one lock, ``_sync_mutex``; a sender
# that finds it taken must not wait for it (see Mailbox.busy). Checked here,
# once, so a janus release that renames it fails at import, not in a finalizer.
if "_sync_mutex" not in janus.Queue.__init__.__code__.co_names:  # pragma: no cover
    raise ImportError("this janus release has no Queue._sync_mutex; broker needs janus 2.x")


class Mailbox(Generic[T]):
    """The mail of one reader in one loop. Make it in that loop.

    ``handle`` is called with each message, on the loop's thread, in the
    ``context`` given; an exception it raises goes to ``failed``.
    ``unread`` answers a message that can never be handled (the mailbox was
    shut down meanwhile). Set :attr:`wake_after_drain` when the reader must
    still wake after a sender drained in its place.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        context: contextvars.Context,
        handle: Callable[[T], None],
        failed: Callable[[BaseException, T], None],
        unread: Callable[[T], None],
    ) -> None:
        self._loop = loop
        self._context = context
        self._handle = handle
        self._failed = failed
        self._unread = unread
        #: The reader decides for itself once a drain in its place is over (it is stopping).
        self.wake_after_drain = False
        self._queue: janus.Queue[T] = janus.Queue()
        self._inbox = self._queue.async_q
        self._outside = self._queue.sync_q
        self._lock = self._queue._sync_mutex  # the one read of janus's private names
        self._bell: asyncio.Future[None] | None = None
        # False only while the reader is parked and nobody drains in its place.
        self._busy = True

    # -- senders ------------------------------------------------------------

    def send(self, message: T, here: asyncio.AbstractEventLoop | None) -> bool:
        """Deliver from any thread (``here``: the caller's running loop). False if never read."""
        if here is self._loop:
            return self.post(message)
        return self.post_threadsafe(message)

    def post(self, message: T) -> bool:
        """Deliver from the loop's own thread; drained at once if the reader is parked.

        False once the mailbox is shut down.
        """
        lock = self._lock  # as busy(), inline: this is every borrow's path
        if not lock.acquire(blocking=False):
            return self.post_soon(message)
        lock.release()
        try:
            self._inbox.put_nowait(message)  # raises unless called in the running loop
        except janus.AsyncQueueShutDown:
            return False
        bell = self._bell
        if bell is not None and not bell.done():
            if self._busy:
                bell.set_result(None)  # inside a drain: it reads this one too
            else:
                self._drain_here()
        return True

    def post_threadsafe(self, message: T) -> bool:
        """Deliver from any thread. False if it can never be read."""
        if self.busy():
            return self.post_soon(message)
        try:
            self._outside.put(message)
        except janus.SyncQueueShutDown:
            return False
        try:
            self._loop.call_soon_threadsafe(self.ring)
        except RuntimeError:  # the loop is closed: nobody will read it
            return False
        return True

    def post_soon(self, message: T) -> bool:
        """Deliver from anywhere, a finalizer included. False if the loop is closed.

        It takes no lock and never blocks: ``call_soon_threadsafe`` only
        appends to a deque and writes a byte to the loop's wake-up socket. The
        loop posts the message on its next iteration.
        """
        try:
            self._loop.call_soon_threadsafe(self._post_later, message)
        except RuntimeError:  # the loop is closed: nobody will read it
            return False
        return True

    def _post_later(self, message: T) -> None:
        if not self.post(message):  # shut down meanwhile
            self._unread(message)

    def busy(self) -> bool:
        """Whether the queue's lock is taken at this moment.

        The collector runs finalizers wherever an allocation triggers it, even
        inside the queue's own critical section; a finalizer that gives a
        driver back would then wait for a lock its own thread holds, for ever.
        So a sender that finds the lock taken (by this thread or, briefly, by
        another) goes the lock-free way of :meth:`post_soon` instead of waiting.
        """
        lock = self._lock
        if lock.acquire(blocking=False):
            lock.release()
            return False
        return True

    def ring(self) -> None:
        """Wake the reader if it is parked."""
        bell = self._bell
        if bell is not None and not bell.done():
            bell.set_result(None)

    # -- the reader ---------------------------------------------------------

    def drain(self, holds_mail: bool = False) -> None:
        """Handle every message there is, in order (on the loop's thread)."""
        inbox = self._inbox
        get, waiting = inbox.get_nowait, inbox.qsize  # only this loop takes mail out
        while holds_mail or waiting():
            holds_mail = False
            try:
                message = get()
            except asyncio.QueueEmpty:  # read meanwhile, by a drain a finalizer started
                return
            try:
                self._handle(message)
            except Exception as exc:  # a bug must not take the whole loop's pool down
                self._failed(exc, message)

    async def wait(self) -> None:
        """Park until mail arrives (a sender in the loop may drain in our place meanwhile)."""
        bell = self._loop.create_future()
        self._bell = bell
        self._busy = False
        try:
            await bell
        finally:
            self._busy = True
            self._bell = None

    def _drain_here(self) -> None:
        """Handle the mail now, on a sender's stack, while the reader is parked."""
        self._busy = True
        try:
            self._context.run(self.drain, True)  # the sender's message at least
        except RuntimeError:
            # The reader's context is entered: a finalizer runs inside the
            # reader's own step, just before it parks. It drains on waking.
            self.ring()
            return
        finally:
            self._busy = False
        if self.wake_after_drain:
            self.ring()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """No drain in the reader's place while this runs (on the loop's thread).

        Mail posted meanwhile (a finalizer giving a driver back) waits for the reader.
        """
        busy, self._busy = self._busy, True
        try:
            yield
        finally:
            self._busy = busy

    @property
    def lock(self) -> object:
        """The queue's lock, which janus holds while it puts or gets (for tests)."""
        return self._lock

    @property
    def parked(self) -> bool:
        """Whether the reader is parked now."""
        return self._bell is not None

    def shut(self) -> list[T]:
        """Refuse new mail; return what is still there, unread."""
        self._queue.shutdown()
        left: list[T] = []
        while True:
            try:
                left.append(self._inbox.get_nowait())
            except (asyncio.QueueEmpty, janus.AsyncQueueShutDown):
                return left

    def pending(self) -> int:
        """How many messages wait to be read."""
        return self._outside.qsize()
