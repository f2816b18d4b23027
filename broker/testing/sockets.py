"""Count a process's open TCP connections to a port (Linux ``/proc``).

Tests use it to prove that closing a pool really closed the driver's sockets.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["open_connections"]

# TCP states that still hold a socket open in this process.
_LIVE_STATES = {"01", "02", "03", "04", "05", "08", "09", "0B"}  # established ... closing


def _socket_inodes(pid: int | None) -> set[str]:
    inodes = set()
    fd_dir = Path(f"/proc/{'self' if pid is None else pid}/fd")
    for entry in fd_dir.iterdir():
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def open_connections(port: int, pid: int | None = None) -> int:
    """How many sockets of this process (or of ``pid``) are connected to ``port``."""
    mine = _socket_inodes(pid)
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == port and fields[3] in _LIVE_STATES and fields[9] in mine:
                count += 1
    return count
