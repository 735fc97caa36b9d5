"""One attempt of a request on one replica, and the relay of its answer to the client.

An :class:`Attempt` lives pending → committed → finished:

- pending: nothing has reached the client. A failure raises :class:`AttemptFailed`; it counts
  against the replica and the request may be retried on another one (never the same one twice).
- committed (``commit()``): the status line is going out. For a stream that is when the replica's
  first complete SSE event with data has arrived (in every relay mode; comments are not data); for
  any other body when the replica's headers are in. A half-open breaker's probe is judged here,
  because a replica that produced a first event is serving again. From now on nothing is retried:
  a failure (``broke()``) costs the client an OpenAI-shaped error event and ``data: [DONE]`` (a
  cut connection for a binary body), gets a stable code in the access log and counts against the
  replica.
- finished (``finish()``, in the caller's ``finally``): the verdict goes to the breaker exactly
  once -- or the grant is given back unjudged when the client went away first -- and the replica's
  in-flight count is released.

Streams are framed by :class:`teraproxy.sse.SSERelay` in every mode: bytes reach the client only
in whole events, so an error event always starts on an event boundary, and the end of a stream is
judged from what the framer saw (``done``), not from the last reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from aiohttp import web
from aiohttp.http import HttpVersion11

from teraproxy import exchange, reply, sse, usage
from teraproxy.breaker import ALLOWED
from teraproxy.errors import GatewayTimeout, ProxyError, ShuttingDown, UpstreamError, error_body

if TYPE_CHECKING:
    from teraproxy.proxy import Ctx
    from teraproxy.upstreams import Replica

log = logging.getLogger("teraproxy")

CLIENT_HIGH_WATER: Final = 256 * 1024  # bytes queued for a client above which its replica is paused
_HEADS = reply.Heads()  # encoded status lines of SSE answers
_DONE = b"data: [DONE]\n\n"
# Access-log codes of streams that broke after the commit point (stable: dashboards key on them).
BROKE_STREAM = "upstream_broke_stream"
BROKE_TIMEOUT = "upstream_timeout"
BROKE_EVENT_TOO_LARGE = "upstream_event_too_large"
CUT_BY_DRAIN = "cut_by_drain"  # shutdown.drain ran out (daemon.py): the gateway's doing, not the replica's


class Cut(exchange.UpstreamFailure):
    """An answer ended by the drain deadline (``Proxy.cut``), not by its replica."""


class AttemptFailed(Exception):
    """One attempt failed before the commit point: count it against the replica, maybe retry."""

    def __init__(self, error: ProxyError | None = None, status: int = 0, body: bytes = b"",
                 final: bool = False) -> None:
        super().__init__(error.message if error else f"HTTP {status}")
        self.error = error
        self.final = final  # another replica would fail the same way: no retry
        self.status = status  # a replica's own 5xx answer, kept for the client if retries run out
        self.body = body


class Attempt:
    """The life of one attempt: its replica, the breaker's grant and its verdict (pending until
    ``commit``, finished at ``finish``; the context's ``committed`` says which side of the commit point)."""

    __slots__ = ("ctx", "grant", "ok", "replica")

    def __init__(self, ctx: Ctx, replica: Replica, grant: int) -> None:
        self.ctx = ctx
        self.replica = replica
        self.grant = grant  # what the replica's breaker granted (ALLOWED, or a half-open trial's probe grant)
        self.ok: bool | None = None  # the verdict; None: none yet (or the client left first)
        ctx.attempts += 1
        ctx.replica = replica.url
        replica.in_flight += 1
        replica.requests += 1

    def commit(self) -> None:
        """The response is committed to the client: no other answer is possible any more."""
        self.ctx.committed = True
        self.ctx.ttfb = time.monotonic() - self.ctx.t0
        self.replica.record(True, self.grant)  # a half-open probe is judged at the commit
        self.grant = ALLOWED  # from now on this request is an ordinary one

    def failed(self, e: AttemptFailed) -> None:
        """Before the commit point: the caller may retry elsewhere."""
        self.ok = False
        log.warning("replica %s failed for %s (attempt %d): %s", self.replica.url, self.ctx.rid,
                    self.ctx.attempts, e)

    def broke(self, code: str, why: str) -> None:
        """After the commit point: the answer the client got is incomplete."""
        self.ok = False
        self.ctx.error = code
        self.ctx.broken = True
        log.warning("%s: %s for %s", self.replica.url, why, self.ctx.rid)

    def answered(self) -> None:
        """The attempt produced the client's answer (a replica's 4xx included): a success unless
        it broke."""
        if self.ok is None:
            self.ok = True

    def finish(self) -> None:
        replica = self.replica
        replica.in_flight -= 1
        if self.ok is None:
            replica.release(self.grant)
        else:
            replica.record(self.ok, self.grant)
            if not self.ok:
                replica.failures += 1


def error_class(e: exchange.UpstreamFailure) -> type[ProxyError]:
    return GatewayTimeout if isinstance(e, exchange.UpstreamTimeout) else UpstreamError


def failed(replica: Replica, what: str, e: exchange.UpstreamFailure) -> AttemptFailed:
    """A failed attempt that counts against the replica: 504 for a timeout, 502 for anything else.
    An answer over limits.max_response is not retried: the size comes from the request (n, max_tokens,
    logprobs), so another replica would spend a whole generation to fail the same way."""
    if isinstance(e, exchange.ResponseTooLarge):
        return AttemptFailed(UpstreamError(f"Replica {replica.url} {what}: {e}", code="response_too_large"),
                             final=True)
    return AttemptFailed(error_class(e)(f"Replica {replica.url} {what}: {e}"))


class KeepAlive:
    """timeouts.first_event_keepalive: while a streamed request has no event yet, the status line goes
    out after ``every`` seconds and an SSE comment every ``every`` seconds after it, so a load balancer
    in front does not cut a connection that waits for a cold replica. No event has gone out, so a
    replica that fails before its first event is still retried elsewhere; the stream's headers are
    the ones it would have had. ``stop()`` hands the response over (None if nothing was sent yet)."""

    def __init__(self, request: web.Request, ctx: Ctx, every: float) -> None:
        self.request, self.ctx, self.every = request, ctx, every
        self.resp: web.StreamResponse | None = None
        self.busy = self.stopped = False
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"keepalive:{ctx.rid}")

    async def _run(self) -> None:
        while not self.stopped:
            await asyncio.sleep(self.every)
            self.busy = True  # a write in progress is finished, never cancelled halfway
            try:
                if self.resp is None:
                    self.resp = stream_response(self.ctx.rid)
                    await _prepare(self.request, self.resp, self.ctx)
                    self.ctx.committed = True  # the status line is out: no other status is possible
                await self.resp.write(b": keep-alive\n\n")
            except ConnectionError:
                return
            finally:
                self.busy = False

    async def stop(self) -> web.StreamResponse | None:
        self.stopped = True
        if not self.busy:
            self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        return self.resp


def stream_response(rid: str) -> web.StreamResponse:
    return web.StreamResponse(status=200, headers={
        "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no", "Server": "teraproxy", "X-Request-ID": rid})


async def end_early(resp: web.StreamResponse, ctx: Ctx, body: bytes) -> web.StreamResponse:
    """The keep-alives sent the status line, then no replica answered: an error event and [DONE]."""
    ctx.broken = True
    with contextlib.suppress(ConnectionError):
        await resp.write(b"data: " + body + b"\n\n" + _DONE)
        await resp.write_eof()
    return resp


async def stream(request: web.Request, att: Attempt, ex: exchange.Exchange, emit: str) -> web.StreamResponse:
    """An SSE answer, framed in every mode; committed at the first complete event with data."""
    ctx = att.ctx
    relay = sse.SSERelay(emit, ctx.snap.config.limits.max_event)
    feed: Callable[[bytes], bytes] = relay.feed
    tap = ctx.tap = None if ctx.tap_strip is None else usage.UsageTap(ctx.tap_strip)  # fresh per attempt
    if tap is not None:
        feed = _tapped(relay.feed, tap)
    pending: list[bytes] = []

    def before_commit(data: bytes) -> None:
        out = feed(data)
        if out:
            pending.append(out)
        if relay.started or relay.oversize:
            ex.wake()

    for early in ex.take_body():  # body bytes that came in with the headers
        before_commit(early)
    ex.on_body = before_commit
    await _first_event(att, ex, relay, tap, pending)
    kept = await ctx.keepalive.stop() if ctx.keepalive is not None else None
    head, keep_alive = (b"", False) if kept is not None else reply.stream_head(_HEADS, request, ctx.rid, ctx.decision)
    att.commit()  # the commit point: the head goes out with the first event, in one write (_pump)

    def too_large() -> None:  # the framer let the oversize event go: end the exchange
        if relay.oversize and ex.error is None:
            ex.fail(exchange.UpstreamFailure(f"event over limits.max_event ({relay.max_event} bytes)",
                                             got_bytes=True))
            ex.conn.abort()

    sink = await _pump(request, kept, att, ex, feed, too_large, pending, head)
    if sink.transport.is_closing():  # the client left (or stalled): not the replica's fault
        ctx.client_gone = True
        return kept or reply.Sent(200, False)  # no end: nobody is there to read it
    if ex.error is None:
        out = relay.flush()  # an incomplete last frame is dropped, never sent
        sink.write(out if tap is None else tap.feed(out) + tap.flush())
    if not relay.done:  # whatever happened after a [DONE], the answer was whole
        _broke(att, sink, relay, ex.error)
    ctx.frames_rewritten = relay.rewritten
    ctx.bad_frames = relay.bad_frames
    if relay.bad_frames:
        log.warning("replica %s sent %d frame(s) with a reasoning field that are not valid JSON; "
                    "passed through unchanged (%s)", att.replica.url, relay.bad_frames, ctx.rid)
    if kept is not None:
        await kept.write_eof()
        return kept
    sink.end()
    # a slow reader still holds the tail: the request stays active (a drain waits for it) until it
    # is taken, as aiohttp's write_eof waited, but only for timeouts.client_stall
    if sink.transport.get_write_buffer_size() and not await _client_took(request, sink.transport, ctx):
        ctx.client_gone = True
        return reply.Sent(200, False)
    return reply.Sent(200, keep_alive)

async def _first_event(att: Attempt, ex: exchange.Exchange, relay: sse.SSERelay, tap: usage.UsageTap | None,
                       pending: list[bytes]) -> None:
    """Pending: wait for the first complete event with data; any failure is retryable."""
    url = att.replica.url
    while not relay.started:
        if relay.oversize:
            raise AttemptFailed(UpstreamError(
                f"Replica {url} sent more than limits.max_event ({relay.max_event} bytes) before its "
                "first event."))
        if ex.error is not None:
            raise failed(att.replica, "failed before its first event", ex.error)
        if ex.complete:
            out = relay.flush()  # EOF can complete a first event (one ending in a CR blank line)
            if relay.started:
                pending.append(out if tap is None else tap.feed(out) + tap.flush())
                return
            raise AttemptFailed(UpstreamError(f"Replica {url} closed the stream before its first event."))
        await ex.wait()

def _broke(att: Attempt, sink: _Sink, relay: sse.SSERelay, error: exchange.UpstreamFailure | None) -> None:
    """The stream ended without its [DONE]: tell the client in an error event of its own."""
    err: type[ProxyError] = UpstreamError
    if isinstance(error, Cut):  # no verdict on the replica: the grant goes back unjudged
        att.ctx.error = CUT_BY_DRAIN
        att.ctx.broken = True
        sink.write(b"data: " + error_body("The gateway is shutting down (its drain time ran out); the answer "
                                          "is incomplete.", ShuttingDown.type, ShuttingDown.code) + b"\n\n" + _DONE)
        return
    if relay.oversize:
        code, why = BROKE_EVENT_TOO_LARGE, f"sent an event over limits.max_event ({relay.max_event} bytes)"
    elif error is None:
        code, why = BROKE_STREAM, "ended the stream without data: [DONE]"
    elif isinstance(error, exchange.UpstreamTimeout):
        code, why, err = BROKE_TIMEOUT, "went silent", GatewayTimeout
    else:
        code, why = BROKE_STREAM, f"broke the stream ({error})"
    att.broke(code, f"replica {why} after the response began")
    sink.write(b"data: " + error_body(
        f"The model replica {why} after the response began; the answer is incomplete.",
        err.type, err.code) + b"\n\n" + _DONE)

async def binary(request: web.Request, att: Attempt, ex: exchange.Exchange,
                headers: dict[str, str]) -> web.StreamResponse:
    """Audio and other non-SSE bodies: committed at the replica's headers, streamed through."""
    resp = web.StreamResponse(status=ex.status, headers=headers)
    await _prepare(request, resp, att.ctx)
    att.commit()
    sink = await _pump(request, resp, att, ex, _same, None, ex.take_body())
    if sink.transport.is_closing():
        att.ctx.client_gone = True
        return resp
    if ex.error is not None:
        code = BROKE_TIMEOUT if isinstance(ex.error, exchange.UpstreamTimeout) else BROKE_STREAM
        att.broke(code, f"replica broke the body after the response began ({ex.error})")
        # no way to signal an error inside a binary body: cut the connection so the
        # client sees a truncated transfer instead of a silently short file
        if request.transport is not None:
            request.transport.abort()
        return resp
    await resp.write_eof()
    return resp

async def _pump(request: web.Request, resp: web.StreamResponse | None, att: Attempt, ex: exchange.Exchange,
                feed: Callable[[bytes], bytes], on_nothing: Callable[[], None] | None,
                first: list[bytes], head: bytes = b"") -> _Sink:
    """After the commit point: each upstream body chunk goes through ``feed`` and straight
    to the client's transport from the upstream's data callback (no task switch per chunk);
    ``on_nothing`` runs when ``feed`` returns nothing. ``resp`` None: the answer's encoded
    ``head`` (reply.stream_head) goes out with the first bytes, in one write. Returns when the
    upstream answer is complete or failed."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise asyncio.CancelledError  # the client is gone; handler cancellation is on its way
    if resp is None:
        sink = _Sink(transport, request.version >= HttpVersion11)
        chunk = b"".join(first)
        first.clear()
        if sink.start(head, chunk) and not ex.complete:
            ex.pause()  # a slow client already: the loop below waits for it
        request.writer.output_size += len(head) + len(chunk)  # the edge: the answer has begun
    else:
        sink = _Sink(transport, request.writer.chunked)  # type: ignore[attr-defined]
        # The first write goes through aiohttp: it flushes the status line and headers it buffered.
        # ``first`` keeps receiving body chunks while we await, until on_body is replaced below.
        try:
            while True:  # at least once: an empty write still sends the buffered head
                chunk = b"".join(first)
                first.clear()
                await resp.write(chunk)
                if not first:
                    break
        except ConnectionError:
            return sink  # the client went away: the caller sees a closing transport

    def after_commit(data: bytes) -> None:
        out = feed(data)
        if out:
            if sink.write(out):  # (compiled: a direct call, where a bound method goes through its wrapper)
                ex.pause()  # the client reads slower than the replica writes: stop reading
                ex.wake()
        elif on_nothing is not None:
            on_nothing()

    ex.on_body = after_commit
    while not ex.complete and ex.error is None:
        if ex.conn.paused:
            # the client stopped reading: the paused replica is holding a GPU slot for it
            if not await _client_took(request, transport, att.ctx):
                return sink
            ex.resume()
        await ex.wait()
    return sink


async def _client_took(request: web.Request, transport: asyncio.Transport, ctx: Ctx) -> bool:
    """Wait until the client's write buffer drains below aiohttp's high-water mark; False (and the
    connection aborted) if it did not within timeouts.client_stall, or it went away."""
    stall = ctx.snap.config.timeouts.client_stall
    try:
        async with asyncio.timeout(stall):
            await request.writer.drain()
    except TimeoutError:
        log.warning("client stopped reading for %gs; closing %s", stall, ctx.rid)
        transport.abort()
        return False
    except ConnectionError:
        return False  # the client went away while we waited for it
    return not transport.is_closing()


async def _prepare(request: web.Request, resp: web.StreamResponse, ctx: Ctx) -> None:
    """Send the status line and headers (with OpenAI's x-ratelimit-* for a key that has limits)."""
    if ctx.decision is not None:
        resp.headers.update(ctx.decision.headers())
    if request.version < HttpVersion11:
        # an HTTP/1.0 body without a length ends only when the connection closes; a 1.0 client that
        # asked for keep-alive would otherwise wait for the keep-alive timeout (aiohttp keeps it open)
        resp.force_close()
    await resp.prepare(request)


class _Sink:
    """Writes to the client transport, framing HTTP/1.1 chunks itself. Called once per upstream read:
    the transport's methods are looked up once, here, and a chunk's size line comes from a table."""

    __slots__ = ("_buffered", "_closing", "_write", "_writelines", "chunked", "transport")

    def __init__(self, transport: asyncio.Transport, chunked: bool) -> None:
        self.transport = transport
        self.chunked = chunked
        self._write = transport.write
        self._writelines = transport.writelines
        self._buffered = transport.get_write_buffer_size
        self._closing = transport.is_closing

    def start(self, head: bytes, out: bytes) -> bool:
        """The answer's head and its first bytes, in one write; True as ``write``."""
        if not out:
            self._write(head)
        elif self.chunked:
            self._writelines((head, _chunk_size(len(out)), out, b"\r\n"))
        else:
            self._writelines((head, out))
        return self._buffered() > CLIENT_HIGH_WATER

    def end(self) -> None:
        """The end of a chunked body (a body without chunks ends when the connection closes)."""
        if self.chunked and not self._closing():
            self._write(b"0\r\n\r\n")

    def write(self, out: bytes) -> bool:
        """Write ``out``; True when the client's buffer is now over CLIENT_HIGH_WATER (one call per
        upstream read, so it answers both)."""
        if not out or self._closing():
            return False
        if self.chunked:
            self._writelines((_chunk_size(len(out)), out, b"\r\n"))
        else:
            self._write(out)
        return self._buffered() > CLIENT_HIGH_WATER


_TABLE: Final = 4096  # a chunk's size line, encoded in advance for chunks below this (a token's frame is ~250 bytes)
_CHUNK_SIZES: Final = tuple(b"%x\r\n" % n for n in range(_TABLE))


def _chunk_size(n: int) -> bytes:
    return _CHUNK_SIZES[n] if n < _TABLE else b"%x\r\n" % n


def _tapped(feed: Callable[[bytes], bytes], tap: usage.UsageTap) -> Callable[[bytes], bytes]:
    def both(data: bytes) -> bytes:
        return tap.feed(feed(data))
    return both


def _same(data: bytes) -> bytes:
    return data
