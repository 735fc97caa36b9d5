"""Picking a replica for one attempt.

Default: power of two choices on (in flight + 1) / effective weight among replicas that are up
and whose breaker lets a request through; a random draw breaks ties and spreads load without a
global scan bias. ``affinity``: weighted rendezvous hashing on a session key, so the same key
goes to the same replica while it is healthy and only a lost replica's share moves.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import deque
from collections.abc import Callable, Sequence

from teraproxy.upstreams import Replica


def _load(r: Replica, now: float) -> float:
    return (r.in_flight + 1) / r.effective_weight(now)


def pick(replicas: Sequence[Replica], exclude: Sequence[Replica], now: float,
         rng: random.Random, key: str | None = None) -> Replica | None:
    cands = [r for r in replicas if r.available() and r not in exclude]
    if not cands:
        return None
    if len(cands) == 1:
        return cands[0]
    if key is not None:
        return max(cands, key=lambda r: _rendezvous(key, r, now))
    a, b = rng.sample(cands, 2)
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
    until its breaker opens (breaker.failures), or a single outage would reach the clients."""

    __slots__ = ("_reqs", "_retries", "clock", "floor", "ratio", "window")

    def __init__(self, ratio: float, window: float, clock: Callable[[], float], floor: int = 10) -> None:
        self.ratio = ratio
        self.window = window
        self.floor = floor
        self.clock = clock
        self._reqs: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _trim(self, now: float) -> None:
        edge = now - self.window
        for q in (self._reqs, self._retries):
            while q and q[0] < edge:
                q.popleft()

    def request(self) -> None:
        now = self.clock()
        self._reqs.append(now)
        if len(self._reqs) > 4096:
            self._trim(now)

    def try_retry(self) -> bool:
        now = self.clock()
        self._trim(now)
        if len(self._retries) >= max(self.floor, self.ratio * len(self._reqs)):
            return False
        self._retries.append(now)
        return True
