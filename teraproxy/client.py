"""A lean HTTP/1.1 client for talking to replicas: keep-alive pools of exchange.Conn, one write per
request.

Why not aiohttp's ClientSession on this path: per request it builds a ClientRequest, multidicts,
a ClientResponse and timers, and per body chunk it wakes a StreamReader and a task. Profiled
under load that was the largest share of the proxy's CPU. Here a request is one pre-encoded
write, and each body chunk reaches the relay from the connection's callback (exchange.py).

Invariants:
- a connection returns to its pool only after a complete response that allows keep-alive,
  otherwise it is closed; connect has its own timeout;
- a request is written once: never replayed on another connection (see ``Client.request``);
- the pool is the proxy's own: waiting for a connection raises ``PoolBusy``, never an
  ``UpstreamFailure``, and waiters are served in arrival order (a connection or a slot that
  frees up is handed to the first in line, so nobody can overtake it).
"""

from __future__ import annotations

import asyncio
import select
import ssl as ssl_mod
from collections import deque

from teraproxy.exchange import Conn, Exchange, Origin, UpstreamFailure, UpstreamTimeout

_JOIN_BODY = 64 * 1024  # a request body smaller than this is copied into the head's write (one syscall)


class PoolBusy(Exception):
    """Every one of the client's connections stayed busy for the whole wait. The proxy's own
    congestion, never a replica's fault: nothing was sent."""


class Client:
    """Keep-alive pools per replica origin, with one limit on open connections in all."""

    def __init__(self, limit: int, keepalive: float, connect_timeout: float) -> None:
        self.limit = limit
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.open = 0  # connections open, being opened, or promised to a waiter
        self._idle: dict[Origin, deque[Conn]] = {}
        # FIFO of (origin, future); the future gets the connection handed over, or None: "a slot is
        # yours, connect". Invariant: while anyone waits there is no idle connection and no free slot.
        self._waiters: deque[tuple[Origin, asyncio.Future[Conn | None]]] = deque()
        self._ssl: ssl_mod.SSLContext | None = None
        self.contexts: dict[Origin, ssl_mod.SSLContext] = {}  # per https replica (its ca / verify: false)
        self._poller = select.poll()  # for Conn.stale
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
        connection just before writing (``Conn.stale``): one the replica closed is dropped and
        another taken, and a request nobody wrote can be sent anywhere. A failure after the write
        goes to the caller, which may try another replica, never this one again."""
        loop = asyncio.get_running_loop()
        conn, _ = await self._acquire(origin, loop)
        ex = self._send(conn, loop, head, body, headers_timeout, idle)
        await self._headers(ex)
        return ex

    def _send(self, conn: Conn, loop: asyncio.AbstractEventLoop, head: bytes, body: bytes,
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

    def _reuse(self, conn: Conn, now: float) -> None:
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

    async def _acquire(self, origin: Origin, loop: asyncio.AbstractEventLoop) -> tuple[Conn, bool]:
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
                    front: bool) -> Conn | None:
        fut: asyncio.Future[Conn | None] = loop.create_future()
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

    def _take_idle(self, origin: Origin, now: float) -> Conn | None:
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
        oldest: deque[Conn] | None = None
        for q in self._idle.values():
            if q and (oldest is None or q[0].idle_since < oldest[0].idle_since):
                oldest = q
        if oldest is None:
            return False
        self._close(oldest.popleft())
        return True

    def _drop_idle(self, conn: Conn) -> None:
        q = self._idle.get(conn.origin)
        if q is not None and conn in q:
            q.remove(conn)
        self._close(conn)

    async def _dial(self, origin: Origin, loop: asyncio.AbstractEventLoop) -> Conn:
        """A new connection on a slot already counted in ``open``; on failure the slot is freed."""
        host, port, tls = origin
        made: list[Conn] = []

        def factory() -> Conn:
            made.append(Conn(origin, self._poller, self._drop_idle))
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

    def _close(self, conn: Conn, keep_slot: bool = False) -> None:
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
