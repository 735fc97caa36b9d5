"""One request and its response on a replica connection: ``Conn``, the asyncio Protocol that feeds
httptools' C parser, and ``Exchange``, the response as it arrives (head, body chunks, timers, flow
control). Each body chunk goes from ``data_received`` straight into the exchange's ``on_body``
callback, so a relay can write it to the client without a task switch.

Invariants:
- one exchange at a time per connection (the pool in client.py hands a connection back only after a
  complete response that allows keep-alive, otherwise it is closed);
- an exchange's outcome is signalled through ``error``/``complete`` plus a wake-up future, never
  by exceptions left in futures nobody awaits;
- timeouts: headers (request sent → response headers), idle (longest silence in the body, checked
  lazily: one timer per exchange, not one per chunk); connect is the pool's;
- a response head is at most MAX_HEAD bytes and MAX_HEADERS headers, and collected in linear time.
"""

from __future__ import annotations

import asyncio
import select
import socket
from collections.abc import Callable

import httptools

Origin = tuple[str, int, bool]  # host, port, tls

# A replica's response head (status line, headers, and any 1xx answers before it) may take at most
# MAX_HEAD bytes and MAX_HEADERS header lines, like nginx's proxy_buffer_size: vLLM sends ~200 bytes.
MAX_HEAD = 64 * 1024
MAX_HEADERS = 100
_GONE = select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL
_WATCH = select.POLLIN | _GONE


class UpstreamFailure(Exception):
    """Connecting, sending or receiving failed. ``got_bytes``: the response had begun."""

    def __init__(self, message: str, got_bytes: bool = False) -> None:
        super().__init__(message)
        self.got_bytes = got_bytes


class UpstreamTimeout(UpstreamFailure):
    pass


class ResponseHeadTooLarge(UpstreamFailure):
    """The replica's response head went past MAX_HEAD bytes or MAX_HEADERS headers."""


class ResponseTooLarge(UpstreamFailure):
    """The body went past the limit the caller gave ``read_all`` (``limits.max_response``)."""


class Exchange:
    """One request/response on one connection."""

    __slots__ = (
        "_chunks", "_timer", "_waiter", "complete", "conn", "error", "got_bytes", "head_bytes", "headers",
        "headers_done", "idle", "keep_alive", "last_data", "loop", "on_body", "partial", "status",
    )

    def __init__(self, conn: Conn, loop: asyncio.AbstractEventLoop, headers_timeout: float, idle: float) -> None:
        self.conn = conn
        self.loop = loop
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.got_bytes = False
        self.head_bytes = 0  # bytes of complete (1xx and final) heads fed to the parser
        self.partial: bytearray | None = None  # a head still arriving, not yet fed
        self.error: UpstreamFailure | None = None
        self.idle = idle
        self.last_data = 0.0
        self._chunks: list[bytes] = []
        self.on_body: Callable[[bytes], None] = self._chunks.append
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = loop.call_later(headers_timeout, self._on_timer)

    # -- signals from the connection ---------------------------------------------------------
    def wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def fail(self, error: UpstreamFailure) -> None:
        if self.error is None and not self.complete:
            self.error = error
            self._cancel_timer()
            self.wake()

    def _on_timer(self) -> None:
        self._timer = None
        if self.complete or self.error:
            return
        if not self.headers_done:
            self.fail(UpstreamTimeout("no response headers in time"))
            self.conn.abort()
            return
        if self.conn.paused:  # we stopped reading (slow client): not the replica's silence
            self._timer = self.loop.call_later(self.idle, self._on_timer)
            return
        due = self.last_data + self.idle
        if self.loop.time() >= due:
            self.fail(UpstreamTimeout(f"no data for {self.idle:g}s", got_bytes=True))
            self.conn.abort()
        else:
            self._timer = self.loop.call_at(due, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_complete(self, status: int) -> None:
        self.status = status
        self.headers_done = True
        self.last_data = self.loop.time()
        # the idle timer is armed after this read (Conn.data_received), unless the body came with
        # the head: then no second timer is made at all
        self._cancel_timer()
        self.wake()

    def _arm_idle(self) -> None:
        if self._timer is None and not self.complete and self.error is None:
            self._timer = self.loop.call_at(self.last_data + self.idle, self._on_timer)

    def _message_complete(self, keep_alive: bool) -> None:
        self.complete = True
        self.keep_alive = keep_alive
        self._cancel_timer()
        self.wake()

    # -- for the consumer --------------------------------------------------------------------
    async def wait(self) -> None:
        """Until the next wake-up: headers, completion, an error, or whatever on_body wakes for."""
        if self.error is not None or self.complete:
            return
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def header(self, name: bytes) -> bytes | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    async def read_all(self, limit: int, truncate: bool = False) -> bytes:
        """The whole body, at most ``limit`` bytes. Past that the connection is dropped (at once
        when Content-Length announces it) and ResponseTooLarge is raised, or with ``truncate``
        the first ``limit`` bytes are returned."""
        if not self.complete and self.error is None:  # else the body came with the head
            await self._read_rest(limit, truncate)
        if self.error is not None:
            raise self.error
        data = b"".join(self._chunks)
        if len(data) > limit:
            self.conn.abort()  # never pooled: release() sees a lost connection
            if not truncate:
                self._chunks.clear()
                raise ResponseTooLarge(f"answer over the limit of {limit} bytes", got_bytes=True)
            return data[:limit]
        return data

    async def _read_rest(self, limit: int, truncate: bool) -> None:
        declared = self.header(b"content-length")
        if not truncate and declared is not None and declared.isdigit() and int(declared) > limit:
            self.conn.abort()
            raise ResponseTooLarge(f"answer of {int(declared)} bytes is over the limit of {limit} bytes",
                                   got_bytes=True)
        size = sum(map(len, self._chunks))

        def bounded(data: bytes) -> None:
            nonlocal size
            self._chunks.append(data)
            size += len(data)
            if size > limit:
                self.conn.pause()  # hold no more than one read past the limit
                self.wake()

        self.on_body = bounded
        while not self.complete and self.error is None and size <= limit:
            await self.wait()

    def take_body(self) -> list[bytes]:
        """The list holding the body received so far. It keeps receiving chunks until ``on_body`` is
        replaced, so a consumer that awaits while draining it loses nothing."""
        return self._chunks

    def pause(self) -> None:
        self.conn.pause()

    def resume(self) -> None:
        self.last_data = self.loop.time()
        self.conn.resume()


class _StopParsing(Exception):
    """Raised from a parser callback to stop parsing (a desynchronised connection, a head too large)."""


class Conn(asyncio.Protocol):
    __slots__ = (
        "_feed", "_now", "counted", "ex", "family", "fd", "idle_since", "interim", "lost", "on_idle_lost",
        "origin", "parser", "paused", "poller", "transport",
    )

    def __init__(self, origin: Origin, poller: select.poll, on_idle_lost: Callable[[Conn], None]) -> None:
        self.origin = origin
        self.poller = poller  # the pool's, for stale()
        self.on_idle_lost = on_idle_lost  # the pool's: an idle connection the replica closed
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        # called once per read: looked up once (a compiled method call on a C type looks it up each time)
        self._feed = self.parser.feed_data
        self._now = asyncio.get_running_loop().time
        self.ex: Exchange | None = None
        self.lost = False
        self.paused = False
        self.idle_since = 0.0
        self.counted = True  # holds one of the client's connection slots until closed
        self.interim = False  # inside a 1xx answer
        self.fd = -1
        self.family = 0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # small writes (a request, then nothing until the answer) must not wait for Nagle
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.fd, self.family = sock.fileno(), sock.family

    def data_received(self, data: bytes) -> None:
        ex = self.ex
        if ex is None:  # bytes on an idle connection: the peer is confused; drop it
            self.abort()
            return
        ex.got_bytes = True
        try:
            if ex.headers_done:
                self._feed(data)
            else:
                self._feed_head(ex, data)
                if ex.headers_done:
                    ex._arm_idle()
        except httptools.HttpParserUpgrade:
            ex.fail(UpstreamFailure("replica tried to upgrade the connection", got_bytes=True))
            self.abort()
        except httptools.HttpParserError as e:
            ex.fail(UpstreamFailure(f"malformed HTTP from replica: {e}", got_bytes=True))
            self.abort()

    def _feed_head(self, ex: Exchange, data: bytes) -> None:
        """Until the final head is in, feed the parser whole heads only. httptools joins a header
        split across feeds by repeated concatenation (quadratic: an endless header cost 100% CPU
        and hundreds of MiB), so a head arriving in pieces is collected here, in linear time."""
        if ex.partial is None and not ex.head_bytes and data[9:10] != b"1":
            end = data.find(b"\r\n\r\n")
            if 0 <= end <= MAX_HEAD - 4:  # the usual case: a whole final (not 1xx) head in one read
                self.parser.feed_data(data)
                return
        start = 0
        if ex.partial is not None:
            start = max(len(ex.partial) - 3, 0)  # the blank line may straddle two reads
            ex.partial += data
            if ex.partial.find(b"\r\n\r\n", start) < 0:
                self._check_head(ex, len(ex.partial))
                return
            data, ex.partial = bytes(ex.partial), None
        view, pos = memoryview(data), 0
        while not ex.headers_done:  # more than one head only after 1xx answers
            end = data.find(b"\r\n\r\n", max(start, pos)) + 4
            if end < 4:
                if self._check_head(ex, len(data) - pos):
                    ex.partial = bytearray(view[pos:])
                return
            ex.head_bytes += end - pos
            if not self._check_head(ex, 0):
                return
            self.parser.feed_data(view[pos:end])
            pos = end
            if self.lost:  # a callback failed the exchange (too many headers, desync)
                return
        if pos < len(data):
            self.parser.feed_data(view[pos:])

    def _check_head(self, ex: Exchange, pending: int) -> bool:
        if ex.head_bytes + pending <= MAX_HEAD:
            return True
        ex.fail(ResponseHeadTooLarge(f"response head over {MAX_HEAD} bytes", got_bytes=True))
        self.abort()
        return False

    def stale(self) -> bool:
        """True if this idle connection can no longer carry a request: the replica closed or reset
        it, or wrote to it, after the event loop last looked. Checked (one poll(2) with no wait)
        just before a reuse, so that a request is only written to a live connection."""
        if self.lost or self.transport is None or self.transport.is_closing():
            return True
        if self.fd < 0:
            return False
        poller = self.poller
        poller.register(self.fd, _WATCH)
        try:
            ready = poller.poll(0)
        finally:
            poller.unregister(self.fd)
        if not ready:
            return False
        # TLS may legitimately send records on an idle connection (session tickets); plain HTTP may not
        return bool(ready[0][1] & _GONE) or not self.origin[2]

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        ex = self.ex
        if ex is None:  # an idle pooled connection the replica closed: give its slot back now
            self.on_idle_lost(self)
            return
        if not ex.complete:
            if exc is None and ex.headers_done and ex.header(b"content-length") is None \
                    and b"chunked" not in (ex.header(b"transfer-encoding") or b"").lower():
                ex._message_complete(False)  # a close-delimited body ends with the connection
                return
            why = f"connection lost: {exc}" if exc else "connection closed by replica"
            ex.fail(UpstreamFailure(why, got_bytes=ex.got_bytes))

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self.ex is not None and self.ex.complete:  # bytes after a complete answer: desynchronised
            self.ex.keep_alive = False
            self.abort()
            raise _StopParsing  # nothing more may touch the finished exchange

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self.ex.headers  # type: ignore[union-attr]
        if len(headers) >= MAX_HEADERS:
            self.ex.fail(ResponseHeadTooLarge(f"more than {MAX_HEADERS} response headers",  # type: ignore[union-attr]
                                              got_bytes=True))
            self.abort()
            raise _StopParsing
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (100 Continue, 103 Early Hints): wait for the real one
            self.interim = True
            self.ex.headers.clear()  # type: ignore[union-attr]
            return
        self.ex._headers_complete(status)  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        if self.interim:
            return
        ex: Exchange = self.ex  # type: ignore[assignment]
        ex.last_data = self._now()
        ex.on_body(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.ex._message_complete(self.parser.should_keep_alive())  # type: ignore[union-attr]

    # control
    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.lost = True

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.lost:
            self.paused = False
            self.transport.resume_reading()
