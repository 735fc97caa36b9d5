"""The client's edge of the API listener, where aiohttp's own machinery would answer for us:
malformed HTTP, a client that half-closes its socket, ``Expect: 100-continue``, and the
X-Forwarded-* / Forwarded headers that tell a replica who the client is.

Why a RequestHandler subclass (``Protocol``): aiohttp answers a request it cannot parse before any
route, middleware or app code runs (``RequestHandler.data_received`` queues an ``_ErrInfo``, and
``start()`` answers it through ``handle_error`` with a plain-text 400, the framework's Server banner
and an ERROR log line with a traceback), so ``handle_error`` is the one place to shape that answer.
And aiohttp treats the client's EOF as the end of the connection (``eof_received`` returns None,
the transport closes, ``connection_lost`` cancels the handler), which only the protocol can change.

Invariants:
- every answer on the API port is OpenAI-shaped JSON with ``Server: teraproxy``, a malformed request
  included; each is counted (metrics, access log) and logged at most once per ``LOG_EVERY`` seconds;
- a half-close (EOF after a complete request) is not a disconnect: the request is answered, then the
  connection closes. A client that is really gone is found by writing to it: the answer's own bytes
  once it has begun, before that an interim ``102 Processing`` ``PROBE_SOON`` and twice that after
  the EOF, then every ``PROBE_EVERY`` seconds (HTTP/1.1 only; a 1xx may not go to an HTTP/1.0
  client) — the second write to a closed socket fails, aiohttp's
  ``connection_lost`` cancels the handler and with it the replica's request;
- ``100 Continue`` goes out only when the body is about to be read (after the key and size checks).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.helpers import ceil_timeout
from aiohttp.http import HttpVersion11, RawRequestMessage, StreamWriter
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import _PAYLOAD_ACCESS_ERROR, ERROR, RequestHandler, _ErrInfo

from teraproxy.accesslog import AccessLog
from teraproxy.errors import BadHttpRequest, GatewayTimeout, ProxyError
from teraproxy.metrics import Metrics
from teraproxy.reply import Sent

log = logging.getLogger("teraproxy")

LOG_EVERY = 10.0  # seconds between two log lines about malformed requests
PROBE_EVERY = 1.0  # seconds between interim answers to a half-closed client that is still waiting
# The first two probes go out PROBE_SOON and 2 x PROBE_SOON after the EOF (an answer that comes sooner
# gets none): a peer that closed resets the first, so the second one fails and the handler (and with it
# a queued or upstream request) ends within ~0.2 s, not 2 s.
PROBE_SOON = 0.1
MAX_CHAIN = 8192  # bytes of client-supplied X-Forwarded-For / Forwarded kept (the nearest hops win)
_PROBE = b"HTTP/1.1 102 Processing\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Throttle:
    """At most one event per ``every`` seconds passes; the ones in between are counted and the
    count is handed to the next one that passes (pure: the clock is injected)."""

    __slots__ = ("clock", "every", "next_at", "suppressed")

    def __init__(self, every: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self.clock = clock
        self.next_at = -math.inf
        self.suppressed = 0

    def allow(self) -> int | None:
        """None: suppressed. Otherwise the number suppressed since the last one that passed."""
        now = self.clock()
        if now < self.next_at:
            self.suppressed += 1
            return None
        n, self.suppressed = self.suppressed, 0
        self.next_at = now + self.every
        return n


class Edge:
    """What the protocol needs from the app: where malformed requests are counted and logged."""

    __slots__ = ("access", "metrics", "throttle")

    def __init__(self, access: AccessLog, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.access = access
        self.metrics = metrics
        self.throttle = Throttle(LOG_EVERY, clock)

    def bad_request(self, peer: str | None, rid: str, reason: str) -> None:
        suppressed = self.throttle.allow()
        if suppressed is not None:
            more = f" ({suppressed} more since the last such line)" if suppressed else ""
            log.warning("bad HTTP from %s: %s%s", peer or "?", reason, more)
        self.metrics.request(None, 400, 0.0, None, 0, 0, 0)
        if self.access.enabled:  # the keys of app.edge's access-log line (a test keeps them equal)
            self.access.write({
                "ts": int(time.time() * 1000) / 1000, "rid": rid, "method": None, "path": None, "status": 400,
                "model": None, "key": None, "stream": False, "replica": None, "attempts": 0, "ttfb_ms": None,
                "ms": 0.0, "queue_ms": None, "error": BadHttpRequest.code, "rewritten": 0, "bad_frames": 0,
                "prompt_tokens": None,
                "completion_tokens": None, "tokens_estimated": False, "peer": peer})


def _reason(exc: HttpProcessingError) -> str:
    """aiohttp's message without the client's bytes it quotes (a 70 KB header must not come back)."""
    text = (exc.message or type(exc).__name__).split("\n", 1)[0]
    for cut in (": b'", ': b"', ": '"):
        text = text.split(cut, 1)[0]
    if isinstance(exc, LineTooLong):
        text = "a request line or header is too long"
    return text.rstrip(" :.")[:120] or "unparseable request"


class Protocol(RequestHandler):
    """aiohttp's RequestHandler with our answer to malformed HTTP and half-closed clients."""

    __slots__ = ("_answered", "_edge", "_eof", "_probe", "forwarded")

    def __init__(self, manager: web.Server, *, edge: Edge, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._edge = edge
        self._probe: asyncio.TimerHandle | None = None
        self._answered = 0  # answers written; aiohttp's _request_count counts the requests parsed
        self._eof = False  # the client half-closed (or closed: the same thing until a write fails)
        self.forwarded: bytes | None = None  # forwarding() of this connection's peer with no client values

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp: an answer has begun, only a cut is left
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        rid = os.urandom(16).hex()
        err: ProxyError
        if isinstance(exc, HttpProcessingError) and status == 400:
            reason = _reason(exc)
            err = BadHttpRequest(f"Malformed HTTP request: {reason}.")
            self._edge.bad_request(request.remote, rid, reason)
        elif status == 504:  # a handler timed out outside the error ladder (app.edge answers the rest)
            err = GatewayTimeout("The gateway timed out.")
        else:
            if exc is not None and not isinstance(exc, ConnectionError):
                self.log_exception("Error handling request %s", rid, exc_info=exc)
            err = ProxyError("Internal error in the gateway; it has been logged.")
        resp = web.Response(status=err.status, body=err.body(), content_type="application/json",
                            headers={"Server": "teraproxy", "X-Request-ID": rid})
        resp.force_close()
        return resp

    async def finish_response(self, request: Any, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        try:
            if isinstance(resp, Sent) and not self._upgraded:  # written already: nothing to prepare
                return resp, False
            return await super().finish_response(request, resp, start_time)
        finally:
            self._answered += 1

    # -- the request loop ---------------------------------------------------------------------------
    async def start(self) -> None:
        """aiohttp's request loop (RequestHandler.start) with the handler awaited in this task
        instead of a new Task per request: on Python < 3.12 aiohttp cannot start that task eagerly,
        so each request paid for a Task and two more turns of the event loop (it exists to give each
        handler a copy of the context variables, which nothing here sets). Cancelling this task
        (aiohttp's connection_lost, with handler_cancellation) cancels the handler as before. What
        the Task's turns gave for free is kept by hand: a pipelined request behind an answer waits
        one loop turn (or for a full write buffer to drain) first."""
        loop = self._loop
        manager = self._manager
        assert manager is not None and self._request_factory is not None and self._request_handler is not None
        factory, handler, messages = self._request_factory, self._request_handler, self._messages
        me = asyncio.current_task(loop)
        while not self._force_close:
            if not messages:
                try:
                    self._waiter = loop.create_future()
                    await self._waiter
                finally:
                    self._waiter = None
            elif self._answered and not await self._after_answer():
                break
            message, payload = self._take()
            manager.requests_count += 1
            writer = StreamWriter(self, loop)
            request_handler = handler
            if isinstance(message, _ErrInfo):  # a request the parser refused: aiohttp's error answer
                request_handler, message = self._make_error_handler(message), ERROR
            request = factory(message, payload, self, writer, self._task_handler or me)  # type: ignore[arg-type]
            try:
                try:
                    resp, reset = await self._handle_request(
                        request, loop.time() if self._logging_enabled else None, request_handler)
                except ConnectionError:
                    break
                if reset:
                    break
                self._keepalive = bool(resp.keep_alive)
                if not payload.is_eof():
                    await self._linger(payload)
                payload.set_exception(_PAYLOAD_ACCESS_ERROR)
            except Exception as exc:
                self.log_exception("Unhandled exception", exc_info=exc)
                self.force_close()
            except BaseException:  # CancelledError among them
                self.force_close()
                raise
            finally:
                request._task = None  # type: ignore[assignment]  # no reference cycle through a traceback
            if not self._keepalive or self._close or self._force_close:
                break
            close_time = loop.time() + self._keepalive_timeout
            self._next_keepalive_close_time = close_time
            if self._keepalive_handle is None:
                self._keepalive_handle = loop.call_at(close_time, self._process_keepalive)
        if not self._force_close:
            self._task_handler = None
            if self.transport is not None:
                self.transport.close()

    def _take(self) -> Any:
        """The next parsed request (and its payload), reading resumed if the queue had paused it."""
        messages = self._messages
        taken = messages.popleft()
        if self._parser is not None:
            self._parser.message_consumed()
        if self._buffer_paused and len(messages) <= self._msg_queue_resume_size:
            self._resume_reading_if_drained()
        return taken

    async def _after_answer(self) -> bool:
        """A pipelined request right behind an answer: without a Task per request nothing else would
        give the loop back, and one client's burst of quick answers (404s, 401s) would stall every
        other connection for a whole read. And a client that pipelines without reading must not make
        us hold its answers: wait for the write buffer to drain below aiohttp's high-water mark
        first. False: the connection is done."""
        if self._paused:
            try:
                await self._drain_helper()
            except ConnectionError:
                return False
        else:
            await asyncio.sleep(0)
        return not self._force_close

    async def _linger(self, payload: Any) -> None:
        """aiohttp's lingering close: read (and drop) the rest of a body the answer did not need,
        for up to ``lingering_time`` seconds, so the close does not reset the answer; then close."""
        loop = self._loop
        now = loop.time()
        end = now + self._lingering_time
        if not self._force_close and self._lingering_time:
            try:
                while not payload.is_eof() and now < end:
                    async with ceil_timeout(end - now):
                        await payload.readany()
                    now = loop.time()
            except (TimeoutError, asyncio.CancelledError):
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
        if not payload.is_eof() and not self._force_close:
            self.close()

    # -- half-closed clients --------------------------------------------------------------------
    def eof_received(self) -> bool:  # type: ignore[override]  # asyncio.Protocol's contract: True keeps it open
        if self._answered >= self._request_count:
            return False  # idle between requests: the client is done with the connection (aiohttp's way)
        if self.ssl_context is not None:
            return False  # TLS transports cannot stay half-open (asyncio's sslproto ignores True, with a warning)
        if not self._eof:  # uvloop may report the same EOF twice (reading is paused and resumed)
            self._eof = True
            # A request was parsed, but start() may not have handed it to its task yet: decide once it has.
            self._loop.call_soon(self._half_closed)
        return True  # keep our write side open: the client may still be reading

    def _half_closed(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        req = self._current_request
        if (req is not None and not req.content.is_eof()) or not all(p.is_eof() for _, p in self._messages):
            transport.close()  # EOF inside a body: that request can never be complete
            return
        if self._answered >= self._request_count:
            self.force_close()  # answered meanwhile; no further request can come
            return
        if self._messages:  # pipelined requests still queued: the last one ends the connection
            msg, payload = self._messages[-1]
            if isinstance(msg, RawRequestMessage):
                self._messages[-1] = (msg._replace(should_close=True), payload)
        else:
            self.close()  # answer the request in hand, then close
        self._probe = self._loop.call_later(PROBE_SOON, self._probe_peer, PROBE_SOON)

    def _pending_version(self) -> tuple[int, int]:
        req = self._current_request
        if req is not None:
            return tuple(req.version)  # type: ignore[return-value]
        if self._messages and isinstance(msg := self._messages[0][0], RawRequestMessage):
            return tuple(msg.version)  # type: ignore[return-value]
        return (1, 0)

    def _probe_peer(self, then: float = PROBE_EVERY) -> None:
        """Before the answer begins, nothing else would ever be written to a gone client: a 1xx is
        the one thing HTTP lets us send. A closed peer answers it with a reset; the next write fails.
        ``then``: seconds until the next probe."""
        self._probe = None
        transport = self.transport
        if transport is None or transport.is_closing() or self._answered >= self._request_count:
            return
        req = self._current_request
        begun = self._request_in_progress if req is None else req.writer.output_size > 0
        # once the answer has begun, its own bytes find a gone client; a 1xx may not go to HTTP/1.0
        # (checked per probe: a pipelined 1.0 request may follow a 1.1 one)
        if not begun and self._pending_version() >= HttpVersion11:
            transport.write(_PROBE)
        self._probe = self._loop.call_later(then, self._probe_peer)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        super().connection_lost(exc)


class _Server(web.Server):
    """web.Server builds aiohttp's RequestHandler, and aiohttp has no setting for the class."""

    def __init__(self, edge: Edge, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.edge = edge

    def __call__(self) -> RequestHandler:
        return Protocol(self, loop=self._loop, edge=self.edge, **self._kwargs)


class Runner(web.AppRunner):
    """web.AppRunner serving the app through ``Protocol`` and ``handler``: the app's start-up and
    clean-up run as usual, but requests go to ``handler`` directly, not through the app's router and
    middlewares (app.Api routes the few API paths itself)."""

    __slots__ = ("_edge", "_handler")

    def __init__(self, app: web.Application, edge: Edge,
                 handler: Callable[[web.Request], Awaitable[web.StreamResponse]], **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._edge = edge
        self._handler = handler

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # runs the app's start-up, as AppRunner does
        return _Server(self._edge, self._handler, request_factory=plain.request_factory,
                       handler_cancellation=plain.handler_cancellation, loop=plain._loop, **plain._kwargs)


# -- Expect: 100-continue ----------------------------------------------------------------------------
async def defer_continue(request: web.Request) -> None:
    """The routes' expect handler: aiohttp's default sends ``100 Continue`` at once, before the key or
    the size is checked; ours sends nothing, and ``send_continue`` answers when the body is wanted."""


def send_continue(request: web.Request) -> None:
    """Call just before awaiting the body, after the key and the declared size have passed."""
    if request.version >= HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue":
        transport = request.transport
        if transport is not None and request.writer.output_size == 0:
            transport.write(_CONTINUE)


# -- X-Forwarded-For / Forwarded / X-Forwarded-Proto -------------------------------------------------
def forwarding(xff: list[bytes], fwd: list[bytes], peer: str | None, tls: bool) -> bytes:
    """The header block telling a replica who the client is and how it came in.

    X-Forwarded-For and Forwarded (RFC 7239) both get the client's values joined in order (the
    client may send several headers) and our hop appended, so the last element is always the one a
    replica can trust; a client cannot pose as the last hop. X-Forwarded-Proto is ours alone: this
    proxy is the edge, so whatever the client claimed there is replaced. ``tls`` is the listener's
    (the transport's) and nothing else.
    """
    node = peer.encode("latin-1", "replace") if peer else b"unknown"
    proto = b"https" if tls else b"http"
    own = b"for=" + (b'"[' + node + b']"' if 58 in node else node) + b";proto=" + proto  # RFC 7239 §6; 58: ":"
    return b"".join((b"X-Forwarded-For: ", _chain(xff, node) if xff else node,
                     b"\r\nForwarded: ", _chain(fwd, own) if fwd else own,
                     b"\r\nX-Forwarded-Proto: ", proto, b"\r\n"))


def _chain(values: list[bytes], own: bytes) -> bytes:
    """Join the client's header values and ours; beyond MAX_CHAIN bytes the leftmost (farthest,
    least trustworthy) values go first. Bounded so that 128 maximal headers cannot become one 1 MB line."""
    vals = [s for v in values if (s := v.strip(b" \t,"))]
    total = sum(len(v) + 2 for v in vals)
    drop = 0
    while drop < len(vals) and total > MAX_CHAIN:
        total -= len(vals[drop]) + 2
        drop += 1
    return b", ".join([*vals[drop:], own])
