"""Prometheus metrics on the admin listener, from their own registry.

Per request the hot path does a cached counter increment and one histogram observation (label
children are looked up once per model and status code, not per request). Everything about
replicas (up, breaker, in flight, requests, failures) is read from the routing table when
/metrics is scraped, so it costs nothing per request. Labels are bounded: model ids and replica
URLs come from the config (a request that named no served model is ``model="(none)"``, never the
client's string), ``code`` is the exact HTTP status (at most the 500 codes 100-599, "other"
beyond); never a key or a raw path. The registry also has the process collector (``process_*``:
CPU, RSS, open fds), and no ``_created`` series (a gauge per counter that nobody graphs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from teraproxy.runtime import Live, LiveCollector

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
NO_MODEL = "(none)"  # requests that never named a served model (bad JSON, unknown model, 404 paths, bad HTTP)


class Metrics:
    def __init__(self, live: Live) -> None:
        # prometheus-client's switch is process-wide; this process exports only this registry
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self.live = live  # the model label is bounded by the models of the live config
        self.requests = Counter("teraproxy_requests", "Requests answered, by model and HTTP status code",
                                ["model", "code"], registry=self.registry)
        self.duration = Histogram("teraproxy_request_duration_seconds", "Time to the last byte",
                                  ["model"], buckets=_BUCKETS, registry=self.registry)
        self.ttfb = Histogram("teraproxy_time_to_first_byte_seconds",
                              "Time until the response was committed (first event of a stream)",
                              ["model"], buckets=_BUCKETS, registry=self.registry)
        self.retries = Counter("teraproxy_retries", "Attempts beyond the first, by model", ["model"],
                               registry=self.registry)
        self.rewritten = Counter("teraproxy_reasoning_frames_rewritten",
                                 "Stream frames whose reasoning field was aliased", ["model"], registry=self.registry)
        self.bad_frames = Counter("teraproxy_sse_bad_frames",
                                  "Frames with a reasoning field that were not valid JSON (passed through)",
                                  ["model"], registry=self.registry)
        self.streams_broken = Counter("teraproxy_streams_broken",
                                      "Streams a replica broke after the commit point (the client got an "
                                      "error event)", ["model", "replica"], registry=self.registry)
        self.queue_waits = Histogram("teraproxy_queue_wait_seconds",
                                     "Time requests spent in the admission queue (part of time to first token)",
                                     ["model"], buckets=_BUCKETS, registry=self.registry)
        self._children: dict[tuple[str, int], tuple[Counter, Histogram, Histogram]] = {}
        # key names label these: bounded by the config (never the key itself); "" is auth: off
        self.token_counts = Counter("teraproxy_tokens", "Tokens as replicas reported them (a stream that broke "
                                    "before its usage chunk: estimated), by model, key name and kind",
                                    ["model", "key", "kind"], registry=self.registry)
        self.limited = Counter("teraproxy_rate_limited", "Requests refused by a key's limit (or 503: limiter "
                               "backend down with on_backend_error deny)", ["key", "limit"], registry=self.registry)
        self._token_children: dict[tuple[str, str], tuple[Counter, Counter]] = {}
        self.registry.register(_LimiterCollector(live))
        self.registry.register(_TableCollector(live))
        self.registry.register(LiveCollector(live))

    def request(self, model: str | None, status: int, seconds: float, ttfb: float | None, attempts: int,
                rewritten: int, bad_frames: int) -> None:
        m = model if model is not None and model in self.live.current.table else NO_MODEL
        key = (m, status)
        child = self._children.get(key)
        if child is None:
            code = str(status) if 100 <= status <= 599 else "other"
            child = self._children[key] = (self.requests.labels(m, code), self.duration.labels(m), self.ttfb.labels(m))
        child[0].inc()
        child[1].observe(seconds)
        if ttfb is not None:
            child[2].observe(ttfb)
        if attempts > 1:
            self.retries.labels(m).inc(attempts - 1)
        if rewritten:
            self.rewritten.labels(m).inc(rewritten)
        if bad_frames:
            self.bad_frames.labels(m).inc(bad_frames)

    def tokens(self, model: str | None, key: str | None, prompt: int, completion: int) -> None:
        m = model if model is not None and model in self.live.current.table else NO_MODEL
        k = key or ""
        child = self._token_children.get((m, k))
        if child is None:
            child = self._token_children[(m, k)] = (self.token_counts.labels(m, k, "prompt"),
                                                    self.token_counts.labels(m, k, "completion"))
        if prompt:
            child[0].inc(prompt)
        if completion:
            child[1].inc(completion)

    def rate_limited(self, key: str | None, limit: str) -> None:
        self.limited.labels(key or "", limit).inc()

    def stream_broken(self, model: str | None, replica: str | None) -> None:
        """Labels stay bounded: both come from the config (a request reaches a replica only after
        its model was found)."""
        m = model if model is not None and model in self.live.current.table else NO_MODEL
        self.streams_broken.labels(m, replica or "").inc()

    def queue_wait(self, model: str | None, seconds: float) -> None:
        m = model if model is not None and model in self.live.current.table else NO_MODEL
        self.queue_waits.labels(m).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class FuncCounter(Collector):
    """A counter whose value its owner keeps (read at scrape time, no cost per event)."""

    def __init__(self, name: str, doc: str, value: Callable[[], float]) -> None:
        self.name, self.doc, self.value = name, doc, value

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.doc, value=self.value())


class _TableCollector(Collector):
    """Replica state, read at scrape time. A server is one replica however many models list it:
    its breaker, in-flight count and attempt counters are labelled by ``replica`` alone (once per
    URL, so sums are right); ``teraproxy_replica_up`` is per model and replica (a server can be
    in one model's pool and out of another's)."""

    def __init__(self, live: Live) -> None:
        self.live = live

    def collect(self) -> Iterator[Metric]:
        snap = self.live.current
        up = GaugeMetricFamily("teraproxy_replica_up", "1 if the replica passes health checks and serves the model",
                               labels=["model", "replica"])
        for pool in snap.table.values():
            for r in pool.replicas:
                up.add_metric([pool.id, r.url], 1.0 if r.up and pool.id not in r.missing else 0.0)
        labels = ["replica"]
        open_ = GaugeMetricFamily("teraproxy_replica_breaker_open",
                                  "1 if the replica's circuit breaker is open or half-open", labels=labels)
        flight = GaugeMetricFamily("teraproxy_replica_in_flight", "Requests in flight to the replica",
                                   labels=labels)
        reqs = CounterMetricFamily("teraproxy_replica_attempts", "Attempts sent to the replica", labels=labels)
        fails = CounterMetricFamily("teraproxy_replica_failures",
                                    "Attempts that failed (connect error, timeout, 5xx, broken stream)",
                                    labels=labels)
        for r in snap.replicas:  # each server once
            lv = [r.url]
            open_.add_metric(lv, 0.0 if r.breaker.state == "closed" else 1.0)
            flight.add_metric(lv, r.in_flight)
            reqs.add_metric(lv, r.requests)
            fails.add_metric(lv, r.failures)
        depth = GaugeMetricFamily("teraproxy_queue_depth", "Requests waiting in the model's admission queue",
                                  labels=["model"])
        for pool in snap.table.values():
            depth.add_metric([pool.id], len(pool.queue.q) if pool.queue is not None else 0)
        yield from (up, open_, flight, reqs, fails, depth)


class _LimiterCollector(Collector):
    """The limiter's backend errors, read at scrape time."""

    def __init__(self, live: Live) -> None:
        self.live = live

    def collect(self) -> Iterator[Metric]:
        quota = self.live.current.limits
        errors = CounterMetricFamily("teraproxy_ratelimit_backend_errors",
                                     "Admissions and charges the rate-limit backend (Redis) failed or timed out")
        errors.add_metric([], quota.limiter.errors if quota is not None else 0)
        yield errors
