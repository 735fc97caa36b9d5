"""create_app(config) → the API web.Application (and the admin app), with all long-lived
resources in ``cleanup_ctx``: the one upstream ClientSession, the Proxy, the health checker.
What a reload may change lives in the snapshot behind ``app[LIVE]`` (runtime.py); the
``app[RELOADER]`` re-reads the config file and keeps the health checker and proxy in step.

The API app serves only the Tera API; /metrics and /admin/* live on the admin app, which is
bound to ``admin_listen`` and never to the API port.

The API port has one request handler, :class:`Api` (edge.Runner hands it to aiohttp's low-level
``web.Server``): it finds the route itself (a dict lookup on the path, then the method;
``/v1/models/{id}`` by prefix) instead of Application's router and middleware chain, which cost
about a fifth of the proxy's CPU per request. It is also the error ladder (every ProxyError and
every aiohttp HTTPException leaves as OpenAI-shaped JSON, 404/405 included), and keeps the request
id, the access log and the metrics. Nothing may rely on ``request.match_info``/``request.app`` or on
``app.on_response_prepare`` for API requests: a request never meets the router (the app keeps one
catch-all route to the same handler, for runners other than edge.Runner).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import aiohttp
import orjson
from aiohttp import web

from teraproxy import events, tls
from teraproxy.accesslog import AccessLog
from teraproxy.client import Client
from teraproxy.config import Config, load_config
from teraproxy.edge import Edge, Runner, defer_continue
from teraproxy.errors import MethodNotAllowed, NotFound, PayloadTooLarge, ProxyError, echo
from teraproxy.health import HealthChecker
from teraproxy.loadreport import LoadReporter
from teraproxy.metrics import FuncCounter, Metrics
from teraproxy.proxy import CTX, Ctx, Proxy, log, new_request_id
from teraproxy.runtime import Live, Reloader, Snapshot, build, file_sha256
from teraproxy.upstreams import Replica

LIVE = web.AppKey("live", Live)
RELOADER = web.AppKey("reloader", Reloader)
PROXY = web.AppKey("proxy", Proxy)
METRICS = web.AppKey("metrics", Metrics)
ACCESS = web.AppKey("access_log", AccessLog)

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_SERVED = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/audio/speech")


def _error_response(e: ProxyError, ctx: Ctx) -> web.Response:
    headers = {"Server": "teraproxy", "X-Request-ID": ctx.rid, **e.headers}
    if e.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return web.Response(status=e.status, body=e.body(), content_type="application/json", headers=headers)


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> ProxyError:
    if exc.status == 404:
        return NotFound(f"teraproxy does not serve {request.method} {echo(request.path)}: it serves "
                        f"{', '.join(_SERVED)}.", code="unsupported_endpoint")
    if exc.status == 405:
        allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
        return MethodNotAllowed(f"{request.method} is not allowed on {echo(request.path)}"
                                + (f"; use {allowed}." if allowed else "."), headers={"Allow": allowed})
    if exc.status == 413:
        return PayloadTooLarge("Request body is over the configured limit.")
    err = ProxyError(exc.reason or "error")
    err.status = exc.status  # type: ignore[misc]
    return err


_MODEL_PREFIX = "/v1/models/"


class Api:
    """The API port's one handler: route, error ladder, request id, access log and metrics."""

    __slots__ = ("access", "live", "metrics", "model", "routes")

    def __init__(self, app: web.Application, proxy: Proxy) -> None:
        self.live, self.metrics, self.access = app[LIVE], app[METRICS], app[ACCESS]
        self.routes: dict[str, dict[str, _Handler]] = {
            "/v1/chat/completions": {"POST": proxy.chat},
            "/v1/completions": {"POST": proxy.completions},
            "/v1/audio/speech": {"POST": proxy.speech},
            "/v1/models": {"GET": proxy.list_models},
        }
        self.model: dict[str, _Handler] = {"GET": proxy.get_model}  # /v1/models/{id}

    def route(self, request: web.BaseRequest) -> _Handler:
        path = request.path
        methods = self.routes.get(path)
        if methods is None:
            if not path.startswith(_MODEL_PREFIX) or len(path) == len(_MODEL_PREFIX):
                raise NotFound(f"teraproxy does not serve {request.method} {echo(path)}: it serves "
                               f"{', '.join(_SERVED)}.", code="unsupported_endpoint")
            methods = self.model
        handler = methods.get(request.method)
        if handler is None:
            allowed = ", ".join(sorted(methods))
            raise MethodNotAllowed(f"{request.method} is not allowed on {echo(path)}; use {allowed}.",
                                   headers={"Allow": allowed})
        return handler

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        live = self.live
        ctx = Ctx(new_request_id(request.headers.get("X-Request-ID")), live.current)
        live.active += 1
        request[CTX] = ctx
        status = 499  # the client went away before an answer
        try:
            resp = await self._answer(request, ctx)
            status = 499 if ctx.client_gone else resp.status
            if not request.content.is_eof():  # answered before the body came (e.g. 401 to Expect: 100-continue):
                resp.force_close()            # the rest of it cannot be told from a next request
            return resp
        finally:
            live.active -= 1
            self._account(request, ctx, status)

    async def _answer(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
        try:
            resp = await self.route(request)(request)
        except ProxyError as e:
            ctx.error = e.code
            resp = _error_response(e, ctx)
        except web.HTTPException as e:
            pe = _from_http_exception(request, e)
            ctx.error = pe.code
            resp = _error_response(pe, ctx)
        except ConnectionResetError:
            raise  # the client went away mid-answer: logged as 499, nothing to answer
        except Exception:
            log.exception("unexpected error in request %s", ctx.rid)
            ctx.error = "internal_error"
            if ctx.committed:
                raise  # the answer has begun: aiohttp closes the connection, the client sees a cut
            resp = _error_response(ProxyError("Internal error in the gateway; it has been logged."), ctx)
        if ctx.decision is not None and not resp.prepared:  # OpenAI's x-ratelimit-* on every answer
            resp.headers.update(ctx.decision.headers())      # (the prepared ones got theirs already)
        return resp

    def _account(self, request: web.Request, ctx: Ctx, status: int) -> None:
        elapsed = time.monotonic() - ctx.t0
        metrics = self.metrics
        metrics.request(ctx.model, status, elapsed, ctx.ttfb, ctx.attempts, ctx.frames_rewritten, ctx.bad_frames)
        u = ctx.usage
        if u is not None:
            metrics.tokens(ctx.model, ctx.key, u.prompt, u.completion)
        if ctx.limited is not None:
            metrics.rate_limited(ctx.key, ctx.limited)
        if ctx.broken:
            metrics.stream_broken(ctx.model, ctx.replica)
        if ctx.queued is not None:
            metrics.queue_wait(ctx.model, ctx.queued)
        alog = self.access
        if alog.stream is not None:
            # int(x * 100_000 + 0.5) / 100: x seconds as ms to 2 places, a third of round(x * 1000, 2)'s cost
            alog.write({
                "ts": int(time.time() * 1000) / 1000, "rid": ctx.rid, "method": request.method,
                "path": echo(request.path), "status": status, "model": ctx.model, "key": ctx.key,
                "stream": ctx.stream, "replica": ctx.replica, "attempts": ctx.attempts,
                "ttfb_ms": None if ctx.ttfb is None else int(ctx.ttfb * 100_000 + 0.5) / 100,
                "ms": int(elapsed * 100_000 + 0.5) / 100, "error": ctx.error,
                "queue_ms": None if ctx.queued is None else int(ctx.queued * 100_000 + 0.5) / 100,
                "rewritten": ctx.frames_rewritten, "bad_frames": ctx.bad_frames,
                "prompt_tokens": None if u is None else u.prompt,
                "completion_tokens": None if u is None else u.completion,
                "tokens_estimated": u is not None and u.estimated,
                "peer": request.remote})


API = web.AppKey("api", Api)


def create_app(config: Config, path: str | None = None) -> web.Application:
    """The API app for ``config``; ``path`` is the file it came from, which a reload re-reads."""
    # limits.max_body may change on reload: the proxy checks it itself (it never calls request.read())
    app = web.Application(client_max_size=config.limits.max_body)
    live = app[LIVE] = Live(build(config, file_sha256(path) if path else ""))
    app[RELOADER] = Reloader(live, path)
    app[METRICS] = Metrics(live)
    alog = app[ACCESS] = AccessLog(sys.stdout.buffer if config.log.access_log else None,
                                   max_buffer=config.log.access_log_buffer)
    app[METRICS].registry.register(FuncCounter("teraproxy_access_log_dropped",
                                               "Access-log lines dropped: stdout was not read fast enough",
                                               lambda: alog.dropped))
    # built here, not in cleanup_ctx: neither needs a running loop, and the routes bind its methods
    upstream = Client(config.upstream.max_connections, config.upstream.keepalive, config.timeouts.connect)
    proxy = app[PROXY] = Proxy(live, upstream)
    app.cleanup_ctx.append(_resources)
    api = app[API] = Api(app, proxy)
    # edge.Runner calls ``api`` itself; this route is for any other runner (tests, adev)
    app.router.add_route("*", "/{tail:.*}", api.__call__, expect_handler=defer_continue)
    return app


async def _resources(app: web.Application) -> AsyncIterator[None]:
    live, reloader, proxy = app[LIVE], app[RELOADER], app[PROXY]
    config = live.current.config
    connector = aiohttp.TCPConnector(limit=64, keepalive_timeout=config.upstream.keepalive, ttl_dns_cache=60)
    # health checks are a few requests a second: aiohttp's client is fine there
    async with aiohttp.ClientSession(connector=connector, trust_env=False, cookie_jar=aiohttp.DummyCookieJar(),
                                     skip_auto_headers=("User-Agent",)) as session:
        checker = HealthChecker(config, session)
        checker.tls = proxy.client.contexts  # the same contexts: a replica's ca / verify apply to its checks
        checker.sync(live.current.replicas)
        _replica_tls(proxy, live.current)
        reporter = LoadReporter(config.load, live.current.replicas, session)
        reporter.start()

        def swapped(snap: Snapshot) -> None:
            cfg = snap.config
            checker.configure(cfg)
            checker.sync(snap.replicas)
            _replica_tls(proxy, snap)
            reporter.configure(cfg.load, snap.replicas)
            proxy.configure(snap)
            proxy.client.configure(cfg.upstream.max_connections, cfg.upstream.keepalive, cfg.timeouts.connect)
            app[ACCESS].max_buffer = cfg.log.access_log_buffer
            logging.getLogger().setLevel(cfg.log.level.upper())

        def retired(r: Replica) -> None:
            checker.unwatch(r)
            reporter.unwatch(r)
            if all(x.origin != r.origin for x in live.current.replicas):  # not shared with a live one
                proxy.client.drop_origin(r.origin)

        reloader.on_swap.append(swapped)
        reloader.on_retired.append(retired)
        watcher = asyncio.get_running_loop().create_task(events.watch_replicas(live, live.events),
                                                         name="events:replicas")
        try:
            yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await reloader.close()
            await reporter.stop()
            await checker.stop()
            await proxy.client.close()
            if live.current.limits is not None:
                await live.current.limits.limiter.close()
            app[ACCESS].close()
    # let the connector's transports close before the loop goes away
    await asyncio.sleep(0)


def _replica_tls(proxy: Proxy, snap: Snapshot) -> None:
    """TLS contexts for the https replicas (their ca, or verify: false), used by the upstream client."""
    for r in snap.replicas:
        if r.origin[2]:
            proxy.client.contexts[r.origin] = tls.client_context(r.cfg)


def create_admin_app(api: web.Application) -> web.Application:
    admin = web.Application()
    live, reloader = api[LIVE], api[RELOADER]

    def _json(body: object, status: int = 200) -> web.Response:
        return web.Response(status=status, body=orjson.dumps(body, option=orjson.OPT_INDENT_2),
                            content_type="application/json", headers={"Cache-Control": "no-cache"})

    async def upstreams(request: web.Request) -> web.Response:
        table = live.current.table
        return _json({"models": [{"id": p.id, "policy": "affinity" if p.affinity else "least",
                                  "replicas": [r.snapshot(p.id) for r in p.replicas]} for p in table.values()]})

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        if live.ready():
            return web.Response(text="ready\n")
        why = "draining" if live.draining else "a model has no replica up"
        return web.Response(status=503, text=f"not ready: {why}\n")

    async def config(request: web.Request) -> web.Response:
        snap = live.current
        return _json({"path": reloader.path, "sha256": snap.sha256, "loaded_at": snap.loaded_at,
                      "reloads": live.reloads, "reload_failures": live.reload_failures,
                      "last_reload_error": live.last_error, "draining": live.draining,
                      "models": list(snap.table), "retiring": [r.url for r in live.retiring.values()]})

    async def reload(request: web.Request) -> web.Response:
        problems = reloader.reload()
        if problems:
            return _json({"ok": False, "problems": problems}, status=422)
        return _json({"ok": True, "sha256": live.current.sha256})

    async def watch(request: web.Request) -> web.StreamResponse:
        return await events.handler(request, live, live.events)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=api[METRICS].render(), content_type="text/plain",
                            headers={"Cache-Control": "no-cache"})

    admin.router.add_get("/admin/upstreams", upstreams)
    admin.router.add_get("/admin/config", config)
    admin.router.add_get("/admin/events", watch)
    admin.router.add_post("/admin/reload", reload)
    admin.router.add_get("/metrics", metrics)
    admin.router.add_get("/healthz", healthz)
    admin.router.add_get("/readyz", readyz)
    return admin


async def start_servers(config: Config, path: str | None = None,
                        inherited: Sequence[socket.socket] = ()) -> tuple[web.Application, list[web.AppRunner]]:
    """Set up the API (and admin) runners with the hardened server settings and bind them.

    ``inherited``: listening sockets from systemd's socket activation; the one on admin_listen's
    port serves the admin app, the others the API (a socket-activated port is never bound here).
    Raises OSError naming the address when a port cannot be bound (runners already set up
    are cleaned up first). Callers clean the returned runners up in reverse order.
    """
    app = create_app(config, path)
    ssl_context = _server_tls(app, config)
    admin_port = config.admin_listen.port if config.admin_listen else None
    admin_socks = [s for s in inherited if s.getsockname()[1] == admin_port]
    api_socks = [s for s in inherited if s not in admin_socks]
    runners: list[web.AppRunner] = []
    try:
        # the daemon's drain (daemon.py) waits for requests itself: this is only the last word
        runner = Runner(app, Edge(app[ACCESS], app[METRICS]), app[API], handler_cancellation=True,
                        keepalive_timeout=config.timeouts.keepalive,
                        access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        runners.append(runner)
        for sock in api_socks:
            await web.SockSite(runner, sock, ssl_context=ssl_context).start()
        if not api_socks:
            await _bind(runner, config.listen.host, config.listen.port, "listen", ssl_context,
                        config.listen_reuse_port)
        if config.admin_listen is not None:
            admin = web.AppRunner(create_admin_app(app), access_log=None, keepalive_timeout=15,
                                  shutdown_timeout=1.0)
            await admin.setup()
            runners.append(admin)
            for sock in admin_socks:
                await web.SockSite(admin, sock).start()
            if not admin_socks:
                await _bind(admin, config.admin_listen.host, config.admin_listen.port, "admin_listen")
    except BaseException:
        for r in reversed(runners):
            await r.cleanup()
        raise
    return app, runners


def _server_tls(app: web.Application, config: Config) -> ssl.SSLContext | None:
    """The API listener's TLS context; a reload checks the certificate first, then loads it into it."""
    if config.tls is None:
        return None
    try:
        ctx = tls.server_context(config.tls)
    except (OSError, ssl.SSLError) as e:
        raise OSError(e.errno, tls.check(config)[0] if tls.check(config) else f"tls: {e}") from None
    reloader = app[RELOADER]
    reloader.extra_checks.append(tls.check)

    def renew(snap: Snapshot) -> None:
        if snap.config.tls is not None:
            tls.reload_cert(ctx, snap.config.tls)

    reloader.on_swap.append(renew)
    return ctx


async def _bind(runner: web.AppRunner, host: str, port: int, key: str, ssl_context: ssl.SSLContext | None = None,
                reuse_port: bool = False) -> None:
    try:
        await web.TCPSite(runner, host, port, backlog=4096, ssl_context=ssl_context,
                          reuse_port=reuse_port or None).start()
    except OSError as e:
        why = os.strerror(e.errno).lower() if e.errno else str(e)
        raise OSError(e.errno, f"{key}: cannot listen on {host}:{port}: {why}") from None


def app_factory() -> web.Application:
    """For `adev runserver teraproxy/app.py --app-factory app_factory` (config from TERAPROXY_CONFIG)."""
    return create_app(load_config(os.environ.get("TERAPROXY_CONFIG", "conf/demo.yaml")))
