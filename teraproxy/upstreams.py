"""Replicas and model pools: the routing table, built once per config.

A Replica is one server (one URL): one breaker, one in-flight count, one health task, however
many models it is listed under; ``build_replicas`` keys them by URL and every pool that lists a
URL holds the same object. It keeps what the balancer needs on the hot path as plain attributes;
the table maps a model id to its ModelPool with one dict lookup. Health state is written by
health.py, breaker state by the proxy; nothing here does I/O.

How a replica starts is a parameter of its creation (``initial``): ASSUMED_UP (the proxy starts
in front of a running fleet: routable at once, like nginx, until a check or its breaker says
otherwise) or PENDING (a replica a reload adds: not routable until its health checks, model
check and warm-up pass).

Breaker and health meet here: a breaker's verdicts go through ``Replica.record``/``release`` so
that requests waiting for a half-open trial (``wait_trial``) wake the moment it is judged, and a
replica the health check has just verified with a real generation (``mark_up(verified=True)``)
has passed the breaker's trial: its breaker closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from teraproxy.admission import Admission
from teraproxy.breaker import Breaker, is_probe
from teraproxy.config import Config, ModelConfig, ReplicaConfig

if TYPE_CHECKING:
    from teraproxy.loadreport import LoadReport

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/audio/speech")
NO_CAP = 1 << 62  # max_in_flight when none is configured
ASSUMED_UP, PENDING = "assumed_up", "pending"  # a replica's initial state


class Replica:
    __slots__ = (
        "auth_header",
        "breaker",
        "cards",
        "cfg",
        "checked",
        "clock",
        "failures",
        "heads",
        "in_flight",
        "last_check",
        "latency",
        "max_in_flight",
        "missing",
        "models",
        "origin",
        "queues",
        "reason",
        "report",
        "requests",
        "retired",
        "slow_start",
        "stale_after",
        "trial",
        "up",
        "up_since",
        "url",
        "weight",
    )

    def __init__(self, cfg: ReplicaConfig, models: tuple[str, ...], config: Config, clock: Callable[[], float],
                 initial: str = ASSUMED_UP) -> None:
        self.url = cfg.url
        self.models = models  # every model id this server is listed under, in config order
        self.missing: dict[str, str] = {}  # model → why this server does not serve it (its /v1/models)
        self.in_flight = 0
        self.max_in_flight = cfg.max_in_flight or NO_CAP
        self.queues: tuple[Admission, ...] = ()  # admission queues of the pools listing it (link_queues)
        self.report: LoadReport | None = None  # the replica's own view of its load (loadreport.py)
        self.stale_after = config.load.stale_after or 3 * config.load.interval
        # Without active checks a replica is trusted until traffic says otherwise. With them, an
        # ASSUMED_UP replica takes traffic until its first check (one failure takes it down), a
        # PENDING one only once checks pass; `checked` records that a check has given its verdict.
        self.checked = False
        if not config.health.enabled:
            self.up, self.reason = True, "health checks disabled"
        elif initial == ASSUMED_UP:
            self.up, self.reason = True, "assumed up until its first health check"
        else:
            self.up, self.reason = False, "not checked yet"
        self.breaker = Breaker(config.breaker.failures, config.breaker.open, config.breaker.max_open, clock)
        self.clock = clock
        self.up_since = -1e18  # far past: full weight
        self.last_check: float | None = None
        self.latency: float | None = None
        self.requests = 0
        self.failures = 0
        self.cards: dict[str, dict[str, Any]] = {}  # model → its /v1/models entry, once it answered
        self.trial: asyncio.Event | None = None  # set when the half-open trial in flight is judged
        self.retired = False  # removed by a reload: takes no new attempts (runtime.py)
        u = urlsplit(cfg.url)
        assert u.hostname is not None and u.port is not None  # config normalised the URL
        self.origin = (u.hostname, u.port, u.scheme == "https")
        self.configure(cfg, config, models)

    def configure(self, cfg: ReplicaConfig, config: Config, models: tuple[str, ...]) -> None:
        """Take the settings of a (re)loaded config; state (health, breaker, counts) is kept. A server
        listed under other models than before has them confirmed by its next check."""
        if models != self.models:
            self.models = models
            self.missing = {m: why for m, why in self.missing.items() if m in models}
            self.checked = False
        self.cfg = cfg
        self.weight = cfg.weight
        self.slow_start = config.health.slow_start
        self.max_in_flight = cfg.max_in_flight or NO_CAP
        self.stale_after = config.load.stale_after or 3 * config.load.interval
        b = self.breaker
        b.failures, b.open_s, b.max_open_s = config.breaker.failures, config.breaker.open, config.breaker.max_open
        self.auth_header = f"Bearer {cfg.api_key}" if cfg.api_key else None
        netloc = urlsplit(cfg.url).netloc
        # the fixed part of every request head, encoded once: request line, Host, our own headers
        auth = f"Authorization: {self.auth_header}\r\n" if self.auth_header else ""
        self.heads = {path: (f"POST {path} HTTP/1.1\r\nHost: {netloc}\r\nContent-Type: application/json\r\n"
                             f"Accept-Encoding: identity\r\n{auth}").encode("latin-1")
                      for path in GENERATION_PATHS}

    def available(self, model: str) -> bool:
        return self.up and not self.retired and model not in self.missing and self.breaker.available()

    def effective_weight(self, now: float) -> float:
        """Weight ramps linearly from 10% to 100% over slow_start after the replica comes up."""
        age = now - self.up_since
        if self.slow_start <= 0 or age >= self.slow_start:
            return self.weight
        return self.weight * max(0.1, age / self.slow_start)

    def mark_up(self, now: float, verified: bool = False) -> None:
        """Up again (or, PENDING, for the first time): its weight ramps over slow_start. A replica
        assumed up at start-up is never marked up: it keeps full weight. ``verified``: a real
        generation (the warm-up) has just succeeded, which is the breaker's trial passed, so the
        breaker closes (else a recovered replica would answer 503 until some client request had
        been the trial)."""
        self.up = True
        self.reason = "healthy"
        self.up_since = now
        if verified:
            self.breaker.close()
            self._judged()

    def record(self, ok: bool, grant: int) -> None:
        """The verdict of a request the breaker granted (see Breaker.record)."""
        self.breaker.record(ok, grant)
        if is_probe(grant):
            self._judged()

    def release(self, grant: int) -> None:
        """A granted request ended without a verdict (its client went away)."""
        self.breaker.release(grant)
        if is_probe(grant):
            self._judged()

    def trial_pending(self, model: str) -> bool:
        """Up, with a half-open trial in flight: a request may wait for its verdict."""
        return self.up and model not in self.missing and self.breaker.trial_in_flight()

    async def wait_trial(self, timeout: float) -> bool:  # noqa: ASYNC109 (the deadline is the caller's)
        """Wait up to ``timeout`` s for the trial in flight to be judged; False on timeout."""
        if self.trial is None:
            self.trial = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                await self.trial.wait()
        except TimeoutError:
            return False
        return True

    def _judged(self) -> None:
        ev, self.trial = self.trial, None
        if ev is not None:
            ev.set()

    def mark_down(self, reason: str) -> None:
        self.up = False
        self.reason = reason

    def retry_in(self) -> float:
        return self.breaker.retry_in()

    def snapshot(self, model: str) -> dict[str, object]:
        """As seen from ``model``'s pool: up and reason are per model, the rest is the server's."""
        now = self.clock()
        missing = self.missing.get(model)
        return {
            "url": self.url, "model": model, "models": list(self.models),
            "up": self.up and missing is None, "reason": missing or self.reason,
            "breaker": self.breaker.snapshot(), "in_flight": self.in_flight, "weight": self.weight,
            "effective_weight": round(self.effective_weight(now), 3),
            "last_check_ago": None if self.last_check is None else round(now - self.last_check, 3),
            "latency_ms": None if self.latency is None else round(self.latency * 1000, 2),
            "requests": self.requests, "failures": self.failures,
            "max_in_flight": None if self.max_in_flight == NO_CAP else self.max_in_flight,
            "report": self._report_snapshot(now),
        }

    def _report_snapshot(self, now: float) -> dict[str, object] | None:
        rep = self.report
        if rep is None:
            return None
        return {"running": rep.running, "waiting": rep.waiting, "kv_cache_usage": rep.kv,
                "age": round(now - rep.at, 3), "stale": now - rep.at > self.stale_after}


def _no_cap() -> int:
    return NO_CAP


ReplicaFactory = Callable[[ReplicaConfig, tuple[str, ...], Config, Callable[[], float]], Replica]


class ModelPool:
    __slots__ = ("affinity", "cfg", "emit", "id", "queue", "reasoning_in", "replicas")

    def __init__(self, cfg: ModelConfig, config: Config, replicas: dict[str, Replica],
                 clock: Callable[[], float]) -> None:
        self.cfg = cfg
        self.id = cfg.id
        self.replicas = tuple(replicas[r.url] for r in cfg.replicas)
        self.emit = cfg.reasoning
        self.reasoning_in = cfg.reasoning_in
        self.affinity = cfg.policy == "affinity"
        # a queue only where requests can be held back: some replica has a max_in_flight
        capped = any(r.max_in_flight != NO_CAP for r in self.replicas)
        self.queue = Admission(cfg.id, config.queue.max, config.queue.timeout, self.room, clock) if capped else None

    def adopt(self, previous: ModelPool) -> None:
        """After a reload: keep the previous pool's queue, so requests waiting in it are admitted by
        the new pool's capacity-freed events (the replicas, and so their in-flight counts, carry over)."""
        old = previous.queue
        if old is None:
            return
        if self.queue is None:  # no replica is capped any more: whoever waits goes now
            old.room = _no_cap
            old.freed()
            return
        old.room = self.room
        old.q.max_size, old.q.timeout = self.queue.q.max_size, self.queue.q.timeout
        self.queue = old

    def room(self) -> int:
        """How many more requests the available replicas take right now (their max_in_flight)."""
        return sum(max(0, r.max_in_flight - r.in_flight) for r in self.replicas if r.available(self.id))

    def saturated(self) -> bool:
        """Some replica is available, but every available one is at its max_in_flight: queue."""
        avail = [r for r in self.replicas if r.available(self.id)]
        return bool(avail) and all(r.in_flight >= r.max_in_flight for r in avail)

    def card(self) -> dict[str, Any] | None:
        """The model card as a replica reported it (one that is up first), None before any answered."""
        best = None
        for r in self.replicas:
            if self.id in r.cards and (best is None or (r.up and not best.up)):
                best = r
        return None if best is None else best.cards[self.id]

    def pending_trial(self, exclude: list[Replica]) -> Replica | None:
        """A replica (not in ``exclude``) whose half-open trial is in flight, if any."""
        for r in self.replicas:
            if r not in exclude and r.trial_pending(self.id):
                return r
        return None

    def retry_in(self, check_interval: float) -> float:
        """Seconds until the soonest replica of this pool may be tried (for Retry-After): its breaker's
        remaining open time, or for a replica that is down, the next health check."""
        return min(r.retry_in() if r.up and self.id not in r.missing else check_interval for r in self.replicas)


def build_replicas(config: Config, clock: Callable[[], float] = time.monotonic,
                   make: ReplicaFactory | None = None) -> dict[str, Replica]:
    """One Replica per URL, listing every model it serves (config made sure that a URL listed under
    several models has one api_key and one weight); ``make`` builds (or, on reload, finds) each."""
    cfgs: dict[str, ReplicaConfig] = {}
    served: dict[str, list[str]] = {}
    for m in config.models:
        for rc in m.replicas:
            cfgs.setdefault(rc.url, rc)
            served.setdefault(rc.url, []).append(m.id)
    mk = make or Replica
    return {url: mk(rc, tuple(served[url]), config, clock) for url, rc in cfgs.items()}


def build_table(config: Config, clock: Callable[[], float] = time.monotonic,
                make: ReplicaFactory | None = None) -> dict[str, ModelPool]:
    """The routing table of a config: every pool that lists a URL holds that URL's one Replica."""
    replicas = build_replicas(config, clock, make)
    table = {m.id: ModelPool(m, config, replicas, clock) for m in config.models}
    link_queues(table)
    return table


def link_queues(table: dict[str, ModelPool]) -> None:
    """Give each replica the queues of every pool that lists it: capacity freed on a server shared by
    several models may admit a request waiting for any of them."""
    for r in unique_replicas(table):
        r.queues = tuple(p.queue for p in table.values() if p.queue is not None and r in p.replicas)


def unique_replicas(table: dict[str, ModelPool]) -> list[Replica]:
    """Every replica of the table once (a server listed under two models is one replica)."""
    return list({r.url: r for pool in table.values() for r in pool.replicas}.values())


class ReplicaTasks:
    """One owned, named task per watched replica (its health checks, its load scrapes): started once,
    cancelled by ``unwatch`` when a reload removes the replica, all cancelled and awaited by ``stop``.
    A task waits between rounds in ``pause``, which ``nudge`` (a reload changed the interval) ends
    early, so a new interval applies at once, not after the old one has run out."""

    __slots__ = ("_tasks", "_wake", "prefix")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._tasks: dict[int, asyncio.Task[None]] = {}  # by id() of the Replica
        self._wake = asyncio.Event()

    async def pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or until ``nudge``."""
        wake = self._wake
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await wake.wait()

    def nudge(self) -> None:
        """End every task's current pause (each then starts its next round with the new settings)."""
        self._wake.set()
        self._wake = asyncio.Event()

    def __len__(self) -> int:
        return len(self._tasks)

    def watch(self, r: Replica, job: Callable[[Replica], Coroutine[Any, Any, None]]) -> None:
        if id(r) not in self._tasks:
            self._tasks[id(r)] = asyncio.get_running_loop().create_task(job(r), name=f"{self.prefix}:{r.url}")

    def unwatch(self, r: Replica) -> None:
        task = self._tasks.pop(id(r), None)
        if task is not None:
            task.cancel()

    def cancel_all(self) -> list[asyncio.Task[None]]:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        return tasks

    async def stop(self) -> None:
        await asyncio.gather(*self.cancel_all(), return_exceptions=True)
