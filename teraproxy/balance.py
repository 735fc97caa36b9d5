"""Picking a replica for one attempt.

Candidates are replicas that are up, whose breaker lets a request through and that are below their
``max_in_flight``. Default: power of two choices on the load score below; a random draw breaks ties
and spreads load without a global scan bias (several proxies with the same stale view do not herd
onto one replica). ``affinity``: weighted rendezvous hashing on a session key, so the same key goes
to the same replica while it is healthy and only a lost replica's share moves; a saturated replica
(its fresh report shows waiting requests or a full KV cache) is skipped while another is not.

Load score: ``(demand + 1) × (1 + kv) / effective weight``. ``demand`` is this proxy's in-flight
count, or with a fresh load report (loadreport.py) the replica's own running + waiting plus the
change in this proxy's in-flight count since the report (what we sent since, minus what finished) —
never less than our own in-flight count. ``kv`` is the reported KV-cache usage (0..1), so a replica
whose cache is full counts double. A stale or missing report falls back to local counts.

Speed: when both sampled replicas have fresh reports with a measured drain rate (completions per
second while saturated, from vLLM's ``vllm:request_success_total`` between scrapes; loadreport.py),
they are compared by the expected wait before a new request starts: the requests that must finish
first, ``demand + 1 − slots`` (none while a slot is free), divided by the rate. A free slot beats any
queue; between two queues the one shorter in time wins, so a replica twice as slow gets a queue half
as long in count — and only the queue, not its running requests, counts: those on the slow replica
take twice as long, but they delay a new request only through the rate. Dividing all of demand by
the rate (Little's law, the residence time) would hand the fast replica the longer queue and the
longer TTFT. Both with a free slot (or no rate): the count score above decides. Slow start still
scales the rate down.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import deque
from collections.abc import Callable, Sequence

from teraproxy.loadreport import LoadReport
from teraproxy.upstreams import Replica

SATURATED_KV = 0.95


def _fresh(r: Replica, now: float) -> LoadReport | None:
    rep = r.report
    return rep if rep is not None and now - rep.at <= r.stale_after else None


def _reported(r: Replica, rep: LoadReport) -> int:
    """The replica's own running + waiting, plus what this proxy sent (or finished) since the report;
    never less than this proxy's own in-flight count."""
    return max(r.in_flight, rep.running + rep.waiting + r.in_flight - rep.in_flight)


def demand(r: Replica, now: float) -> int:
    rep = _fresh(r, now)
    return r.in_flight if rep is None else _reported(r, rep)


def _load(r: Replica, now: float) -> float:
    rep = _fresh(r, now)
    if rep is None:
        return (r.in_flight + 1) / r.effective_weight(now)
    return (_reported(r, rep) + 1) * (1.0 + (rep.kv or 0.0)) / r.effective_weight(now)


def _wait(r: Replica, now: float) -> float:
    """Expected wait before one more request starts: the requests ahead of it / the drain rate."""
    rep = r.report
    assert rep is not None and rep.rate is not None
    ahead = _reported(r, rep) + 1 - rep.slots
    if ahead <= 0:
        return 0.0  # a slot is free
    if rep.rate <= 0:
        return math.inf  # saturated and finishing nothing: stuck (its next report tells)
    return ahead / (rep.rate * r.effective_weight(now) / r.weight)


def _rated(r: Replica, now: float) -> bool:
    rep = _fresh(r, now)
    return rep is not None and rep.rate is not None


def saturated(r: Replica, now: float) -> bool:
    rep = _fresh(r, now)
    return rep is not None and (rep.waiting > 0 or (rep.kv or 0.0) >= SATURATED_KV)


def pick(replicas: Sequence[Replica], exclude: Sequence[Replica], now: float,
         rng: random.Random, key: str | None = None, *, model: str) -> Replica | None:
    """A replica of ``model``'s pool for the next attempt, or None if none may take it."""
    cands = [r for r in replicas if r.in_flight < r.max_in_flight and r.available(model) and r not in exclude]
    if not cands:
        return None
    if len(cands) == 1:
        return cands[0]
    if key is not None:
        free = [r for r in cands if not saturated(r, now)]
        return max(free or cands, key=lambda r: _rendezvous(key, r, now))
    a, b = rng.sample(cands, 2)
    if _rated(a, now) and _rated(b, now):  # both measured: compare expected waits, so speed counts
        ta, tb = _wait(a, now), _wait(b, now)
        if ta != tb:
            return a if ta < tb else b
    la, lb = _load(a, now), _load(b, now)
    if la == lb:
        # p2c over two samples misses a clearly idle third replica only rarely; a full scan
        # is cheap at pool sizes seen in practice and makes ties deterministic-by-load.
        best = min(_load(r, now) for r in cands)
        ties = [r for r in cands if _load(r, now) == best]
        return ties[0] if len(ties) == 1 else rng.choice(ties)
    return a if la < lb else b


def _rendezvous(key: str, r: Replica, now: float) -> float:
    h = hashlib.blake2b(f"{key}\x00{r.url}".encode(), digest_size=8).digest()
    u = (int.from_bytes(h, "big") + 0.5) / 2.0**64  # uniform in (0, 1)
    return -r.effective_weight(now) / math.log(u)


class RetryBudget:
    """At most ``ratio`` of the requests in the last ``window`` seconds may be retries, but never
    fewer than ``floor`` retries per window: a quiet proxy must still retry around a failing replica
    until its breaker opens (breaker.failures), or a single outage would reach the clients.

    Requests are counted in ``SLICES`` slices of the window (one integer add per request, not a
    timestamp each), so the window slides in steps of a tenth of its length."""

    SLICES = 10
    __slots__ = ("_reqs", "_retries", "clock", "floor", "ratio", "window")

    def __init__(self, ratio: float, window: float, clock: Callable[[], float], floor: int = 10) -> None:
        self.ratio = ratio
        self.window = window
        self.floor = floor
        self.clock = clock
        self._reqs: deque[list[int]] = deque()  # [slice number, count], oldest first
        self._retries: deque[list[int]] = deque()

    def _add(self, q: deque[list[int]], now: float) -> None:
        n = int(now * self.SLICES / self.window)
        if q and q[-1][0] == n:
            q[-1][1] += 1
            return
        q.append([n, 1])
        while q[0][0] <= n - self.SLICES:  # out of the window
            q.popleft()

    def _count(self, q: deque[list[int]], now: float) -> int:
        edge = int(now * self.SLICES / self.window) - self.SLICES
        while q and q[0][0] <= edge:
            q.popleft()
        return sum(c for _, c in q)

    def request(self) -> None:
        self._add(self._reqs, self.clock())

    def configure(self, ratio: float, window: float) -> None:
        """A reload's settings; the counts are kept unless the window (the slices' size) changes."""
        if window != self.window:
            self._reqs.clear()
            self._retries.clear()
        self.ratio, self.window = ratio, window

    def try_retry(self) -> bool:
        now = self.clock()
        if self._count(self._retries, now) >= max(self.floor, self.ratio * self._count(self._reqs, now)):
            return False
        self._add(self._retries, now)
        return True
