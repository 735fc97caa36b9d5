"""balance.py with load reports and max_in_flight (pure: replicas from a config, an injected clock)."""

from __future__ import annotations

import random

from teraproxy.balance import demand, pick, saturated
from teraproxy.config import parse_config
from teraproxy.loadreport import LoadReport
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


def test_measured_completion_rates_make_speed_count() -> None:
    fast, slow = _pool(2).replicas
    # the same queue in count, but the slow one finishes half as many requests a second
    fast.report = LoadReport(running=8, waiting=4, kv=1.0, at=0.0, completed=100.0, rate=20.0)
    slow.report = LoadReport(running=8, waiting=4, kv=1.0, at=0.0, completed=50.0, rate=10.0)
    assert _counts((fast, slow), 0.5) == [400, 0]
    # once the fast one's queue is twice as long, expected times are equal: the shorter count decides
    fast.report = LoadReport(running=8, waiting=16, kv=1.0, at=0.0, completed=100.0, rate=20.0)
    assert _counts((fast, slow), 0.5) == [0, 400]
    # an idle replica is best whatever its rate; one that is busy and finishes nothing is avoided
    slow.report = LoadReport(running=0, waiting=0, kv=0.0, at=0.0, completed=50.0, rate=0.0)
    assert _counts((fast, slow), 0.5) == [0, 400]
    slow.report = LoadReport(running=3, waiting=0, kv=0.1, at=0.0, completed=50.0, rate=0.0)
    assert _counts((fast, slow), 0.5) == [400, 0]
    # without a rate for both (a replica that does not export the counter), counts decide
    slow.report = LoadReport(running=0, waiting=0, kv=0.0, at=0.0)
    assert _counts((fast, slow), 0.5) == [0, 400]


def test_rate_is_measured_between_reports_and_survives_a_counter_reset() -> None:
    a = LoadReport(1, 0, None, at=10.0, completed=100.0)
    b = a.followed_by(LoadReport(1, 0, None, at=11.0, completed=120.0))
    assert b.rate == 20.0
    c = b.followed_by(LoadReport(1, 0, None, at=12.0, completed=130.0))
    assert c.rate == 15.0  # smoothed: half the new sample, half the old rate
    restarted = c.followed_by(LoadReport(1, 0, None, at=13.0, completed=3.0))
    assert restarted.rate is None and restarted.completed == 3.0
