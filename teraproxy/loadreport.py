"""Load reports: each replica's own view of its load, scraped from its Prometheus ``/metrics``.

vLLM exports its scheduler state as gauges (vllm/v1/metrics/loggers.py, labels ``model_name`` and
``engine``): ``vllm:num_requests_running``, ``vllm:num_requests_waiting`` and
``vllm:kv_cache_usage_perc`` (``vllm:gpu_cache_usage_perc`` before v1). ``parse_metrics`` reads just
those lines (sans-io: bytes in, a LoadReport out; running and waiting summed over engines, KV usage
averaged), and the ``vllm:request_success_total`` counter (labels ``model_name``, ``engine``,
``finished_reason``; summed), from which consecutive reports measure how fast the replica drains its
queue; everything else in the exposition is skipped without being parsed.

The drain rate is measured only over intervals in which the replica was saturated (requests waiting
at both scrapes): then completions per second are its capacity, whereas an unsaturated replica
finishes only what it is sent. It is smoothed with a time constant of ``RATE_TAU`` seconds, since
requests of equal length finish in cohorts and one scrape interval may hold one cohort more or less
(±30% per sample at a few cohorts a second). ``slots`` is the replica's concurrency as last seen
saturated (its running count while requests wait), or the most it has been seen running.

``LoadReporter`` owns one named task per replica that scrapes every ``load.interval`` (±15% jitter,
first scrape at a random offset) with a short timeout and a bounded read, and stores the result on
``Replica.report``. A replica that answers 404 (no endpoint) has no report and is asked again only
every ten intervals; a failed scrape leaves the last report to age out: the balancer ignores a report
older than ``load.stale_after`` and falls back to this proxy's own in-flight count. Nothing here
runs per request.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp

from teraproxy.config import LoadConfig
from teraproxy.upstreams import ReplicaTasks

if TYPE_CHECKING:
    from teraproxy.upstreams import Replica

log = logging.getLogger("teraproxy.load")

MAX_BYTES = 4 * 1024 * 1024  # a vLLM exposition is ~100 KiB; anything far larger is not one
_RUNNING = b"vllm:num_requests_running"
_WAITING = b"vllm:num_requests_waiting"
_KV = b"vllm:kv_cache_usage_perc"
_KV_OLD = b"vllm:gpu_cache_usage_perc"
_SUCCESS = b"vllm:request_success_total"
RATE_TAU = 10.0  # seconds: time constant of the drain-rate average


@dataclass(frozen=True, slots=True)
class LoadReport:
    running: int
    waiting: int
    kv: float | None  # KV-cache usage 0..1, None when the replica does not export it
    at: float = 0.0  # monotonic time the report was taken
    in_flight: int = 0  # this proxy's in-flight count to the replica at that time (see balance.demand)
    completed: float | None = None  # vllm:request_success_total (all finish reasons), a counter
    rate: float | None = None  # completions per second while saturated, smoothed (None: not known yet)
    slots: int = 0  # requests it runs at once: its running count when last seen with requests waiting

    def followed_by(self, new: LoadReport) -> LoadReport:
        """``new`` with the drain rate and slots carried over from this earlier report and updated."""
        slots = new.running if new.waiting > 0 else max(new.running, self.slots)
        if new.completed is None or self.completed is None or new.at <= self.at or new.completed < self.completed:
            # no counter, or it was reset (the replica restarted): start measuring again
            return LoadReport(new.running, new.waiting, new.kv, new.at, new.in_flight, new.completed, None, slots)
        rate = self.rate
        if self.waiting > 0 and new.waiting > 0:  # saturated throughout: completions/s is its capacity
            dt = new.at - self.at
            sample = (new.completed - self.completed) / dt
            rate = sample if rate is None else rate + (1.0 - math.exp(-dt / RATE_TAU)) * (sample - rate)
        return LoadReport(new.running, new.waiting, new.kv, new.at, new.in_flight, new.completed, rate, slots)


def _sample(line: bytes, name: bytes) -> float | None:
    """The value of one sample line of metric ``name`` (with or without labels), or None."""
    rest = line[len(name):]
    if rest[:1] == b"{":
        end = rest.rfind(b"}")
        if end < 0:
            return None
        rest = rest[end + 1:]
    elif rest[:1] not in (b" ", b"\t"):
        return None  # another metric whose name starts with ours
    parts = rest.split()
    if not parts:
        return None
    try:
        v = float(parts[0])
    except ValueError:
        return None
    return v if math.isfinite(v) and v >= 0 else None


def parse_metrics(text: bytes, at: float = 0.0, in_flight: int = 0) -> LoadReport | None:
    """A LoadReport from a Prometheus text exposition, or None when it has no vLLM scheduler gauges."""
    running = waiting = 0.0
    seen = False
    kv: list[float] = []
    kv_old: list[float] = []
    completed: float | None = None
    for line in text.splitlines():
        if not line.startswith(b"vllm:"):
            continue
        if line.startswith(_SUCCESS):
            v = _sample(line, _SUCCESS)
            if v is not None:
                completed = (completed or 0.0) + v
            continue
        for name, into in ((_RUNNING, None), (_WAITING, None), (_KV, kv), (_KV_OLD, kv_old)):
            if line.startswith(name):
                v = _sample(line, name)
                if v is None:
                    break
                if into is not None:
                    into.append(min(v, 1.0))
                elif name == _RUNNING:
                    running += v
                    seen = True
                else:
                    waiting += v
                    seen = True
                break
    if not seen:
        return None
    usage = kv or kv_old
    return LoadReport(int(running), int(waiting), sum(usage) / len(usage) if usage else None, at,
                      in_flight, completed, None, int(running))


class LoadReporter:
    """The scraping tasks: started with the app, cancelled and awaited on shutdown."""

    def __init__(self, cfg: LoadConfig, replicas: Iterable[Replica], session: aiohttp.ClientSession,
                 rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.replicas = tuple(replicas)
        self.session = session
        self.rng = rng or random.Random()
        self.tasks = ReplicaTasks("load")
        self._timeout = aiohttp.ClientTimeout(total=cfg.timeout)

    def start(self) -> None:
        self.sync(self.replicas)

    def configure(self, cfg: LoadConfig, replicas: Iterable[Replica]) -> None:
        """A reload's ``load`` settings: scraping starts or stops, a new interval applies at once."""
        old, self.cfg = self.cfg, cfg
        self._timeout = aiohttp.ClientTimeout(total=cfg.timeout)
        if not cfg.enabled:
            self.tasks.cancel_all()
            for r in replicas:
                r.report = None  # not refreshed any more: the balancer goes by its own in-flight counts
            return
        if (old.interval, old.path) != (cfg.interval, cfg.path):
            self.tasks.nudge()
        self.sync(replicas)

    def sync(self, replicas: Iterable[Replica]) -> None:
        """Scrape every replica not scraped yet (a reload adds some; ``unwatch`` ends a removed one's)."""
        if not self.cfg.enabled:
            return
        for r in replicas:
            self.tasks.watch(r, self._watch)

    def unwatch(self, r: Replica) -> None:
        self.tasks.unwatch(r)

    async def stop(self) -> None:
        await self.tasks.stop()

    async def _watch(self, r: Replica) -> None:
        await self.tasks.pause(self.rng.uniform(0, self.cfg.interval))
        while True:
            pause = self.cfg.interval
            try:
                found = await self.scrape(r)
                if not found:
                    pause *= 10  # no endpoint: ask rarely
            except Exception:  # a bug must never end the watch
                log.exception("load report of %s failed unexpectedly", r.url)
            await self.tasks.pause(pause * self.rng.uniform(0.85, 1.15))

    async def scrape(self, r: Replica) -> bool:
        """One scrape into ``r.report``; False when the replica has no (vLLM) metrics endpoint."""
        headers = {"Authorization": r.auth_header} if r.auth_header else {}
        try:
            async with self.session.get(r.url + self.cfg.path, headers=headers, timeout=self._timeout) as resp:
                if resp.status != 200:
                    if resp.status == 404:
                        r.report = None
                        return False
                    return True  # a transient error: the last report ages out
                in_flight = r.in_flight  # what the replica counted when it answered
                body = await _read_bounded(resp, MAX_BYTES)
        except (TimeoutError, aiohttp.ClientError):
            return True
        if body is None:
            log.warning("%s%s is over %d bytes; no load report", r.url, self.cfg.path, MAX_BYTES)
            r.report = None
            return False
        new = parse_metrics(body, time.monotonic(), in_flight)
        prev = r.report
        r.report = prev.followed_by(new) if prev is not None and new is not None else new
        return new is not None


async def _read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
    if resp.content_length is not None and resp.content_length > limit:
        return None
    parts: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(65536):
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)
