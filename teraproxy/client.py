"""A lean HTTP/1.1 client for talking to replicas: asyncio Protocols + httptools' C parser.

Why not aiohttp's ClientSession on this path: per request it builds a ClientRequest, multidicts,
a ClientResponse and timers, and per body chunk it wakes a StreamReader and a task. Profiled
under load that was the largest share of the proxy's CPU. Here a request is one pre-encoded
write, and each body chunk goes from ``data_received`` straight into the exchange's ``on_body``
callback, so a relay can write it to the client without a task switch.

Invariants:
- one exchange at a time per connection; a connection returns to its pool only after a
  complete response that allows keep-alive, otherwise it is closed;
- an exchange's outcome is signalled through ``error``/``complete`` plus a wake-up future, never
  by exceptions left in futures nobody awaits;
- timeouts: connect (on connect), headers (request sent → response headers), idle (longest
  silence in the body, checked lazily: one timer per exchange, not one per chunk);
- a response head is at most MAX_HEAD bytes and MAX_HEADERS headers, and collected in linear time;
- a request is written once: never replayed on another connection (see ``Client.request``);
- the pool is the proxy's own: waiting for a connection raises ``PoolBusy``, never an
  ``UpstreamFailure``, and waiters are served in arrival order (a connection or a slot that
  frees up is handed to the first in line, so nobody can overtake it).
"""

from __future__ import annotations

import asyncio
import select
import socket
import ssl as ssl_mod
from collections import deque
from collections.abc import Callable

import httptools

Origin = tuple[str, int, bool]  # host, port, tls

# A replica's response head (status line, headers, and any 1xx answers before it) may take at most
# MAX_HEAD bytes and MAX_HEADERS header lines, like nginx's proxy_buffer_size: vLLM sends ~200 bytes.
MAX_HEAD = 64 * 1024
MAX_HEADERS = 100
_GONE = select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL
_WATCH = select.POLLIN | _GONE
_JOIN_BODY = 64 * 1024  # a request body smaller than this is copied into the head's write (one syscall)


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


class PoolBusy(Exception):
    """Every one of the client's connections stayed busy for the whole wait. The proxy's own
    congestion, never a replica's fault: nothing was sent."""


class Exchange:
    """One request/response on one connection."""

    __slots__ = (
        "_chunks", "_timer", "_waiter", "complete", "conn", "error", "got_bytes", "head_bytes", "headers",
        "headers_done", "idle", "keep_alive", "last_data", "loop", "on_body", "partial", "status",
    )

    def __init__(self, conn: _Conn, loop: asyncio.AbstractEventLoop, headers_timeout: float, idle: float) -> None:
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
        # the idle timer is armed after this read (_Conn.data_received), unless the body came with
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


class _Conn(asyncio.Protocol):
    __slots__ = (
        "_feed", "_now", "client", "counted", "ex", "family", "fd", "idle_since", "interim", "lost", "origin",
        "parser", "paused", "transport",
    )

    def __init__(self, origin: Origin, client: Client) -> None:
        self.origin = origin
        self.client = client
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
        poller = self.client._poller
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
            self.client._drop_idle(self)
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


class Client:
    """Keep-alive pools per replica origin, with one limit on open connections in all."""

    def __init__(self, limit: int, keepalive: float, connect_timeout: float) -> None:
        self.limit = limit
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.open = 0  # connections open, being opened, or promised to a waiter
        self._idle: dict[Origin, deque[_Conn]] = {}
        # FIFO of (origin, future); the future gets the connection handed over, or None: "a slot is
        # yours, connect". Invariant: while anyone waits there is no idle connection and no free slot.
        self._waiters: deque[tuple[Origin, asyncio.Future[_Conn | None]]] = deque()
        self._ssl: ssl_mod.SSLContext | None = None
        self.contexts: dict[Origin, ssl_mod.SSLContext] = {}  # per https replica (its ca / verify: false)
        self._poller = select.poll()  # for _Conn.stale
        self.closed = False

    def configure(self, limit: int, keepalive: float, connect_timeout: float) -> None:
        """A reload's upstream settings; a raised limit goes to whoever waits for a connection."""
        self.keepalive, self.connect_timeout = keepalive, connect_timeout
        self.limit = limit
        while self.open < self.limit and self._someone_waits():
            self.open += 1
            self._freed()  # hands the new slot to the first live waiter

    async def request(self, origin: Origin, head: bytes, body: bytes, headers_timeout: float,
                      idle: float) -> Exchange:
        """Send one request; returns once response headers are in. Raises PoolBusy (nothing was
        sent) or UpstreamFailure.

        A request is written once and never replayed, not even when a reused keep-alive
        connection fails right after the write: the replica may have read it, and vLLM would run
        a POST twice (it is not idempotent; Go's net/http, likewise, retries a non-replayable
        request only when nothing was written). What makes reuse safe instead is checking a pooled
        connection just before writing (``_Conn.stale``): one the replica closed is dropped and
        another taken, and a request nobody wrote can be sent anywhere. A failure after the write
        goes to the caller, which may try another replica, never this one again."""
        loop = asyncio.get_running_loop()
        conn, _ = await self._acquire(origin, loop)
        ex = self._send(conn, loop, head, body, headers_timeout, idle)
        await self._headers(ex)
        return ex

    def _send(self, conn: _Conn, loop: asyncio.AbstractEventLoop, head: bytes, body: bytes,
              headers_timeout: float, idle: float) -> Exchange:
        ex = Exchange(conn, loop, headers_timeout, idle)
        conn.ex = ex
        assert conn.transport is not None
        if len(body) < _JOIN_BODY:
            conn.transport.write(head + body)
        else:
            conn.transport.write(head)
            conn.transport.write(body)
        return ex

    async def _headers(self, ex: Exchange) -> None:
        """Until the response headers are in; on error or cancellation the exchange is released
        (so a client that goes away closes the upstream connection at once)."""
        try:
            while not ex.headers_done:
                if ex.error is not None:
                    raise ex.error
                await ex.wait()
        except BaseException:
            self.release(ex)
            raise

    def release(self, ex: Exchange) -> None:
        """Done with an exchange: its connection goes back to the pool or is closed."""
        ex._cancel_timer()
        conn = ex.conn
        conn.ex = None
        if ex.complete and ex.keep_alive and not conn.lost and not self.closed and not conn.paused:
            self._reuse(conn, ex.loop.time())
        else:
            self._close(conn)

    def _reuse(self, conn: _Conn, now: float) -> None:
        """A connection free for another request: to the first waiter in line (closed to make room
        if that one waits for another origin), else into the idle pool; closed while a reload's
        lowered limit is exceeded."""
        if self.open > self.limit:
            self._close(conn)
            return
        while self._waiters:
            want, fut = self._waiters.popleft()
            if fut.done():  # gave up (timeout, client gone)
                continue
            if want == conn.origin:
                fut.set_result(conn)
            else:
                self._close(conn, keep_slot=True)  # the slot passes to the waiter
                fut.set_result(None)
            return
        conn.idle_since = now
        idle = self._idle.setdefault(conn.origin, deque())
        idle.append(conn)
        while idle and now - idle[0].idle_since > self.keepalive:  # amortised expiry
            self._close(idle.popleft())

    async def _acquire(self, origin: Origin, loop: asyncio.AbstractEventLoop) -> tuple[_Conn, bool]:
        """A connection to origin and whether it was reused: a pooled one, a new one within the
        limit, or a new one after closing the longest-idle connection to any origin; else wait in
        line, at most connect_timeout in all, then PoolBusy."""
        if not self._someone_waits():  # else queue behind them: nobody overtakes a waiter
            conn = self._take_idle(origin, loop.time())
            if conn is not None:
                return conn, True
            if self.open < self.limit or self._evict_idle():
                self.open += 1
                return await self._dial(origin, loop), False
        deadline = loop.time() + self.connect_timeout
        front = False
        while True:
            got = await self._wait(origin, loop, deadline, front)
            if got is None:  # a slot was handed to us: it is already counted in self.open
                return await self._dial(origin, loop), False
            if not got.stale():
                return got, True
            if got.counted:  # it died in our hands: its slot is still ours
                self._close(got, keep_slot=True)
                return await self._dial(origin, loop), False
            front = True  # it died before we ran and its slot went on: wait again, first in line

    def _someone_waits(self) -> bool:
        q = self._waiters
        while q and q[0][1].done():
            q.popleft()
        return bool(q)

    async def _wait(self, origin: Origin, loop: asyncio.AbstractEventLoop, deadline: float,
                    front: bool) -> _Conn | None:
        fut: asyncio.Future[_Conn | None] = loop.create_future()
        if front:
            self._waiters.appendleft((origin, fut))
        else:
            self._waiters.append((origin, fut))
        try:
            async with asyncio.timeout_at(deadline):
                return await fut
        except BaseException as e:
            if fut.done() and not fut.cancelled():  # handed over in the turn we gave up: pass it on
                got = fut.result()
                if got is None:
                    self._freed()
                elif got.lost:
                    self._close(got)
                else:
                    self._reuse(got, loop.time())
            if isinstance(e, TimeoutError):
                raise PoolBusy(f"all {self.limit} upstream connections busy (upstream.max_connections) "
                               f"for {self.connect_timeout:g}s") from None
            raise

    def _take_idle(self, origin: Origin, now: float) -> _Conn | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()  # most recently used: warmest, least likely to be timed out
            if now - conn.idle_since > self.keepalive or conn.stale():
                self._close(conn)
                continue
            return conn
        return None

    def _evict_idle(self) -> bool:
        """Close the longest-idle pooled connection of any origin, to make room. False if none."""
        oldest: deque[_Conn] | None = None
        for q in self._idle.values():
            if q and (oldest is None or q[0].idle_since < oldest[0].idle_since):
                oldest = q
        if oldest is None:
            return False
        self._close(oldest.popleft())
        return True

    def _drop_idle(self, conn: _Conn) -> None:
        q = self._idle.get(conn.origin)
        if q is not None and conn in q:
            q.remove(conn)
        self._close(conn)

    async def _dial(self, origin: Origin, loop: asyncio.AbstractEventLoop) -> _Conn:
        """A new connection on a slot already counted in ``open``; on failure the slot is freed."""
        host, port, tls = origin
        made: list[_Conn] = []

        def factory() -> _Conn:
            made.append(_Conn(origin, self))
            return made[0]

        try:
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_connection(factory, host, port, ssl=self._tls_context(origin) if tls else None)
        except BaseException as e:
            # the slot goes back exactly once: through the protocol if one was made (its
            # connection_lost may already have closed it), directly otherwise
            if made:
                self._close(made[0])
            else:
                self._freed()
            if isinstance(e, TimeoutError):
                raise UpstreamTimeout(f"connect timed out after {self.connect_timeout:g}s") from None
            if isinstance(e, OSError):
                raise UpstreamFailure(f"cannot connect: {e.strerror or e}") from None
            raise
        return made[0]

    def _tls_context(self, origin: Origin) -> ssl_mod.SSLContext:
        ctx = self.contexts.get(origin)
        if ctx is not None:
            return ctx
        if self._ssl is None:
            self._ssl = ssl_mod.create_default_context()
        return self._ssl

    def _close(self, conn: _Conn, keep_slot: bool = False) -> None:
        if conn.transport is not None and not conn.transport.is_closing():
            conn.transport.close()
        conn.lost = True
        if conn.counted:
            conn.counted = False
            if not keep_slot:
                self._freed()

    def _freed(self) -> None:
        """A slot is free: it goes to the first live waiter (counted for it at once), else back; not
        while a reload's lowered limit is exceeded (then the slot is gone)."""
        while self._waiters and self.open <= self.limit:
            _, fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.open -= 1

    def drop_origin(self, origin: Origin) -> None:
        """Close the pooled connections to an origin no longer in the config (a retired replica)."""
        idle = self._idle.pop(origin, None)
        while idle:
            self._close(idle.pop())

    async def close(self) -> None:
        self.closed = True
        for idle in self._idle.values():
            while idle:
                self._close(idle.pop())
        await asyncio.sleep(0)
