"""Replicas and model pools: the routing table, built once per config.

A Replica holds what the balancer needs on the hot path as plain attributes (in-flight count,
health, breaker); the table maps a model id to its ModelPool with one dict lookup. Health state
is written by health.py, breaker state by the proxy; nothing here does I/O.

Breaker and health meet here: a breaker's verdicts go through ``Replica.record``/``release`` so
that requests waiting for a half-open trial (``wait_trial``) wake the moment it is judged, and a
replica the health check has just verified with a real generation (``mark_up(verified=True)``)
has passed the breaker's trial: its breaker closes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from teraproxy.admission import Admission
from teraproxy.breaker import PROBE, Breaker
from teraproxy.config import Config, ModelConfig, ReplicaConfig

if TYPE_CHECKING:
    from teraproxy.loadreport import LoadReport

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/audio/speech")
NO_CAP = 1 << 62  # max_in_flight when none is configured


class Replica:
    __slots__ = (
        "auth_header",
        "breaker",
        "cfg",
        "clock",
        "failures",
        "heads",
        "in_flight",
        "last_check",
        "latency",
        "max_in_flight",
        "model_id",
        "origin",
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

    def __init__(self, cfg: ReplicaConfig, model_id: str, config: Config, clock: Callable[[], float]) -> None:
        self.url = cfg.url
        self.model_id = model_id
        self.in_flight = 0
        self.max_in_flight = cfg.max_in_flight or NO_CAP
        self.report: LoadReport | None = None  # the replica's own view of its load (loadreport.py)
        self.stale_after = config.load.stale_after or 3 * config.load.interval
        # Without active checks a replica is trusted until traffic says otherwise;
        # with them it starts down and must pass `rise` checks (and the warm-up) first.
        self.up = not config.health.enabled
        self.reason = "not checked yet" if config.health.enabled else "health checks disabled"
        self.breaker = Breaker(config.breaker.failures, config.breaker.open, config.breaker.max_open, clock)
        self.clock = clock
        self.up_since = -1e18  # far past: full weight
        self.last_check: float | None = None
        self.latency: float | None = None
        self.requests = 0
        self.failures = 0
        self.trial: asyncio.Event | None = None  # set when the half-open trial in flight is judged
        self.retired = False  # removed by a reload: takes no new attempts (runtime.py)
        u = urlsplit(cfg.url)
        assert u.hostname is not None and u.port is not None  # config normalised the URL
        self.origin = (u.hostname, u.port, u.scheme == "https")
        self.configure(cfg, config)

    def configure(self, cfg: ReplicaConfig, config: Config) -> None:
        """Take the settings of a (re)loaded config; state (health, breaker, counts) is kept."""
        self.cfg = cfg
        self.weight = cfg.weight
        self.slow_start = config.health.slow_start
        b = self.breaker
        b.failures, b.open_s, b.max_open_s = config.breaker.failures, config.breaker.open, config.breaker.max_open
        self.auth_header = f"Bearer {cfg.api_key}" if cfg.api_key else None
        netloc = urlsplit(cfg.url).netloc
        # the fixed part of every request head, encoded once: request line, Host, our own headers
        auth = f"Authorization: {self.auth_header}\r\n" if self.auth_header else ""
        self.heads = {path: (f"POST {path} HTTP/1.1\r\nHost: {netloc}\r\nContent-Type: application/json\r\n"
                             f"Accept-Encoding: identity\r\n{auth}").encode("latin-1")
                      for path in GENERATION_PATHS}

    def available(self) -> bool:
        return self.up and not self.retired and self.breaker.available()

    def effective_weight(self, now: float) -> float:
        """Weight ramps linearly from 10% to 100% over slow_start after the replica comes up."""
        age = now - self.up_since
        if self.slow_start <= 0 or age >= self.slow_start:
            return self.weight
        return self.weight * max(0.1, age / self.slow_start)

    def mark_up(self, now: float, first: bool, verified: bool = False) -> None:
        """Up again; ``verified``: a real generation (the warm-up) has just succeeded, which is the
        breaker's trial passed, so the breaker closes (else a recovered replica would answer 503
        until some client request had been the trial)."""
        self.up = True
        self.reason = "healthy"
        # a replica that is there when the proxy starts takes full weight at once
        self.up_since = -1e18 if first else now
        if verified:
            self.breaker.close()
            self._judged()

    def record(self, ok: bool, grant: int) -> None:
        """The verdict of a request the breaker granted (see Breaker.record)."""
        self.breaker.record(ok, grant)
        if grant == PROBE:
            self._judged()

    def release(self, grant: int) -> None:
        """A granted request ended without a verdict (its client went away)."""
        self.breaker.release(grant)
        if grant == PROBE:
            self._judged()

    def trial_pending(self) -> bool:
        """Up, with a half-open trial in flight: a request may wait for its verdict."""
        return self.up and self.breaker.trial_in_flight()

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

    def snapshot(self) -> dict[str, object]:
        now = self.clock()
        return {
            "url": self.url, "model": self.model_id, "up": self.up, "reason": self.reason,
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


ReplicaFactory = Callable[[ReplicaConfig, str, Config, Callable[[], float]], Replica]


class ModelPool:
    __slots__ = ("affinity", "cfg", "emit", "id", "queue", "reasoning_in", "replicas")

    def __init__(self, cfg: ModelConfig, config: Config, clock: Callable[[], float],
                 make: ReplicaFactory | None = None) -> None:
        self.cfg = cfg
        self.id = cfg.id
        self.replicas = tuple((make or Replica)(r, cfg.id, config, clock) for r in cfg.replicas)
        self.emit = cfg.reasoning
        self.reasoning_in = cfg.reasoning_in
        self.affinity = cfg.policy == "affinity"
        # a queue only where requests can be held back: some replica has a max_in_flight
        capped = any(r.max_in_flight != NO_CAP for r in self.replicas)
        self.queue = Admission(cfg.id, config.queue.max, config.queue.timeout, self.room, clock) if capped else None

    def room(self) -> int:
        """How many more requests the available replicas take right now (their max_in_flight)."""
        return sum(max(0, r.max_in_flight - r.in_flight) for r in self.replicas if r.available())

    def saturated(self) -> bool:
        """Some replica is available, but every available one is at its max_in_flight: queue."""
        avail = [r for r in self.replicas if r.available()]
        return bool(avail) and all(r.in_flight >= r.max_in_flight for r in avail)

    def pending_trial(self, exclude: list[Replica]) -> Replica | None:
        """A replica (not in ``exclude``) whose half-open trial is in flight, if any."""
        for r in self.replicas:
            if r not in exclude and r.trial_pending():
                return r
        return None

    def retry_in(self, check_interval: float) -> float:
        """Seconds until the soonest replica of this pool may be tried (for Retry-After): its breaker's
        remaining open time, or for a replica that is down, the next health check."""
        return min(r.retry_in() if r.up else check_interval for r in self.replicas)


def build_table(config: Config, clock: Callable[[], float] = time.monotonic,
                make: ReplicaFactory | None = None) -> dict[str, ModelPool]:
    """The routing table of a config; ``make`` builds (or, on reload, finds) each replica object."""
    return {m.id: ModelPool(m, config, clock, make) for m in config.models}
