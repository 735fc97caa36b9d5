"""balance.py with load reports and max_in_flight (pure: replicas from a config, an injected clock)."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teraproxy.balance import _wait, demand, pick, saturated
from teraproxy.config import parse_config
from teraproxy.loadreport import RATE_TAU, LoadReport
from teraproxy.upstreams import ModelPool, Replica, build_table


def _pool(n: int, **rep: object) -> ModelPool:
    cfg = parse_config({"listen": "127.0.0.1:1", "auth": "off", "health": {"enabled": False},
                        "load": {"interval": 1},
                        "models": [{"id": "m", "replicas": [{"url": f"http://127.0.0.1:{9000 + i}", **rep}
                                                             for i in range(n)]}]})
    return build_table(cfg, clock=lambda: 0.0)["m"]


def _counts(reps: tuple[Replica, ...], now: float, n: int = 400, key: str | None = None) -> list[int]:
    rng = random.Random(7)
    out = [0] * len(reps)
    for _ in range(n):
        r = pick(reps, [], now, rng, key, model="m")
        assert r is not None
        out[reps.index(r)] += 1
    return out


def test_fresh_report_counts_running_waiting_and_our_change_since() -> None:
    a, b = _pool(2).replicas
    a.report = LoadReport(running=10, waiting=30, kv=0.5, at=100.0, in_flight=2)
    a.in_flight = 5  # we sent three more since the report
    assert demand(a, 101.0) == 43
    assert demand(a, 104.0) == 5  # stale after 3 intervals: our own count only
    a.in_flight = 0  # ours finished: never below zero of ours, the replica's view minus what left
    assert demand(a, 101.0) == 38
    assert _counts((a, b), 101.0) == [0, 400]


def test_stale_or_missing_reports_fall_back_to_local_counts() -> None:
    a, b = _pool(2).replicas
    a.report = LoadReport(running=50, waiting=50, kv=1.0, at=0.0)
    counts = _counts((a, b), 10.0)  # the report is 10 s old: ignored, both idle, ties at random
    assert min(counts) > 100


def test_kv_pressure_breaks_equal_queues() -> None:
    a, b = _pool(2).replicas
    a.report = LoadReport(running=4, waiting=0, kv=0.99, at=0.0)
    b.report = LoadReport(running=4, waiting=0, kv=0.1, at=0.0)
    assert _counts((a, b), 0.5) == [0, 400]
    assert saturated(a, 0.5) and not saturated(b, 0.5)


def test_max_in_flight_caps_candidates_and_pool_room() -> None:
    pool = _pool(2, max_in_flight=2)
    a, b = pool.replicas
    assert pool.queue is not None and pool.room() == 4 and not pool.saturated()
    a.in_flight = 2
    assert _counts((a, b), 0.0, 50) == [0, 50] and pool.room() == 2
    b.in_flight = 2
    assert pick(pool.replicas, [], 0.0, random.Random(), model="m") is None
    assert pool.saturated() and pool.room() == 0
    assert _pool(2).queue is None  # no cap anywhere: no queue, nothing to wait for


def test_affinity_keeps_its_replica_unless_saturated() -> None:
    a, b, c = _pool(3).replicas
    home = pick((a, b, c), [], 0.0, random.Random(), "session-1", model="m")
    assert home is not None and all(pick((a, b, c), [], 0.0, random.Random(i), "session-1", model="m") is home
                                    for i in range(20))
    home.report = LoadReport(running=8, waiting=3, kv=0.4, at=0.0)
    moved = pick((a, b, c), [], 0.5, random.Random(), "session-1", model="m")
    assert moved is not None and moved is not home
    for r in (a, b, c):  # all saturated: hashing as before
        r.report = LoadReport(running=8, waiting=3, kv=0.4, at=0.0)
    assert pick((a, b, c), [], 0.5, random.Random(), "session-1", model="m") is home


def test_reload_keeps_the_queue_and_takes_new_caps() -> None:
    from teraproxy.runtime import build

    def raw(cap: int, qmax: int) -> dict[str, object]:
        return {"listen": "127.0.0.1:1", "auth": "off", "health": {"enabled": False}, "queue": {"max": qmax},
                "models": [{"id": "m", "replicas": [{"url": "http://127.0.0.1:9001", "max_in_flight": cap}]}]}

    first = build(parse_config(raw(2, 10)))
    q = first.table["m"].queue
    assert q is not None
    entry = q.q.push("waiting-key")
    second = build(parse_config(raw(5, 20)), previous=first)
    pool = second.table["m"]
    assert pool.queue is q and len(q.q) == 1 and q.q.max_size == 20 and entry is not None
    assert pool.replicas[0].max_in_flight == 5 and q.room() == 5  # the new pool's capacity admits it


def _rep(running: int, waiting: int, rate: float | None, slots: int = 8, in_flight: int = 0) -> LoadReport:
    return LoadReport(running, waiting, 1.0, at=0.0, in_flight=in_flight, completed=0.0, rate=rate, slots=slots)


def test_measured_drain_rates_compare_expected_waits() -> None:
    fast, slow = _pool(2).replicas
    # the same queue in count, but the slow one drains half as many requests a second
    fast.report, slow.report = _rep(8, 4, 20.0), _rep(8, 4, 10.0)
    assert _counts((fast, slow), 0.5) == [400, 0]
    # requests ahead of a new one: fast 8+8+1-8 = 9 (0.45 s), slow 8+4+1-8 = 5 (0.5 s): fast still wins
    fast.report = _rep(8, 8, 20.0)
    assert _counts((fast, slow), 0.5) == [400, 0]
    # fast 13 ahead (0.65 s) against slow's 0.5 s: the slow one, though its queue is shorter only in time
    fast.report = _rep(8, 12, 20.0)
    assert _counts((fast, slow), 0.5) == [0, 400]
    # a free slot beats any queue, whatever the rates; one that is saturated and drains nothing is avoided
    slow.report = _rep(7, 0, 1.0)
    assert _counts((fast, slow), 0.5) == [0, 400]
    slow.report = _rep(8, 2, 0.0)
    assert _counts((fast, slow), 0.5) == [400, 0]
    # what this proxy sent since the report is ahead too: 7 running + 1 sent since fills the last slot
    slow.report = _rep(7, 0, 10.0, in_flight=0)
    slow.in_flight = 1
    assert _wait(slow, 0.5) == 0.1 and _wait(fast, 0.5) == 0.65
    slow.in_flight = 0
    # both with a free slot: the count score decides (7 against 3 running)
    fast.report, slow.report = _rep(7, 0, 20.0), _rep(3, 0, 10.0)
    assert _counts((fast, slow), 0.5) == [0, 400]
    # without a rate for both (a replica that does not export the counter), counts decide
    fast.report, slow.report = _rep(8, 4, 20.0), _rep(8, 2, None)
    assert _counts((fast, slow), 0.5) == [0, 400]


def test_slow_start_scales_the_drain_rate() -> None:
    a, b = _pool(2).replicas
    a.report, b.report = _rep(8, 4, 10.0), _rep(8, 4, 10.0)
    assert _wait(a, 0.5) == _wait(b, 0.5) == 0.5
    a.slow_start, a.up_since = 10.0, 0.0  # just came up: 10% of its weight, so a tenth of its rate
    assert _wait(a, 0.5) == pytest.approx(5.0)
    assert _counts((a, b), 0.5) == [0, 400]


def test_drain_rate_only_from_saturated_intervals_smoothed_and_reset_with_the_counter() -> None:
    a = LoadReport(8, 2, None, at=10.0, completed=100.0, slots=8)
    b = a.followed_by(LoadReport(8, 3, None, at=11.0, completed=120.0, slots=8))
    assert b.rate == 20.0 and b.slots == 8  # waiting at both scrapes: 20/s is its capacity
    c = b.followed_by(LoadReport(8, 1, None, at=12.0, completed=130.0))
    assert c.rate == pytest.approx(20.0 - (1 - math.exp(-1 / RATE_TAU)) * 10.0)  # smoothed over RATE_TAU
    # not saturated at one end: it finished only what it was sent, which says nothing of its speed
    d = c.followed_by(LoadReport(3, 0, None, at=13.0, completed=131.0))
    assert d.rate == c.rate and d.slots == 8  # slots: the running count last seen saturated, or more
    e = d.followed_by(LoadReport(10, 0, None, at=14.0, completed=140.0))
    assert e.rate == c.rate and e.slots == 10
    f = e.followed_by(LoadReport(6, 5, None, at=15.0, completed=150.0))  # saturated at 6 (a full KV cache)
    assert f.slots == 6 and f.rate == c.rate
    # a sample over a long gap weighs more: after RATE_TAU × 5 the old rate is all but forgotten
    g = f.followed_by(LoadReport(6, 5, None, at=15.0 + 5 * RATE_TAU, completed=150.0 + 5 * RATE_TAU * 4))
    assert g.rate == pytest.approx(4.0, rel=0.05)
    restarted = g.followed_by(LoadReport(1, 1, None, at=70.0, completed=3.0))
    assert restarted.rate is None and restarted.completed == 3.0 and restarted.slots == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20), st.floats(0.1, 5.0), st.integers(0, 50)),
                min_size=1, max_size=30))
def test_drain_rate_stays_within_the_saturated_samples(seq: list[tuple[int, int, float, int]]) -> None:
    """Whatever the sequence of scrapes: the rate is None or between the smallest and largest
    completions/s measured over a saturated interval; slots is never negative."""
    rep = LoadReport(0, 0, None, at=0.0, completed=0.0)
    samples: list[float] = []
    for running, waiting, dt, done in seq:
        assert rep.completed is not None
        new = LoadReport(running, waiting, None, at=rep.at + dt, completed=rep.completed + done, slots=running)
        if rep.waiting > 0 and waiting > 0:
            samples.append(done / dt)
        rep = rep.followed_by(new)
        assert rep.slots >= 0
        if rep.rate is None:
            assert not samples
        else:
            assert min(samples) - 1e-9 <= rep.rate <= max(samples) + 1e-9
