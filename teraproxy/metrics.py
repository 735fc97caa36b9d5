"""Prometheus metrics on the admin listener, from their own registry.

Per request the hot path adds to plain numbers (a dict entry per model, a bucket index by bisect);
they become metric families only when /metrics is scraped. Everything about
replicas (up, breaker, in flight, requests, failures) is read from the routing table when
/metrics is scraped, so it costs nothing per request. Labels are bounded: model ids and replica
URLs come from the config (a request that named no served model is ``model="(none)"``, never the
client's string), ``code`` is the exact HTTP status (at most the 500 codes 100-599, "other"
beyond); never a key or a raw path. The registry also has the process collector (``process_*``:
CPU, RSS, open fds), and no ``_created`` series (a gauge per counter that nobody graphs).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate

from prometheus_client import CollectorRegistry, Counter, ProcessCollector, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from teraproxy.runtime import Live, LiveCollector

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
NO_MODEL = "(none)"  # requests that never named a served model (bad JSON, unknown model, 404 paths, bad HTTP)


class Hist:
    """A histogram's bucket counts and sum as plain numbers: the event loop adds, /metrics reads."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect_left(_BUCKETS, v)] += 1  # the first bucket whose bound is >= v
        self.total += v


class _PerModel:
    """One model's request figures."""

    __slots__ = ("bad_frames", "codes", "duration", "queue", "retries", "rewritten", "ttfb")

    def __init__(self) -> None:
        self.codes: dict[int, int] = {}
        self.duration, self.ttfb, self.queue = Hist(), Hist(), Hist()
        self.retries = self.rewritten = self.bad_frames = 0


class Metrics:
    """The per-request figures are plain numbers that :class:`_RequestCollector` turns into families
    when /metrics is scraped: prometheus-client's Counter/Histogram take a lock per increment and
    walk the buckets in Python (8% of the proxy's instructions per request, callgrind, S1)."""

    def __init__(self, live: Live) -> None:
        # prometheus-client's switch is process-wide; this process exports only this registry
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self.live = live  # the model label is bounded by the models of the live config
        self.models: dict[str, _PerModel] = {}
        # key names label these: bounded by the config (never the key itself); "" is auth: off
        self.token_counts: dict[tuple[str, str], list[int]] = {}
        self.streams_broken = Counter("teraproxy_streams_broken",
                                      "Streams a replica broke after the commit point (the client got an "
                                      "error event)", ["model", "replica"], registry=self.registry)
        self.limited = Counter("teraproxy_rate_limited", "Requests refused by a key's limit (or 503: limiter "
                               "backend down with on_backend_error deny)", ["key", "limit"], registry=self.registry)
        self.registry.register(_RequestCollector(self))
        self.registry.register(_LimiterCollector(live))
        self.registry.register(_TableCollector(live))
        self.registry.register(LiveCollector(live))

    def _label(self, model: str | None) -> str:
        """The model label: a configured model, else NO_MODEL (never a client's string)."""
        return model if model is not None and model in self.live.current.table else NO_MODEL

    def _model(self, model: str | None) -> _PerModel:
        m = self._label(model)
        pm = self.models.get(m)
        if pm is None:
            pm = self.models[m] = _PerModel()
        return pm

    def request(self, model: str | None, status: int, seconds: float, ttfb: float | None, attempts: int,
                rewritten: int, bad_frames: int) -> None:
        pm = self._model(model)
        codes = pm.codes
        codes[status] = codes.get(status, 0) + 1
        pm.duration.observe(seconds)
        if ttfb is not None:
            pm.ttfb.observe(ttfb)
        if attempts > 1:
            pm.retries += attempts - 1
        if rewritten:
            pm.rewritten += rewritten
        if bad_frames:
            pm.bad_frames += bad_frames

    def tokens(self, model: str | None, key: str | None, prompt: int, completion: int) -> None:
        m = self._label(model)
        counts = self.token_counts.get((m, key or ""))
        if counts is None:
            counts = self.token_counts[(m, key or "")] = [0, 0]
        counts[0] += prompt
        counts[1] += completion

    def rate_limited(self, key: str | None, limit: str) -> None:
        self.limited.labels(key or "", limit).inc()

    def stream_broken(self, model: str | None, replica: str | None) -> None:
        """Labels stay bounded: both come from the config (a request reaches a replica only after
        its model was found)."""
        m = self._label(model)
        self.streams_broken.labels(m, replica or "").inc()

    def queue_wait(self, model: str | None, seconds: float) -> None:
        self._model(model).queue.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


_LE = [floatToGoString(b) for b in _BUCKETS] + ["+Inf"]  # type: ignore[no-untyped-call]


def _hist_family(name: str, doc: str, items: Iterable[tuple[str, Hist]]) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=["model"])
    for model, h in items:
        fam.add_metric([model], list(zip(_LE, accumulate(h.counts), strict=True)), h.total)
    return fam


class _RequestCollector(Collector):
    """The per-request figures of :class:`Metrics`, read at scrape time (on the event loop, as the
    requests that add to them: no lock)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        models = list(self.metrics.models.items())
        reqs = CounterMetricFamily("teraproxy_requests", "Requests answered, by model and HTTP status code",
                                   labels=["model", "code"])
        for m, pm in models:
            by_code: dict[str, int] = {}  # statuses outside 100..599 are one series, "other"
            for status, n in list(pm.codes.items()):
                code = str(status) if 100 <= status <= 599 else "other"
                by_code[code] = by_code.get(code, 0) + n
            for code, n in by_code.items():
                reqs.add_metric([m, code], n)
        yield reqs
        yield _hist_family("teraproxy_request_duration_seconds", "Time to the last byte",
                           ((m, pm.duration) for m, pm in models))
        yield _hist_family("teraproxy_time_to_first_byte_seconds",
                           "Time until the response was committed (first event of a stream)",
                           ((m, pm.ttfb) for m, pm in models))
        yield _hist_family("teraproxy_queue_wait_seconds",
                           "Time requests spent in the admission queue (part of time to first token)",
                           ((m, pm.queue) for m, pm in models if any(pm.queue.counts)))
        for name, doc, attr in _PER_MODEL_COUNTERS:
            fam = CounterMetricFamily(name, doc, labels=["model"])
            for m, pm in models:
                if getattr(pm, attr):
                    fam.add_metric([m], getattr(pm, attr))
            yield fam
        tokens = CounterMetricFamily("teraproxy_tokens", "Tokens as replicas reported them (a stream that broke "
                                     "before its usage chunk: estimated), by model, key name and kind",
                                     labels=["model", "key", "kind"])
        for (m, k), (prompt, completion) in list(self.metrics.token_counts.items()):
            tokens.add_metric([m, k, "prompt"], prompt)
            tokens.add_metric([m, k, "completion"], completion)
        yield tokens


_PER_MODEL_COUNTERS = (
    ("teraproxy_retries", "Attempts beyond the first, by model", "retries"),
    ("teraproxy_reasoning_frames_rewritten", "Stream frames whose reasoning field was aliased", "rewritten"),
    ("teraproxy_sse_bad_frames", "Frames with a reasoning field that were not valid JSON (passed through)",
     "bad_frames"),
)


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
