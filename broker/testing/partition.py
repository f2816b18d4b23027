"""A network link the kernel can cut and heal, for partition tests (Linux, root).

A network namespace of its own is joined to this one by a veth pair.
Connections to :attr:`Partition.uri` cross the veth into the namespace,
where a forwarder (``python -m broker.testing.faults`` in a child process)
sends them back over the veth to a forwarder here, on this side's veth
address, which passes them on to the target on loopback. Every byte of a
connection so crosses the link twice, each way.

:meth:`Partition.cut` gives both ends of the veth a queue of length zero, so
the kernel drops every packet (a SYN as well as data, with no reset and no
error: a true partition); :meth:`Partition.heal` takes the queues away again
and TCP retransmits what waits. :meth:`Partition.stop` always removes the
namespace, the veth and the child process, even after a failed start.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from typing import Self

from broker.testing.faults import FaultProxy
from broker.testing.service import Service

__all__ = ["Partition", "PartitionUnavailable"]

_instances = itertools.count()


class PartitionUnavailable(RuntimeError):
    """This machine cannot make the namespace and veth (not root, not Linux, no iproute2)."""


def _run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    if done.returncode != 0:
        raise PartitionUnavailable(f"{' '.join(command)}: {done.stderr.strip()}")


class Partition(Service):
    """A cuttable link to ``target_host:target_port``: connect to :attr:`uri`."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        n = next(_instances)
        pid = os.getpid()
        self.namespace = f"broker-cut-{pid}-{n}"
        self._veths = (f"bc{pid}x{n}h", f"bc{pid}x{n}n")
        block = (pid * 8 + n) % 16384  # a /30 of 10.234.0.0/16 for this link
        prefix = f"10.234.{block // 64}."
        self.host_address = f"{prefix}{block % 64 * 4 + 1}"
        self.namespace_address = f"{prefix}{block % 64 * 4 + 2}"
        self.port = 0
        self._proxy: FaultProxy | None = None
        self._forwarder: subprocess.Popen[str] | None = None
        self._made = False
        self._cut = False

    @staticmethod
    def unavailable() -> str | None:
        """Why a partition cannot be made here, or None if it may be."""
        if not sys.platform.startswith("linux"):
            return "network namespaces need Linux"
        if os.geteuid() != 0:
            return "making a network namespace and cutting its link needs root"
        missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
        if missing:
            return f"needs iproute2 ({', '.join(missing)} not found)"
        return None

    @property
    def uri(self) -> str:
        return f"bolt://{self.namespace_address}:{self.port}"

    # -- life ----------------------------------------------------------------

    def start(self) -> Self:
        """Make the namespace, the veth and the forwarders; PartitionUnavailable if not allowed."""
        reason = self.unavailable()
        if reason is not None:
            raise PartitionUnavailable(reason)
        try:
            self._make_link()
            self._proxy = FaultProxy(*self.target, host=self.host_address).start()
            self._start_forwarder(self._proxy.port)
        except BaseException:
            self.stop()
            raise
        return self

    def _make_link(self) -> None:
        here, there = self._veths
        inside = ("ip", "netns", "exec", self.namespace)
        self._made = True
        _run("ip", "netns", "add", self.namespace)
        _run("ip", "link", "add", here, "type", "veth", "peer", "name", there)
        _run("ip", "link", "set", there, "netns", self.namespace)
        _run("ip", "addr", "add", f"{self.host_address}/30", "dev", here)
        _run("ip", "link", "set", here, "up")
        _run(*inside, "ip", "addr", "add", f"{self.namespace_address}/30", "dev", there)
        _run(*inside, "ip", "link", "set", there, "up")
        _run(*inside, "ip", "link", "set", "lo", "up")

    def _start_forwarder(self, back_port: int) -> None:
        forward = [
            "--target",
            f"{self.host_address}:{back_port}",
            "--listen",
            self.namespace_address,
        ]
        self._forwarder = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.namespace,
                sys.executable,
                "-m",
                "broker.testing.faults",
                *forward,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._forwarder.stdout is not None
        line = self._forwarder.stdout.readline()
        if not line.startswith("port "):
            raise PartitionUnavailable(f"the forwarder in {self.namespace} did not start")
        self.port = int(line.split()[1])

    def stop(self) -> None:
        """Remove everything :meth:`start` made, whatever state it is in."""
        try:
            self._stop_forwarder()
        finally:
            try:
                if self._proxy is not None:
                    self._proxy.stop()
                    self._proxy = None
            finally:
                self._remove_link()

    def _stop_forwarder(self) -> None:
        forwarder, self._forwarder = self._forwarder, None
        if forwarder is None:
            return
        try:
            if forwarder.stdin is not None:
                forwarder.stdin.close()  # it stops when its standard input closes
            forwarder.wait(timeout=10)
        except subprocess.TimeoutExpired:
            forwarder.kill()
            forwarder.wait(timeout=10)
        finally:
            if forwarder.stdout is not None:
                forwarder.stdout.close()

    def _remove_link(self) -> None:
        if not self._made:
            return
        self._made = self._cut = False
        # Removing the namespace removes its end of the veth, and so the pair.
        for command in (
            ("ip", "netns", "del", self.namespace),
            ("ip", "link", "del", self._veths[0]),
        ):
            subprocess.run(command, capture_output=True, timeout=10, check=False)

    # -- faults --------------------------------------------------------------

    def cut(self) -> None:
        """Drop every packet both ways, silently, until :meth:`heal`."""
        for command in self._queue_commands("replace"):
            _run(*command, "pfifo", "limit", "0")
        self._cut = True

    def heal(self) -> None:
        """Let packets through again (nothing happens if the link is whole)."""
        if not self._cut:
            return
        for command in self._queue_commands("del"):
            _run(*command)
        self._cut = False

    def _queue_commands(self, verb: str) -> list[tuple[str, ...]]:
        here, there = self._veths
        inside = ("ip", "netns", "exec", self.namespace)
        return [
            ("tc", "qdisc", verb, "dev", here, "root"),
            (*inside, "tc", "qdisc", verb, "dev", there, "root"),
        ]
