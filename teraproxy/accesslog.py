"""The access log: one JSON line per request, written in batches by a thread of its own.

Going through the logging module cost about a tenth of the proxy's CPU per request (a LogRecord,
caller lookup, a lock, a format and a flush syscall per line). Here a line is one orjson call
and a list append; lines are handed over together at most ``delay`` seconds later or once
64 KiB are pending, like nginx's ``access_log ... buffer= flush=``.

The writes themselves happen on a writer thread, never on the event loop: stdout is often a pipe
(journald, a container runtime) and a blocking write to a pipe nobody drains would stall every
request. (Setting O_NONBLOCK on stdout instead would change the file description the proxy
shares with its parent, e.g. a terminal.) Lines not yet written are bounded by ``max_buffer``
bytes; past it a line is dropped and counted in ``dropped`` (the metric
``teraproxy_access_log_dropped_total``), never lost silently. The loop takes the lock only to
append a batch; the thread never holds it while writing. ``close()`` writes what is left.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from typing import Any, BinaryIO

import orjson

log = logging.getLogger("teraproxy")
_OPTS = orjson.OPT_APPEND_NEWLINE
BATCH = 64 * 1024  # pending bytes that are handed to the writer without waiting for ``delay``


class AccessLog:
    __slots__ = ("_cond", "_dropped", "_handle", "_pending", "_queue", "_queued", "_size", "_stop", "_writer",
                 "delay", "max_buffer", "stream")

    def __init__(self, stream: BinaryIO | None, delay: float = 0.05, max_buffer: int = 4 * 1024 * 1024) -> None:
        self.stream = stream  # None: access logging is off
        self.delay = delay
        self.max_buffer = max_buffer
        self._pending: list[bytes] = []  # the loop's batch, not yet handed over
        self._size = 0
        self._handle: asyncio.TimerHandle | None = None
        self._cond = threading.Condition()  # guards everything below
        self._queue: deque[bytes] = deque()  # batches handed to the writer
        self._queued = 0  # bytes handed over and not yet written
        self._dropped = 0
        self._stop = False
        self._writer: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.stream is not None

    @property
    def dropped(self) -> int:
        """Lines that were never written: the buffer was full, or the stream failed."""
        return self._dropped

    def write(self, entry: dict[str, Any]) -> None:
        line = orjson.dumps(entry, option=_OPTS)
        if self._size + self._queued + len(line) > self.max_buffer:  # the writer is stuck
            with self._cond:
                self._dropped += 1
            if self._dropped == 1:
                log.warning("access log: %d bytes not yet written (is stdout read?); dropping lines, "
                            "counted in teraproxy_access_log_dropped_total", self.max_buffer)
            return
        self._pending.append(line)
        self._size += len(line)
        if self._size >= BATCH:
            self.hand_over()
        elif self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self.delay, self.hand_over)

    def hand_over(self) -> None:
        """Pass the pending lines to the writer thread; never blocks."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if not self._pending or self.stream is None:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._size = 0
        with self._cond:
            self._queue.append(data)
            self._queued += len(data)
            self._cond.notify()
            if self._writer is None:
                self._writer = threading.Thread(target=self._run, name="teraproxy-access-log", daemon=True)
                self._writer.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if not self._queue:
                    return
                data = b"".join(self._queue)
                self._queue.clear()
            stream = self.stream
            try:
                if stream is not None:
                    stream.write(data)
                    stream.flush()
            except (OSError, ValueError):  # a closed stdout must not take requests down with it
                with self._cond:
                    self._dropped += data.count(b"\n")
            with self._cond:
                self._queued -= len(data)
                self._cond.notify_all()

    def flush(self, timeout: float = 5.0) -> bool:
        """Hand everything over and wait until it is written (blocking: for close() and tests).
        False if the writer could not finish within ``timeout``."""
        self.hand_over()
        with self._cond:
            return self._cond.wait_for(lambda: self._queued == 0, timeout)

    def close(self, timeout: float = 5.0) -> None:
        written = self.flush(timeout)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
            if not written:  # the stream is blocked: what is left is lost, and said so
                lost = sum(b.count(b"\n") for b in self._queue)
                self._dropped += lost
                self._queue.clear()
                log.warning("access log: %d line(s) could not be written", self._dropped)
