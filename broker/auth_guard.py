"""Failed logins, remembered broker-wide, so that one stale password cannot lock a user out.

Neo4j locks a user for a while after a few failed logins in a row, and
during the lock it refuses that user everywhere, right password or not.
Every event loop has its own pool, so without a memory shared by the loops
each new loop (``asyncio.run`` per task) would try again, and each try
would count. After a failed login the guard lets one login at a time, for
the whole broker, once its backoff ends (1 s, doubling up to 60 s by
default); the others fail at once with :class:`~broker.errors.AuthBackoff`
without contacting the server. A login that succeeds, other credentials
(``credentials=`` returning a new secret) or ``drain()`` clear it.
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any, Literal

import neo4j.exceptions

from broker.errors import AuthBackoff, UserLocked, describe
from broker.uri import redact_uri

__all__ = ["AuthGuard", "is_auth_failure", "is_lock"]

_LOCKED = "Neo.ClientError.Security.AuthenticationRateLimit"


def is_lock(error: BaseException) -> bool:
    """The server refuses logins of this user for a while (too many failed ones)."""
    return getattr(error, "code", None) == _LOCKED  # a Neo4jError's status code


def is_auth_failure(error: BaseException) -> bool:
    """A login refused for its credentials, or because the server locked the user."""
    if isinstance(error, AuthBackoff):
        return False  # ours: no login was tried
    return isinstance(error, neo4j.exceptions.AuthError) or is_lock(error)


def fingerprint(auth: Any) -> str:
    """Tells credentials apart without keeping or showing them.

    Auth managers (one per driver) cannot be told apart: they count as the
    same credentials, so a failure with one holds back the next one too.
    """
    if isinstance(auth, tuple | neo4j.Auth):
        text = repr(
            auth if isinstance(auth, tuple) else (auth.scheme, auth.principal, auth.credentials)
        )
        return hashlib.sha256(text.encode()).hexdigest()
    return f"manager:{type(auth).__qualname__}"


class AuthGuard:
    """One broker's memory of failed logins; any thread, a brief lock, never held across I/O."""

    def __init__(self, uri: str, username: str, first: float = 1.0, longest: float = 60.0) -> None:
        self._where = f"user {username!r} at {redact_uri(uri)}"
        self._first, self._longest = first, longest
        self._lock = threading.Lock()
        self._failure: BaseException | None = None
        self._failed_with = ""
        self._failed_at = 0.0
        self._backoff = 0.0
        self._retry_at = 0.0
        self._probing = False

    def admit(self, auth: Any) -> Literal["go", "probe"] | AuthBackoff:
        """May a login with ``auth`` be tried now? ``go``, ``probe``, or the error to fail with.

        ``probe`` makes the caller the one login under way after a failure;
        it must log in for real, then call :meth:`succeeded`, :meth:`failed`
        or :meth:`abandoned`.
        """
        with self._lock:
            failure = self._failure
            if failure is None:
                return "go"
            if auth is not None and fingerprint(auth) != self._failed_with:
                self._clear()  # other credentials: try them now
                return "go"
            now = time.monotonic()
            if now >= self._retry_at and not self._probing:
                self._probing = True
                return "probe"
            return self._refusal(failure, max(0.0, self._retry_at - now))

    def succeeded(self) -> None:
        with self._lock:
            self._clear()

    def failed(self, error: BaseException, auth: Any) -> BaseException:
        """A login failed: remember it; the error to report (a lock gets its own)."""
        with self._lock:
            self._backoff = min(max(self._first, self._backoff * 2), self._longest)
            self._failure = error
            self._failed_with = fingerprint(auth) if auth is not None else ""
            self._failed_at = time.monotonic()
            self._retry_at = self._failed_at + self._backoff
            self._probing = False
            if is_lock(error):
                return self._refusal(error, self._backoff)
            return error

    def abandoned(self) -> None:
        """The login under way ended without an answer (cancelled, a network error)."""
        with self._lock:
            self._probing = False

    def clear(self) -> None:
        """Forget every failure (``drain()``, new credentials)."""
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        self._failure = None
        self._backoff = 0.0
        self._probing = False

    def _refusal(self, failure: BaseException, wait: float) -> AuthBackoff:
        if is_lock(failure):
            error: AuthBackoff = UserLocked(
                f"the server locked {self._where} after repeated failed logins: it refuses "
                "every login of that user for a while, from every client, the right password "
                f"too; no login is tried for {wait:.1f} s. Check the password this process "
                "uses (NEO4J_PASSWORD, credentials=) and any other client of that user"
            )
        else:
            error = AuthBackoff(
                f"a login of {self._where} failed {time.monotonic() - self._failed_at:.1f} s "
                f"ago ({describe(failure)}); no login is tried for another {wait:.1f} s, so "
                "that the server does not lock the user. Check the password (NEO4J_PASSWORD, "
                "credentials=); a new one, or drain(), is tried at once"
            )
        error.__cause__ = failure
        return error
