"""The live snapshot a request runs on, and the reload that replaces it.

A Snapshot is everything a request reads that a reload may change: the config, the routing table,
the key table and (``limits``) the limiters. It is built whole, off to the side, and never changed
after it is published. ``Live`` is the one mutable reference to the current snapshot.

Invariants:
- a request reads ``live.current`` once, at its start (the edge middleware puts it in the request's
  Ctx), and uses only that snapshot to its end; there are no locks on the request path;
- a reload builds a complete new snapshot and publishes it with one assignment; a reload that fails
  (unreadable file, invalid config) changes nothing but a counter and the log;
- replica objects are carried from the old snapshot to the new one by URL (one server is one replica,
  whichever models list it), so a replica that stays keeps its health state, breaker, in-flight count
  and slow-start ramp, and its pooled connections (which the upstream client keys by origin) are
  reused; a new replica is built PENDING: it takes traffic once its health checks pass (at start-up
  replicas are ASSUMED_UP, see upstreams.py);
- a replica that a reload removes is marked ``retired`` at the swap: it takes no new attempt, not even
  from a request still holding the old snapshot; its in-flight requests and streams finish, and once
  none is left the ``on_retired`` hooks close its health task and its idle connections;
- listen addresses (and the other RESTART_ONLY keys) cannot change without a restart: a reload that
  changes one keeps the old sockets and the old value, with a warning naming the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from teraproxy.auth import KeyTable
from teraproxy.config import Config, ConfigError, ReplicaConfig, load_config
from teraproxy.events import EventBus
from teraproxy.quota import Quota, build_quota
from teraproxy.upstreams import ASSUMED_UP, PENDING, ModelPool, Replica, build_table, link_queues

log = logging.getLogger("teraproxy.runtime")

# Keys a reload cannot apply, each with one warning naming it, the running value kept: the sockets are
# bound once (and the server's keep-alive timeout is fixed with them), the access-log stream is chosen
# at start-up, the rate limiter's backend holds its budgets and connection. (tls on/off: see below.)
RESTART_ONLY = ("listen", "admin_listen", "listen_reuse_port", "timeouts.keepalive", "log.access_log",
                "ratelimit.backend", "ratelimit.redis_url", "ratelimit.on_backend_error",
                "ratelimit.redis_timeout", "ratelimit.lease_ttl")
_REAP_EVERY = 0.2  # seconds between looks at retired replicas' in-flight counts


class Snapshot:
    """One consistent view of the config and what is built from it; read-only once published."""

    __slots__ = ("config", "keys", "limits", "loaded_at", "replicas", "sha256", "table")

    def __init__(self, config: Config, table: dict[str, ModelPool], sha256: str, limits: Quota | None = None) -> None:
        self.config = config
        self.table = table
        self.keys = KeyTable(config.auth)
        self.limits = limits  # the limiters (ratelimit.py), built from the same config
        self.sha256 = sha256  # of the config file's bytes; "" when the config did not come from a file
        self.loaded_at = time.time()
        seen: dict[int, Replica] = {}
        for pool in table.values():
            for r in pool.replicas:
                seen.setdefault(id(r), r)
        self.replicas = tuple(seen.values())


def build(config: Config, sha256: str = "", previous: Snapshot | None = None,
          spare: tuple[Replica, ...] = (), clock: Callable[[], float] = time.monotonic) -> Snapshot:
    """A snapshot for ``config``, reusing the replica objects of ``previous`` (and the retired but
    still draining ``spare`` ones) whose URL is in the new config. Without ``previous`` (start-up)
    new replicas are assumed up; a reload's new replicas wait for their checks."""
    old: dict[str, Replica] = {}
    for r in (*spare, *(previous.replicas if previous else ())):
        old[r.url] = r
    initial = PENDING if previous is not None else ASSUMED_UP

    def make(cfg: ReplicaConfig, models: tuple[str, ...], config: Config, clock: Callable[[], float]) -> Replica:
        r = old.get(cfg.url)
        if r is None:
            return Replica(cfg, models, config, clock, initial)
        r.configure(cfg, config, models)
        return r

    # the limiter outlives snapshots: a reload keeps every key's budget, only the limits change
    quota = build_quota(config, previous.limits if previous is not None else None)
    table = build_table(config, clock, make)
    for mid, pool in table.items():
        if previous is not None and mid in previous.table:
            pool.adopt(previous.table[mid])  # waiting requests keep their place
    link_queues(table)
    return Snapshot(config, table, sha256, quota)


class Live:
    """The current snapshot and the process state around it (reloads, retired replicas, drain)."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.current = snapshot
        self.retiring: dict[int, Replica] = {}  # removed by a reload, requests still in flight
        self.draining = False  # SIGTERM: no new connections, /readyz answers 503
        self.active = 0  # API requests being handled (the edge middleware counts them; drain waits for 0)
        self.reloads = 0
        self.reload_failures = 0
        self.last_reload_ok = snapshot.loaded_at
        self.last_error: list[str] = []
        self.events = EventBus()  # for /admin/events

    def swap(self, new: Snapshot) -> list[Replica]:
        """Publish ``new``; returns the replicas it no longer has (now retired)."""
        keep = {id(r) for r in new.replicas}
        removed = [r for r in self.current.replicas if id(r) not in keep]
        for r in new.replicas:
            r.retired = False  # listed again while it was still draining
            self.retiring.pop(id(r), None)
        for r in removed:
            r.retired = True
            self.retiring[id(r)] = r
        self.current = new  # the one assignment that switches every new request over
        return removed

    def ready(self) -> bool:
        """Serving, and at least one replica of every model is up."""
        if self.draining:
            return False
        return all(any(r.up and not r.retired and pool.id not in r.missing for r in pool.replicas)
                   for pool in self.current.table.values())


def file_sha256(path: str | Path) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return ""


def _get(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = getattr(config, part)
    return config


def _put(config: Any, key: str, value: Any) -> Any:
    """``config`` with the (dotted) ``key`` set to ``value``; frozen dataclasses all the way down."""
    head, _, rest = key.partition(".")
    return dataclasses.replace(config, **{head: _put(getattr(config, head), rest, value) if rest else value})


def _pin_restart_only(new: Config, old: Config) -> tuple[Config, list[str]]:
    """The new config with the keys a reload cannot change put back to their running values."""
    warnings = []
    for key in RESTART_ONLY:
        was, now = _get(old, key), _get(new, key)
        if was != now:
            warnings.append(f"{key}: changed from {was} to {now}, which needs a restart; keeping {was}")
            new = _put(new, key, was)
    if (old.tls is None) != (new.tls is None):  # a new certificate is fine, switching TLS on or off is not
        warnings.append(f"tls: {'added' if new.tls else 'removed'}, which needs a restart; keeping "
                        f"{'plain HTTP' if old.tls is None else 'TLS'} on {old.listen}")
        new = dataclasses.replace(new, tls=old.tls)
    return new, warnings


class Reloader:
    """Re-reads the config file and swaps the snapshot (the I/O shell around ``build``/``swap``).

    ``on_swap`` hooks run after every successful swap with the new snapshot (health checks for new
    replicas, settings held outside the snapshot); ``on_retired`` hooks run once per removed replica
    when its last request has finished. ``extra_checks`` may veto a config (e.g. an unreadable TLS
    certificate) with problems named by key path.
    """

    def __init__(self, live: Live, path: str | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.live = live
        self.path = path
        self.clock = clock
        self.on_swap: list[Callable[[Snapshot], None]] = []
        self.on_retired: list[Callable[[Replica], None]] = []
        self.extra_checks: list[Callable[[Config], list[str]]] = []
        self.overrides: dict[str, Any] = {}  # command-line settings that win over the file's
        self._reaper: asyncio.Task[None] | None = None

    def reload(self) -> list[str]:
        """Apply the config file now; returns the problems (empty when the new config is live)."""
        live = self.live
        if self.path is None:
            problems = ["(reload): this process was not started from a config file"]
        else:
            try:
                sha = file_sha256(self.path)
                config = load_config(self.path)
                if self.overrides:
                    config = dataclasses.replace(config, **self.overrides)
                problems = [p for check in self.extra_checks for p in check(config)]
            except ConfigError as e:
                problems = e.problems
        if problems:
            live.reload_failures += 1
            live.last_error = problems
            for p in problems:
                log.error("reload failed, still serving the previous config: %s", p)
            live.events.publish("reload", ok=False, problems=problems)
            return problems
        config, warnings = _pin_restart_only(config, live.current.config)
        for w in warnings:
            log.warning("reload: %s", w)
        new = build(config, sha, live.current, tuple(live.retiring.values()), self.clock)
        removed = live.swap(new)
        for pool in new.table.values():  # a raised max_in_flight (or a replica back) admits waiters now
            if pool.queue is not None:
                pool.queue.freed()
        live.reloads += 1
        live.last_reload_ok = new.loaded_at
        live.last_error = []
        for hook in self.on_swap:
            hook(new)
        if live.retiring:
            self._start_reaper()
        live.events.publish("reload", ok=True, sha256=sha, replicas=len(new.replicas),
                            retired=[r.url for r in removed])
        log.info("reloaded %s (sha256 %s): %d model(s), %d replica(s), %d retired", self.path, sha[:12],
                 len(new.table), len(new.replicas), len(removed))
        return []

    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap(), name="runtime:retire")

    async def _reap(self) -> None:
        """Close each retired replica once its last request is done (polled: costs the request path nothing)."""
        while self.live.retiring:
            for key, r in list(self.live.retiring.items()):
                if r.in_flight == 0:
                    del self.live.retiring[key]
                    for hook in self.on_retired:
                        try:
                            hook(r)
                        except Exception:  # one hook's bug must not leave the replica half-closed
                            log.exception("closing retired replica %s failed", r.url)
                    log.info("retired replica %s (%s) closed", r.url, ", ".join(r.models))
            await asyncio.sleep(_REAP_EVERY)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper


class LiveCollector(Collector):
    """Reload and drain state for /metrics, read at scrape time."""

    def __init__(self, live: Live) -> None:
        self.live = live

    def collect(self) -> Iterator[Metric]:
        live = self.live
        ok = CounterMetricFamily("teraproxy_config_reloads", "Reloads that put a new config live")
        ok.add_metric([], live.reloads)
        bad = CounterMetricFamily("teraproxy_config_reload_failures",
                                  "Reloads refused (unreadable or invalid config); the previous one kept serving")
        bad.add_metric([], live.reload_failures)
        ts = GaugeMetricFamily("teraproxy_config_last_reload_success_timestamp_seconds",
                               "Unix time the live config was loaded (start-up or last good reload)")
        ts.add_metric([], live.last_reload_ok)
        info = GaugeMetricFamily("teraproxy_config_info", "The live config, by the sha256 of its file",
                                 labels=["sha256"])
        info.add_metric([live.current.sha256], 1.0)
        retiring = GaugeMetricFamily("teraproxy_replicas_retiring",
                                     "Replicas removed by a reload whose requests are still in flight")
        retiring.add_metric([], len(live.retiring))
        ready = GaugeMetricFamily("teraproxy_ready", "1 while /readyz answers 200")
        ready.add_metric([], 1.0 if live.ready() else 0.0)
        draining = GaugeMetricFamily("teraproxy_draining", "1 from SIGTERM until exit")
        draining.add_metric([], 1.0 if live.draining else 0.0)
        yield from (ok, bad, ts, info, retiring, ready, draining)
