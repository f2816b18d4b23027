"""URIs as the broker shows and splits them: never with a secret in view."""

from __future__ import annotations

import urllib.parse

__all__ = ["check_port", "redact_uri", "split_userinfo"]


def redact_uri(uri: str) -> str:
    """The URI without any user or password it may carry.

    Works on the text itself, not on a parse of it: a password holding an
    unencoded ``/``, ``?`` or ``#`` cuts a parsed URI before its ``@``.
    Everything between ``://`` (or the start) and the last ``@`` is hidden,
    so a secret never shows, even if an ``@`` in a query hides more.
    """
    userinfo, at, rest = uri.rpartition("@")
    if not at:
        return uri
    start = userinfo.find("://")
    return (userinfo[: start + 3] if start >= 0 else "") + "***@" + rest


def split_userinfo(uri: str) -> tuple[str, str | None, str | None]:
    """Split ``scheme://user:pass@host`` into the bare URI and its credentials."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri, None, None
    netloc = parts.netloc.rpartition("@")[2]
    bare = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    user = urllib.parse.unquote(parts.username) if parts.username is not None else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    return bare, user, password


def check_port(parts: urllib.parse.SplitResult, shown: str) -> None:
    """A port that is not a number from 1 to 65535 is named as such.

    ``parts`` and ``shown`` are of the redacted URI, so nothing from a
    password can be taken for the port and echoed.
    """
    hostport = parts.netloc.rpartition("@")[2]
    text = hostport.rpartition("]")[2] if hostport.startswith("[") else hostport
    _, colon, port = text.rpartition(":")
    if not colon or not port:
        return
    where = f"in uri {shown!r}"
    if not port.isascii() or not port.isdigit():
        raise ValueError(f"port {port!r} {where} is not a number")
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"port {int(port)} {where} is out of range (1-65535)")
