"""The limiters' arithmetic with a fake clock: GCRA bursts and refill, token buckets, in-flight caps."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teraproxy.ratelimit import (
    IN_FLIGHT,
    REQUESTS,
    TOKENS,
    KeyLimits,
    MemoryLimiter,
    format_reset,
    refill,
    retry_after_header,
)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def limiter(**limits: int) -> tuple[MemoryLimiter, KeyLimits, Clock]:
    clock = Clock()
    lim = KeyLimits(**limits)
    return MemoryLimiter({"k": lim, "free": KeyLimits()}, clock), lim, clock


@pytest.mark.parametrize("rpm", [1, 7, 50, 60, 600, 100000])
def test_a_burst_of_exactly_the_per_minute_figure_is_admitted(rpm: int) -> None:
    lim, k, _ = limiter(requests_per_minute=rpm)
    results = [lim.admit_now("k", k) for _ in range(rpm + 5)]
    assert sum(d.allowed for d in results) == rpm
    assert all(d.allowed for d in results[:rpm])
    assert [d.remaining_requests for d in results[:3]] == [rpm - 1, max(0, rpm - 2), max(0, rpm - 3)][:3]
    denied = results[rpm]
    assert denied.denied_by == REQUESTS and math.isclose(denied.retry_after, 60 / rpm, rel_tol=1e-6)


def test_refill_is_smooth_not_a_window_edge() -> None:
    lim, k, clock = limiter(requests_per_minute=60)
    assert sum(lim.admit_now("k", k).allowed for _ in range(60)) == 60
    clock.t += 0.999
    assert not lim.admit_now("k", k).allowed
    clock.t += 0.002  # one second after the burst: exactly one more
    assert lim.admit_now("k", k).allowed
    assert not lim.admit_now("k", k).allowed
    clock.t += 30  # half a minute: half the budget, never a fresh full window (no 2x at an edge)
    assert sum(lim.admit_now("k", k).allowed for _ in range(100)) == 30


@settings(max_examples=200, deadline=None)
@given(rpm=st.integers(1, 1000), gaps=st.lists(st.floats(0, 5), min_size=1, max_size=300))
def test_no_window_ever_holds_more_than_a_burst_plus_the_refill(rpm: int, gaps: list[float]) -> None:
    """Any span of w seconds admits at most L + w*L/60: a burst of L, never 2L at once (no window edge)."""
    lim, k, clock = limiter(requests_per_minute=rpm)
    admitted: list[float] = []
    for g in gaps:
        clock.t += g
        if lim.admit_now("k", k).allowed:
            admitted.append(clock.t)
    for i, t0 in enumerate(admitted):
        for j in range(i, len(admitted)):
            assert j - i + 1 <= rpm + (admitted[j] - t0) * rpm / 60 + 1e-6


def test_a_denied_request_consumes_nothing() -> None:
    lim, k, _ = limiter(requests_per_minute=2, max_in_flight=1)
    a = lim.admit_now("k", k)
    assert a.allowed
    b = lim.admit_now("k", k)
    assert b.denied_by == IN_FLIGHT and b.remaining_requests == 1  # the cap refused it: rpm untouched
    lim.finish("k", a, 0)
    assert lim.admit_now("k", k).allowed  # the second request of the minute is still there


def test_in_flight_cap_and_release_exactly_once() -> None:
    lim, k, _ = limiter(max_in_flight=2)
    a, b = lim.admit_now("k", k), lim.admit_now("k", k)
    c = lim.admit_now("k", k)
    assert a.allowed and b.allowed and c.denied_by == IN_FLIGHT
    lim.finish("k", a, 0)
    lim.finish("k", a, 0)  # a second finish gives nothing back twice
    lim.finish("k", c, 0)  # a denied decision has nothing to give back
    assert lim.in_flight("k") == 1
    assert lim.admit_now("k", k).allowed
    assert not lim.admit_now("k", k).allowed


def test_tokens_admit_while_positive_and_charge_on_usage() -> None:
    lim, k, clock = limiter(tokens_per_minute=600)  # 10 tokens a second
    d = lim.admit_now("k", k)
    assert d.allowed and d.remaining_tokens == 600 and d.reset_tokens == 0
    lim.finish("k", d, 1000)  # the bucket goes 400 below zero
    d2 = lim.admit_now("k", k)
    assert d2.denied_by == TOKENS and d2.remaining_tokens == 0
    assert math.isclose(d2.retry_after, 40.0, rel_tol=1e-3)
    assert retry_after_header(d2.retry_after) == "41" or retry_after_header(d2.retry_after) == "40"
    assert format_reset(d2.reset_tokens) == "1m40s"  # 1000 tokens to refill at 10 a second
    clock.t += 40.01
    d3 = lim.admit_now("k", k)
    assert d3.allowed  # positive again: admitted, whatever it will cost
    assert d3.headers()["x-ratelimit-remaining-tokens"] == "0"
    assert d3.headers()["x-ratelimit-limit-tokens"] == "600"


def test_headers_only_for_limits_the_key_has() -> None:
    lim, k, _ = limiter(requests_per_minute=100)
    h = lim.admit_now("k", k).headers()
    assert h == {"x-ratelimit-limit-requests": "100", "x-ratelimit-remaining-requests": "99",
                 "x-ratelimit-reset-requests": "600ms"}
    assert lim.admit_now("free", KeyLimits()).headers() == {}


def test_unknown_keys_get_no_state() -> None:
    lim, k, _ = limiter(requests_per_minute=1)
    for i in range(1000):
        assert lim.admit_now(f"nobody-{i}", k).allowed  # not configured: never limited, never stored
    assert set(lim._state) == {"k"}


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (0.0004, "1ms"), (0.25, "250ms"), (1, "1s"), (1.2, "2s"), (59.5, "1m0s"), (60, "1m0s"),
    (360, "6m0s"), (61, "1m1s"), (3723, "1h2m3s")])
def test_reset_is_written_like_openai(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    assert [retry_after_header(x) for x in (0, 0.01, 1.0, 1.2, 59.0)] == ["1", "1", "1", "2", "59"]


def test_refill() -> None:
    assert refill(0.0, 10.0, 11.0, 60) == 1.0
    assert refill(-5.0, 10.0, 9.0, 60) == -5.0  # a clock that went back refills nothing
    assert refill(50.0, 10.0, 100.0, 60) == 60.0  # capped
