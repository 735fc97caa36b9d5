"""The daemon's life: bind (or inherit) the listeners, tell systemd when it is ready, reload on SIGHUP,
drain on SIGTERM.

Drain (first SIGTERM or SIGINT): the API listeners close at once (new connections go elsewhere, or
queue in systemd's socket for the next process), /readyz answers 503, idle keep-alive connections
are closed and busy ones close after their answer; requests and streams in flight get up to
``shutdown.drain`` to finish; what is left then is cut cleanly (a stream gets an OpenAI-shaped error
event and ``data: [DONE]``, a request not yet answered a 503), and the process exits 0. A second
SIGTERM or SIGINT exits at once (status 1).

systemd: READY=1 once the listeners are bound and every replica has had its first health check
(or ``health.timeout`` passed), STATUS= when the summary line changes, RELOADING=1 … READY=1
around a reload, STOPPING=1 at the drain, WATCHDOG=1 every WATCHDOG_USEC/2 from a task on the
event loop itself, so a blocked loop stops the pings and systemd restarts the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from aiohttp import web

from teraproxy import __version__, build, systemd
from teraproxy.app import LIVE, PROXY, RELOADER, start_servers
from teraproxy.cli import StartupError
from teraproxy.config import Config
from teraproxy.runtime import Live

log = logging.getLogger("teraproxy")

FORCED_EXIT = 1  # a second SIGTERM/SIGINT: in-flight work is abandoned


def status_line(live: Live) -> str:
    reps = live.current.replicas
    up = sum(1 for r in reps if r.up)
    line = f"{up}/{len(reps)} replicas up, {live.active} in flight"
    if live.draining:
        line = "draining: " + line
    return line


class Daemon:
    def __init__(self, config: Config, path: str | None, overrides: dict[str, Any] | None = None) -> None:
        self.config = config
        self.path = path
        self.overrides = overrides or {}
        self.notifier = systemd.Notifier.from_env()
        self.stop = asyncio.Event()
        self.signals = 0
        self.signal_name = ""
        self.tasks: list[asyncio.Task[None]] = []
        self.app: web.Application | None = None

    async def run(self, ready: Callable[[], None] | None = None) -> None:
        self._install_signals()  # before the listeners: a signal during start-up must not kill the process
        inherited = systemd.listen_fds()
        try:
            app, runners = await start_servers(self.config, self.path, inherited)
        except OSError as e:
            raise StartupError(e.strerror or str(e)) from None
        live = app[LIVE]
        app[RELOADER].overrides = self.overrides
        self.app = app
        try:
            log.info("teraproxy %s (%s) listening on %s%s (admin: %s), %d model(s)", __version__, build(),
                     self.config.listen, " (inherited socket)" if inherited else "", self.config.admin_listen or "off",
                     len(self.config.models))
            await _first_round(live)
            tune_gc()
            if self.notifier:
                self.notifier.ready(status_line(live))
                self._spawn(self._status(live), "systemd:status")
                interval = systemd.watchdog_interval()
                if interval:
                    self._spawn(self._watchdog(interval), "systemd:watchdog")
            if ready:
                ready()
            await self.stop.wait()
            await self._drain(app, runners)
        finally:
            for t in self.tasks:
                t.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            for r in reversed(runners):
                await r.cleanup()
            if self.notifier:
                self.notifier.close()

    def _spawn(self, coro: object, name: str) -> None:
        self.tasks.append(asyncio.get_running_loop().create_task(coro, name=name))  # type: ignore[arg-type]

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._terminate, sig)

    def _terminate(self, sig: int) -> None:
        self.signals += 1
        if self.signals > 1:
            log.warning("second %s during the drain: exiting now", signal.Signals(sig).name)
            logging.shutdown()
            sys.stdout.flush()
            os._exit(FORCED_EXIT)
        self.signal_name = signal.Signals(sig).name
        self.stop.set()

    def _reload(self) -> None:
        app = self.app
        if app is None or self.stop.is_set():
            log.warning("SIGHUP %s: ignored", "during start-up" if app is None else "during the drain")
            return
        if self.notifier:
            self.notifier.reloading()
        problems = app[RELOADER].reload()
        if self.notifier:
            live = app[LIVE]
            self.notifier.ready(f"reload failed ({problems[0]}); " + status_line(live) if problems
                                else status_line(live))

    async def _status(self, live: Live) -> None:
        assert self.notifier is not None
        while True:
            await asyncio.sleep(1.0)
            self.notifier.status(status_line(live))

    async def _watchdog(self, interval: float) -> None:
        assert self.notifier is not None
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _drain(self, app: web.Application, runners: list[web.AppRunner]) -> None:
        live, proxy = app[LIVE], app[PROXY]
        live.draining = True
        drain = live.current.config.shutdown.drain
        t0 = asyncio.get_running_loop().time()
        log.info("%s: shutting down: listeners close, %d request(s) in flight get up to %gs (shutdown.drain)",
                 self.signal_name or "stop", live.active, drain)
        live.events.publish("drain", in_flight=live.active, seconds_left=drain)
        if self.notifier:
            self.notifier.stopping(status_line(live))
        api = runners[0]
        for site in list(api.sites):
            await site.stop()  # the listening sockets close now: new connections go elsewhere
        if api.server is not None:
            api.server.pre_shutdown()  # idle keep-alives close now, busy ones after their answer
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain
        next_note = loop.time() + 1.0
        while live.active and loop.time() < deadline:
            await asyncio.sleep(0.05)
            if loop.time() >= next_note and live.active:
                next_note += 1.0
                log.info("draining: %d request(s) in flight, %.0fs left", live.active, deadline - loop.time())
                live.events.publish("drain", in_flight=live.active, seconds_left=round(deadline - loop.time(), 1))
        if live.active:
            n = proxy.cut()
            log.warning("drain time (%gs) is over: cut %d answer(s) in progress", drain, n)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):  # the cut handlers write their last event and end
                    while live.active:  # noqa: ASYNC110 (polled: the request path signals nothing)
                        await asyncio.sleep(0.01)
        log.info("shut down in %.2f s", asyncio.get_running_loop().time() - t0)


async def _first_round(live: Live) -> None:
    """Until every replica has had its first health check, or health.timeout (+ the first probe's
    random start delay) has passed."""
    cfg = live.current.config.health
    if not cfg.enabled:
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(cfg.timeout + 0.5):
            while any(r.last_check is None for r in live.current.replicas):  # noqa: ASYNC110
                await asyncio.sleep(0.02)


def tune_gc() -> None:
    """Once serving: what start-up made (modules, config, tables) moves out of the collector's
    sight, and the youngest generation is collected ten times less often. A request makes a few
    hundred short-lived containers and frees them by reference counting; the default threshold
    (700) ran a collection every couple of requests, ~3% of the proxy's CPU (py-spy, S1)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(7000, 10, 10)
