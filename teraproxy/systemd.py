"""systemd's two process protocols, without a dependency: sd_notify and socket activation.

sd_notify (systemd's sd_notify(3)): newline-separated ``KEY=VALUE`` fields in one datagram to the
AF_UNIX socket named by ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace).
Sending never raises: a daemon must not die because its supervisor's socket went away, so a
failed send is logged once and the notifier keeps trying quietly.

Socket activation (sd_listen_fds(3)): when ``LISTEN_PID`` is this process, ``LISTEN_FDS`` sockets
start at fd 3. The variables are removed once read so that no child process takes them for its own.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import MutableMapping

log = logging.getLogger("teraproxy.systemd")

LISTEN_FDS_START = 3


class Notifier:
    """Sends state changes to the service manager's notify socket."""

    def __init__(self, address: str) -> None:
        # "@name" is the abstract namespace: a leading NUL on the wire
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._warned = False
        self._status = ""

    @classmethod
    def from_env(cls, env: MutableMapping[str, str] | None = None) -> Notifier | None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET")
        if not address or address[0] not in "/@":
            return None
        return cls(address)

    def send(self, *fields: str) -> None:
        try:
            self.sock.sendto("\n".join(fields).encode("utf-8", "replace"), self.address)
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify the service manager at %r: %s", self.address, e.strerror or e)

    def ready(self, status: str) -> None:
        self._status = status
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        # systemd (253+) wants the monotonic time with RELOADING=1 to tell this reload from older ones
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self, status: str) -> None:
        self._status = status
        self.send("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """A short human line; sent only when it changed."""
        if status != self._status:
            self._status = status
            self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def close(self) -> None:
        self.sock.close()


def watchdog_interval(env: MutableMapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when no watchdog is set
    for this process."""
    env = os.environ if env is None else env
    usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2e6


def listen_fds(env: MutableMapping[str, str] | None = None) -> list[socket.socket]:
    """The listening sockets systemd passed to this process (none when not socket-activated)."""
    env = os.environ if env is None else env
    pid, count = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(var, None)
    if not pid or not count or pid != str(os.getpid()) or not count.isdigit():
        return []
    socks = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))  # family and type are read from the fd
    return socks
