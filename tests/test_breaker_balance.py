"""The pure cores of routing: circuit breaker, replica choice, retry budget (fake clock)."""

from __future__ import annotations

import random
from collections import Counter

from teraproxy.balance import RetryBudget, pick
from teraproxy.breaker import ALLOWED, CLOSED, DENIED, HALF_OPEN, OPEN, Breaker, is_probe
from teraproxy.config import parse_config
from teraproxy.upstreams import build_table


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_breaker_opens_half_opens_and_backs_off() -> None:
    c = Clock()
    b = Breaker(failures=3, open_s=10, max_open_s=25, clock=c)
    for _ in range(2):
        b.record(False)
    assert b.state == CLOSED
    b.record(True)  # a success resets the count: failures must be consecutive
    for _ in range(3):
        assert b.acquire() == ALLOWED
        b.record(False)
    assert b.state == OPEN and not b.available() and b.acquire() == DENIED and b.retry_in() == 10
    c.t += 10
    assert b.state == HALF_OPEN and b.available()
    p1 = b.acquire()
    assert is_probe(p1)  # the one probe
    assert b.acquire() == DENIED and not b.available()  # exactly one
    b.record(False, p1)  # probe failed: open twice as long
    assert b.state == OPEN and b.retry_in() == 20
    c.t += 20
    p2 = b.acquire()
    assert is_probe(p2)
    b.record(False, p2)
    assert b.retry_in() == 25  # capped at max_open
    c.t += 25
    p3 = b.acquire()
    assert is_probe(p3)
    b.release(p3)  # probe ended without a verdict (client left): slot free again
    p4 = b.acquire()
    assert is_probe(p4)
    b.record(True, p4)
    assert b.state == CLOSED and b.acquire() == ALLOWED and b.acquire() == ALLOWED


def test_only_the_probe_decides_half_open() -> None:
    c = Clock()
    b = Breaker(failures=1, open_s=10, max_open_s=60, clock=c)
    old = b.acquire()  # a request sent while closed...
    b.record(False)  # ...another one trips the breaker
    c.t += 10
    probe = b.acquire()
    assert old == ALLOWED and is_probe(probe)
    b.release(old)  # the old request's client leaves: the probe keeps its slot
    assert b.acquire() == DENIED
    b.record(False, old)  # the old request fails late: not the probe's verdict
    assert b.state == HALF_OPEN and b.retry_in() == 0
    b.record(True, old)  # nor is a late success
    assert b.state == HALF_OPEN
    b.record(True, probe)
    assert b.state == CLOSED


def test_close_is_a_trial_passed_elsewhere() -> None:
    c = Clock()
    b = Breaker(failures=2, open_s=10, max_open_s=60, clock=c)
    b.record(False)
    b.close()  # e.g. the health check's warm-up generation succeeded
    b.record(False)
    assert b.state == CLOSED  # the failure count was cleared too
    b.record(False)
    c.t += 10
    probe = b.acquire()
    assert is_probe(probe) and b.trial_in_flight() and not b.available()
    b.close()  # closed while the probe is out: everyone may go, the probe ends as an ordinary request
    assert b.state == CLOSED and not b.trial_in_flight() and b.acquire() == ALLOWED
    b.record(False, probe)
    assert b.state == CLOSED  # one failure, not a failed trial


def test_a_probe_that_outlived_its_trial_does_not_judge_the_next_one() -> None:
    """close() while a probe is out, a new trip, a new trial: the old probe's late verdict is not the
    new trial's (it was counted as the new trial's when every probe's grant was the same PROBE)."""
    c = Clock()
    b = Breaker(failures=1, open_s=10, max_open_s=60, clock=c)
    b.record(False)
    c.t += 10
    old = b.acquire()
    b.close()  # the health check's warm-up passed meanwhile
    b.record(False)  # and the replica failed again: open
    c.t += 10
    new = b.acquire()
    assert is_probe(old) and is_probe(new) and old != new
    b.record(True, old)  # the old probe finally answers
    assert b.state == HALF_OPEN and b.trial_in_flight()  # still waiting for the new trial's verdict
    b.record(False, old)
    assert b.state == HALF_OPEN and b.retry_in() == 0
    b.record(False, new)
    assert b.state == OPEN and b.retry_in() == 20


def test_late_failure_of_old_request_does_not_extend_open() -> None:
    c = Clock()
    b = Breaker(failures=1, open_s=5, max_open_s=60, clock=c)
    b.record(False)
    c.t += 1
    b.record(False)  # a request sent before the trip, failing late
    assert b.retry_in() == 4


def _pool(n: int, weights: list[float] | None = None, slow_start: float = 0) -> list:  # type: ignore[type-arg]
    raw = {"listen": "127.0.0.1:1", "auth": "off", "health": {"enabled": False, "slow_start": slow_start},
           "models": [{"id": "m", "replicas": [{"url": f"http://127.0.0.1:{9000 + i}",
                                                 "weight": (weights or [1] * n)[i]} for i in range(n)]}]}
    return list(build_table(parse_config(raw))["m"].replicas)


def test_pick_least_in_flight_and_exclusions() -> None:
    reps = _pool(3)
    rng = random.Random(1)
    reps[0].in_flight, reps[1].in_flight, reps[2].in_flight = 5, 0, 5
    assert Counter(pick(reps, [], 0, rng, model="m").url for _ in range(200)) == {reps[1].url: 200}  # type: ignore[union-attr]
    assert pick(reps, [reps[1]], 0, rng, model="m") in (reps[0], reps[2])
    assert pick(reps, reps, 0, rng, model="m") is None
    reps[1].mark_down("test")
    assert pick(reps, [], 0, rng, model="m") in (reps[0], reps[2])
    for r in reps:
        r.breaker.record(False)
        r.breaker.record(False)
        r.breaker.record(False)
        r.breaker.record(False)
        r.breaker.record(False)
    assert pick(reps, [], 0, rng, model="m") is None  # every breaker open


def test_pick_ties_random_and_weights() -> None:
    reps = _pool(2)
    rng = random.Random(7)
    counts = Counter(pick(reps, [], 0, rng, model="m").url for _ in range(1000))  # type: ignore[union-attr]
    assert 400 < counts[reps[0].url] < 600  # ties broken at random
    heavy = _pool(2, weights=[3, 1])
    heavy[0].in_flight, heavy[1].in_flight = 2, 1  # (2+1)/3 < (1+1)/1: the heavy one still wins
    assert pick(heavy, [], 0, rng, model="m") is heavy[0]


def test_slow_start_ramps_weight() -> None:
    reps = _pool(1, slow_start=10)
    r = reps[0]
    assert r.effective_weight(0.0) == 1  # there at start-up: full weight at once
    r.mark_up(100.0)  # back from down: ramps
    assert r.effective_weight(100.0) == 0.1 and r.effective_weight(105.0) == 0.5 and r.effective_weight(111) == 1


def test_affinity_sticks_and_only_lost_share_moves() -> None:
    reps = _pool(4)
    rng = random.Random(3)
    keys = [f"session-{i}" for i in range(400)]
    before = {k: pick(reps, [], 0, rng, key=k, model="m") for k in keys}
    assert all(pick(reps, [], 0, rng, key=k, model="m") is before[k] for k in keys)  # sticky
    share = Counter(r.url for r in before.values() if r)
    assert all(60 < n < 140 for n in share.values()), share  # spread
    lost = reps[2]
    lost.mark_down("gone")
    after = {k: pick(reps, [], 0, rng, key=k, model="m") for k in keys}
    moved = [k for k in keys if after[k] is not before[k]]
    assert moved and all(before[k] is lost for k in moved)  # only the lost replica's keys moved
    assert all(after[k] is not lost for k in keys)


def test_retry_budget() -> None:
    c = Clock()
    b = RetryBudget(ratio=0.2, window=10, clock=c, floor=2)
    assert b.try_retry() and b.try_retry() and not b.try_retry()  # floor with no traffic
    for _ in range(50):
        b.request()
    assert sum(b.try_retry() for _ in range(20)) == 8  # 20% of 50 = 10, 2 already used
    c.t += 11  # window passes
    assert b.try_retry()
