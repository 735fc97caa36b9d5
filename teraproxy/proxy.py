"""The request path: auth → body → route → forward (with retries) → relay → account.

Invariants:
- the body is parsed once; the client's bytes are forwarded unchanged unless the request-side
  reasoning alias must be added;
- a response is committed when its status line goes out: for a stream, once the replica's first
  complete SSE event has arrived; for a non-stream answer, once its body is complete. Before that
  any failure may be retried on another replica (never the same one twice); after it nothing is,
  and a failure costs the client an OpenAI-shaped error event and ``data: [DONE]``;
- the client's Authorization never reaches a replica, a replica's key never reaches a client;
- in-flight counts and breaker probe slots are released in ``finally``, whatever happens
  (including the client going away, which cancels the handler and closes the upstream request).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import time
from collections.abc import Callable
from typing import Any, Final

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from teraproxy import client, edge, exchange, reasoning, relay, reply, usage
from teraproxy.balance import RetryBudget, pick
from teraproxy.breaker import DENIED
from teraproxy.config import KeyConfig
from teraproxy.errors import (
    BadRequest,
    ModelNotFound,
    NoHealthyReplica,
    PayloadTooLarge,
    ProxyError,
    QueueFull,
    RequestTimeout,
    ShuttingDown,
    UpstreamBusy,
    UpstreamError,
    echo,
    normalise_upstream_error,
)
from teraproxy.quota import refusal, stream_usage
from teraproxy.ratelimit import Decision
from teraproxy.relay import Attempt, AttemptFailed, failed
from teraproxy.runtime import Live, Snapshot
from teraproxy.upstreams import ModelPool, Replica

log = logging.getLogger("teraproxy")

# Never forwarded to a replica: hop-by-hop headers (RFC 9110 §7.6.1), framing we rebuild, the
# client's credentials, and OpenAI account headers Tera does not accept. X-Forwarded-For and
# Forwarded are rebuilt by edge.forwarding.
_DROP_REQUEST = frozenset(h.lower().encode() for h in (
    "Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate", "Proxy-Authorization", "TE",
    "Trailer", "Transfer-Encoding", "Upgrade", "Host", "Content-Length", "Content-Encoding",
    "Accept-Encoding", "Authorization", "Cookie", "X-Api-Key", "Api-Key", "OpenAI-Organization",
    "OpenAI-Project", "Expect", "X-Request-ID", "X-Forwarded-Proto", "Content-Type"))
# What _upstream_headers does with a client's header, by its name as sent: the names seen are
# remembered (lower() and two set lookups per header become one dict lookup), up to _KINDS_MAX.
_PASS: Final = 0
_DROP: Final = 1
_XFF: Final = 2
_FORWARDED: Final = 3
_CONNECTION: Final = 4
_KINDS: dict[bytes, int] = {}
_KINDS_MAX: Final = 512  # header names are the client's: the memory they can take is bounded
_NOT_NAMES: Final = frozenset((b"", b"close", b"keep-alive"))  # Connection tokens that name no header we pass


def _forwarded_by(request: web.Request) -> bytes:
    """edge.forwarding() for a request that brought no X-Forwarded-For or Forwarded of its own: the
    same for each request of a connection, so made once per connection (kept on edge.Protocol)."""
    proto = request.protocol
    if not isinstance(proto, edge.Protocol):
        return edge.forwarding([], [], request.remote, request.secure)
    if proto.forwarded is None:
        proto.forwarded = edge.forwarding([], [], request.remote, request.secure)
    return proto.forwarded


def _kind_of(name: bytes) -> int:
    lk = name.lower()
    kind = (_CONNECTION if lk == b"connection" else _DROP if lk in _DROP_REQUEST else _XFF if lk == b"x-forwarded-for"
            else _FORWARDED if lk == b"forwarded" else _PASS)
    if len(_KINDS) < _KINDS_MAX:
        _KINDS[name] = kind
    return kind


# Copied from a replica's answer to the client (everything else is rebuilt or dropped).
_KEEP_RESPONSE = (("Content-Type", b"content-type"), ("Content-Disposition", b"content-disposition"))
_ERROR_BODY_LIMIT = 64 * 1024  # bytes of a replica's error answer read (and normalised) at most


class Ctx:
    """What the access log needs to know about one request."""

    __slots__ = (
        "attempts",
        "bad_frames",
        "broken",
        "client_gone",
        "committed",
        "decision",
        "error",
        "frames_rewritten",
        "keepalive",
        "key",
        "limited",
        "model",
        "priority",
        "queued",
        "replica",
        "rid",
        "snap",
        "stream",
        "t0",
        "tap",
        "tap_strip",
        "ttfb",
        "usage",
    )

    def __init__(self, rid: str, snap: Snapshot) -> None:
        self.rid = rid
        self.snap = snap  # the config and routing table this request runs on, start to end
        self.key: str | None = None
        self.model: str | None = None
        self.replica: str | None = None
        self.attempts = 0
        self.stream = False
        self.t0 = time.monotonic()
        self.ttfb: float | None = None
        self.error: str | None = None
        self.frames_rewritten = 0
        self.bad_frames = 0
        self.committed = False  # the status line went out: no other answer is possible
        self.keepalive: relay.KeepAlive | None = None  # timeouts.first_event_keepalive, until the first event
        self.client_gone = False  # the client disconnected or stalled mid-answer (logged as 499)
        self.broken = False  # the replica broke the answer after the commit point
        self.decision: Decision | None = None  # the key's admission (its x-ratelimit-* headers)
        self.limited: str | None = None  # the limit that refused the request
        self.tap_strip: bool | None = None  # None: no usage tap; else whether it removes the usage chunk
        self.tap: usage.UsageTap | None = None  # the current attempt's
        self.usage: usage.Usage | None = None
        self.priority = "normal"  # the key's admission queue class
        self.queued: float | None = None  # seconds spent in the admission queue, if it waited there


CTX = web.RequestKey("teraproxy_ctx", Ctx)


class Proxy:
    """The handlers of the API routes; every dependency comes in through the constructor."""

    def __init__(self, live: Live, upstream: client.Client, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.live = live
        self.client = upstream
        self.clock = clock
        self.rng = rng or random.Random()
        retry = live.current.config.retry
        self.budget = RetryBudget(retry.budget, retry.window, clock)
        self.created = int(time.time())
        self.heads = reply.Heads()  # encoded status lines of complete answers
        self.exchanges: set[exchange.Exchange] = set()  # upstream answers being read (cut at the end of a drain)
        self.cutting = False

    def cut(self) -> int:
        """The drain time is over: end every answer still coming from a replica. A committed stream gets
        an error event and [DONE]; a request not yet answered gets a 503. Returns how many were cut."""
        self.cutting = True
        cut = list(self.exchanges)
        for ex in cut:
            ex.fail(relay.Cut("the gateway is shutting down"))
            ex.conn.abort()
        return len(cut)

    def configure(self, snap: Snapshot) -> None:
        """A reload's settings for what outlives a snapshot (the retry budget keeps its history)."""
        self.budget.configure(snap.config.retry.budget, snap.config.retry.window)

    # -- entry points ----------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "/v1/chat/completions", "messages")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "/v1/completions", "prompt")

    async def speech(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "/v1/audio/speech", "input")

    async def list_models(self, request: web.Request) -> web.Response:
        key = self._auth(request)
        table = request[CTX].snap.table
        data = [self._model_obj(pool) for m, pool in table.items() if key is None or key.may_use(m)]
        return self._json(request, {"object": "list", "data": data})

    async def get_model(self, request: web.Request) -> web.Response:
        key = self._auth(request)
        mid = request.path[len("/v1/models/"):]  # app.Api routes only non-empty ids here
        if mid not in request[CTX].snap.table or not request[CTX].snap.keys.may_use(key, mid):
            raise ModelNotFound.absent(mid)
        return self._json(request, self._model_obj(request[CTX].snap.table[mid]))

    # -- steps -------------------------------------------------------------------------------
    def _auth(self, request: web.Request) -> KeyConfig | None:
        key = request[CTX].snap.keys.check(request.headers.get("Authorization"))
        if key is not None:
            ctx = request[CTX]
            ctx.key = key.name
            ctx.priority = key.priority
        return key

    def _model_obj(self, pool: ModelPool) -> dict[str, Any]:
        """The card a replica reported (max_model_len, root, ... are what clients size prompts by);
        before any replica answered /v1/models, the configured id."""
        card = pool.card()
        return card if card is not None else {"id": pool.id, "object": "model", "created": self.created,
                                              "owned_by": "teraproxy"}

    def _json(self, request: web.Request, obj: Any) -> web.Response:
        return web.Response(body=orjson.dumps(obj), content_type="application/json",
                            headers={"Server": "teraproxy", "X-Request-ID": request[CTX].rid})

    async def _read_body(self, request: web.Request) -> bytes:
        limits = request[CTX].snap.config.limits
        limit = limits.max_body
        declared = request.content_length
        if declared is not None and declared > limit:
            raise PayloadTooLarge(f"Request body of {declared} bytes is over the limit of {limit} bytes.")
        content = request.content
        if content.is_eof() and content.exception() is None:  # the usual case: the whole body came
            body = content.read_nowait(limit + 1)                 # with the headers; no timer needed
            if len(body) > limit or not content.at_eof():
                raise PayloadTooLarge(f"Request body is over the limit of {limit} bytes.")
            return body
        edge.send_continue(request)  # the key and the declared size passed: now the body is wanted
        try:
            async with asyncio.timeout(limits.body_read):
                body = await content.read(limit + 1)
                while len(body) <= limit and not content.at_eof():
                    body += await content.read(limit + 1 - len(body))
        except TimeoutError:
            raise RequestTimeout("The request body was not received in time.") from None
        except (HttpProcessingError, web.RequestPayloadError) as e:  # e.g. a body its Content-Encoding
            why = getattr(e, "message", None) or str(e)                 # does not match
            raise BadRequest(f"The request body could not be read: {why}", code="invalid_body") from None
        if len(body) > limit:
            raise PayloadTooLarge(f"Request body is over the limit of {limit} bytes.")
        return body

    @staticmethod
    def _parse(body: bytes, required: str) -> dict[str, Any]:
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise BadRequest(f"The request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(payload, dict):
            raise BadRequest("The request body must be a JSON object.", code="invalid_json")
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("'model' is required and must be a string (a HuggingFace model id).",
                             code="invalid_model")
        if required not in payload:
            raise BadRequest(f"'{required}' is a required property.", code="missing_required_parameter")
        if required == "messages" and not isinstance(payload["messages"], list):
            raise BadRequest("'messages' must be an array.", code="invalid_type")
        return payload

    async def _generate(self, request: web.Request, path: str, required: str) -> web.StreamResponse:
        ctx: Ctx = request[CTX]
        key = self._auth(request)
        body = await self._read_body(request)
        payload = self._parse(body, required)
        model: str = payload["model"]
        pool = ctx.snap.table.get(model)
        if pool is None or not ctx.snap.keys.may_use(key, model):
            ctx.model = echo(model)  # the access log gets at most ECHO_MAX characters of it
            raise ModelNotFound.absent(model)
        ctx.model = model
        stream = payload.get("stream") is True
        ctx.stream = stream
        chat = required == "messages"
        quota = ctx.snap.limits
        limits = quota.limits_of(key) if quota is not None else None
        rewrite = (chat and pool.reasoning_in and reasoning.needs_request_rewrite(body)
                   and reasoning.add_request_reasoning(payload))
        if stream and path != "/v1/audio/speech":
            if usage.client_wants_usage(payload):
                ctx.tap_strip = False
            elif quota is not None and quota.wants_usage(limits):
                usage.ask_for_usage(payload)  # removed again from what the client gets
                rewrite = ctx.tap_strip = True
        if rewrite:
            body = orjson.dumps(payload)  # the only cases where the request is re-serialised
        affinity = None
        if pool.affinity:
            user = payload.get("user")
            affinity = request.headers.get("X-Session-ID") or (user if isinstance(user, str) else None)
        headers = self._upstream_headers(request, ctx.rid)
        mode = "bytes" if path == "/v1/audio/speech" else "sse" if stream else "full"
        if quota is not None and limits is not None and key is not None:  # limits: after 401/403, before routing
            decision = await quota.limiter.admit(key.name, limits)
            if not decision.allowed:
                ctx.limited = decision.denied_by
                raise refusal(key.name, decision)
            ctx.decision = decision
        try:
            return await self._kept_alive(request, ctx, pool, path, body, headers, mode, chat, affinity)
        finally:
            if ctx.tap is not None and ctx.usage is None:
                ctx.usage = stream_usage(ctx.tap, body)
            if ctx.decision is not None and quota is not None and key is not None:
                quota.settle(key.name, ctx.decision, ctx.usage)

    @staticmethod
    def _upstream_headers(request: web.Request, rid: str) -> bytes:
        """The client's headers that may reach a replica, plus ours, as an encoded header block."""
        parts: list[bytes] = []
        xff: list[bytes] = []
        fwd: list[bytes] = []
        connection: list[bytes] = []
        for k, v in request.raw_headers:
            kind = _KINDS.get(k)
            if kind is None:
                kind = _kind_of(k)
            if kind == _PASS:
                parts.append(k + b": " + v + b"\r\n")
            elif kind == _XFF:  # every one of them, in order (even if Connection names it)
                xff.append(v)
            elif kind == _FORWARDED:
                fwd.append(v)
            elif kind == _CONNECTION:
                connection.append(v)
        if connection:  # it names more hop-by-hop headers (keep-alive and close need no second look)
            named = {t for v in connection for h in v.split(b",") if (t := h.strip().lower()) not in _NOT_NAMES}
            if named:
                parts = [p for p in parts if p[:p.index(b":")].lower() not in named]
        parts.append(b"X-Request-ID: " + rid.encode("latin-1") + b"\r\n")
        if xff or fwd:
            parts.append(edge.forwarding(xff, fwd, request.remote, request.secure))
        else:  # the usual case: the block depends on the connection only (its peer, whether TLS)
            parts.append(_forwarded_by(request))
        return b"".join(parts)

    # -- attempts ----------------------------------------------------------------------------
    async def _kept_alive(self, request: web.Request, ctx: Ctx, pool: ModelPool, path: str, body: bytes,
                          headers: bytes, mode: str, chat: bool, affinity: str | None) -> web.StreamResponse:
        """_forward, with timeouts.first_event_keepalive for streams: once its keep-alives sent the status
        line, an answer that is not a stream (retries ran out, a replica's 4xx) becomes an error event."""
        every = ctx.snap.config.timeouts.first_event_keepalive
        if mode != "sse" or every <= 0:
            return await self._forward(request, ctx, pool, path, body, headers, mode, chat, affinity)
        ka = ctx.keepalive = relay.KeepAlive(request, ctx, every)
        try:
            resp = await self._forward(request, ctx, pool, path, body, headers, mode, chat, affinity)
        except ProxyError as e:
            early = await ka.stop()
            if early is None:
                raise
            ctx.error = e.code
            return await relay.end_early(early, ctx, e.body())
        except BaseException:
            await ka.stop()
            raise
        early = await ka.stop()
        if early is None or resp is early:
            return resp
        ctx.error = f"replica answered {resp.status}"
        data = resp.body if isinstance(resp, web.Response) and isinstance(resp.body, bytes) else b"{}"
        return await relay.end_early(early, ctx, data)

    async def _forward(self, request: web.Request, ctx: Ctx, pool: ModelPool, path: str, body: bytes,
                       headers: bytes, mode: str, chat: bool, affinity: str | None) -> web.StreamResponse:
        tried: list[Replica] = []
        last: AttemptFailed | None = None
        self.budget.request()
        config = ctx.snap.config
        for attempt in range(config.retry.attempts):
            replica = await self._pick(ctx, pool, tried, affinity, config.breaker.trial_wait)
            if replica is None:
                break
            if attempt and not self.budget.try_retry():
                log.warning("retry budget exhausted; not retrying request %s", ctx.rid)
                break
            tried.append(replica)
            grant = replica.breaker.acquire()
            if grant == DENIED:  # another request took the half-open probe
                continue
            att = Attempt(ctx, replica, grant)
            try:
                resp = await self._attempt(request, att, pool, path, body, headers, mode, chat)
                att.answered()
                return resp
            except AttemptFailed as e:
                if self.cutting:  # the drain's end, not the replica: no verdict, no retry
                    raise ShuttingDown("The gateway is shutting down; the request was not completed.") from None
                att.failed(e)
                last = e
            finally:
                att.finish()
                for q in replica.queues:
                    q.freed()  # the "capacity freed" event: admit the next one waiting (any model it serves)
            if last is not None and last.final:  # this attempt's failure (mypyc cannot break inside try/finally)
                break
        if last is not None:
            if last.error is not None:
                raise last.error
            return self._replica_error(request, last.status, last.body)
        wait = max(1, math.ceil(pool.retry_in(config.health.interval)))
        raise NoHealthyReplica(f"No healthy replica is available for model '{pool.id}'.",
                               headers={"Retry-After": str(wait)})

    async def _pick(self, ctx: Ctx, pool: ModelPool, tried: list[Replica], affinity: str | None,
                    trial_wait: float) -> Replica | None:
        """A replica for the next attempt. When none is available but one is up with its half-open
        trial in flight, wait (up to ``breaker.trial_wait`` in all) for that trial's verdict instead
        of failing at once: with one replica per model, failing would be an outage after the outage.
        A first attempt waits in the model's admission queue while every replica is at its
        max_in_flight, or while others wait there already (no overtaking); a granted slot is taken
        without an await in between, so nobody else can take it."""
        q = pool.queue
        if q is not None and not tried and (q.busy() or pool.saturated()):
            t0 = time.monotonic()
            waited = True
            try:
                await q.wait(ctx.key, ctx.priority)
            except QueueFull:
                waited = False  # turned away at once: it never waited
                raise
            finally:
                if waited:
                    ctx.queued = time.monotonic() - t0
        replica = pick(pool.replicas, tried, self.clock(), self.rng, affinity, model=pool.id)
        deadline: float | None = None
        while replica is None:
            trial = pool.pending_trial(tried)
            if trial is None:
                return None
            now = time.monotonic()
            deadline = deadline or now + trial_wait
            if now >= deadline or not await trial.wait_trial(deadline - now):
                return None
            replica = pick(pool.replicas, tried, self.clock(), self.rng, affinity, model=pool.id)
        return replica

    async def _attempt(self, request: web.Request, att: Attempt, pool: ModelPool, path: str,
                       body: bytes, headers: bytes, mode: str, chat: bool) -> web.StreamResponse:
        replica, ctx = att.replica, att.ctx
        head = replica.heads[path] + headers + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        t = ctx.snap.config.timeouts
        try:
            ex = await self.client.request(replica.origin, head, body,
                                           t.headers if mode == "full" else t.idle, t.idle)
        except exchange.UpstreamFailure as e:
            raise failed(replica, "did not answer", e) from None
        except client.PoolBusy as busy:  # our own congestion: no verdict on the replica, no retry
            raise UpstreamBusy(f"The gateway is busy: {busy}; retry shortly.", headers={"Retry-After": "1"}) from None
        self.exchanges.add(ex)
        try:
            status = ex.status
            if status >= 400:
                data = await self._read(ex, replica, _ERROR_BODY_LIMIT, truncate=True)
                if status == 401 and _is_bare_unauthorized(data):
                    log.error("replica %s REJECTED teraproxy's own credentials (HTTP 401): check "
                              "models[].replicas[].api_key for model %s", replica.url, pool.id)
                    raise AttemptFailed(UpstreamError(
                        f"Replica for model '{pool.id}' rejected the gateway's credentials."))
                if status >= 500:
                    raise AttemptFailed(status=status, body=data)
                ctx.error = f"replica answered {status}"
                return self._replica_error(request, status, data)
            if mode == "full":
                data = await self._read(ex, replica, ctx.snap.config.limits.max_response)
                ctx.usage = usage.from_body(data)
                if chat and pool.emit != "passthrough":
                    data = reasoning.rewrite_message_body(data, pool.emit)
                ctx.ttfb = time.monotonic() - ctx.t0
                return self._complete(request, ctx, ex, status, data)
            if mode == "sse" and (ex.header(b"content-type") or b"").startswith(b"text/event-stream"):
                return await relay.stream(request, att, ex, pool.emit if chat else "passthrough")
            if ctx.keepalive is not None:  # the status line may be out already: only a stream can follow it
                raise AttemptFailed(UpstreamError(f"Replica {replica.url} answered a stream request without "
                                                  "an event stream."))
            return await relay.binary(request, att, ex, self._response_headers(ex, ctx.rid))
        finally:
            self.exchanges.discard(ex)
            self.client.release(ex)  # pooled again after a complete answer, closed otherwise

    def _complete(self, request: web.Request, ctx: Ctx, ex: exchange.Exchange, status: int,
                  data: bytes) -> web.StreamResponse:
        """A complete answer in one write (reply.py), with the replica's Content-Type/-Disposition."""
        if request.transport is None or request.transport.is_closing():
            ctx.client_gone = True
        disposition = ex.header(b"content-disposition")
        extra = b"" if disposition is None else b"Content-Disposition: " + disposition + b"\r\n"
        return reply.send(self.heads, request, status, ctx.rid, data, ex.header(b"content-type"), extra,
                          ctx.decision)

    async def _read(self, ex: exchange.Exchange, replica: Replica, limit: int, truncate: bool = False) -> bytes:
        try:
            return await ex.read_all(limit, truncate)
        except exchange.UpstreamFailure as e:
            raise failed(replica, "broke its answer", e) from None

    def _replica_error(self, request: web.Request, status: int, data: bytes) -> web.Response:
        return web.Response(status=status, body=normalise_upstream_error(status, data),
                            content_type="application/json",
                            headers={"Server": "teraproxy", "X-Request-ID": request[CTX].rid})

    @staticmethod
    def _response_headers(ex: exchange.Exchange, rid: str) -> dict[str, str]:
        out = {"Server": "teraproxy", "X-Request-ID": rid}
        for name, key in _KEEP_RESPONSE:
            v = ex.header(key)
            if v is not None:
                out[name] = v.decode("latin-1")
        return out


def _is_bare_unauthorized(data: bytes) -> bool:
    """vLLM's --api-key middleware answers exactly ``{"error": "Unauthorized"}``."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return isinstance(doc, dict) and isinstance(doc.get("error"), str)


_rid_bits = random.Random(os.urandom(32)).getrandbits  # seeded once; no getrandom(2) per request


def new_request_id(given: str | None) -> str:
    """The client's X-Request-ID when it is sane, else 128 random bits (as uuid4 has; not a counter,
    which would tell clients how many requests the process has served)."""
    if given and len(given) <= 128 and given.isprintable() and given.isascii():
        return given
    return _rid_bits(128).to_bytes(16, "little").hex()  # 32 hex digits (2.5x faster than a format spec)
