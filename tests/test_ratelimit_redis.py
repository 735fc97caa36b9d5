"""RedisLimiter against a real redis-server: the same limits as memory, shared, leased, and failing safe."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from teraproxy.ratelimit import BACKEND, IN_FLIGHT, REQUESTS, TOKENS, KeyLimits
from teraproxy.ratelimit_redis import RedisLimiter
from tests.redisd import RedisServer


@pytest.fixture
async def make(redis_server: RedisServer) -> AsyncIterator[object]:
    made: list[RedisLimiter] = []

    def new(limits: dict[str, KeyLimits], **kw: object) -> RedisLimiter:
        kw.setdefault("timeout", 2.0)  # generous: these tests check arithmetic, not deadlines
        lim = RedisLimiter(redis_server.url, limits, **kw)  # type: ignore[arg-type]
        made.append(lim)
        return lim

    yield new
    for lim in made:
        await lim.close()


async def test_burst_of_the_limit_across_two_instances(make) -> None:  # type: ignore[no-untyped-def]
    k = KeyLimits(requests_per_minute=50)
    a, b = make({"k": k}), make({"k": k})
    results = await asyncio.gather(*(lim.admit("k", k) for lim in (a, b) * 100))
    assert sum(d.allowed for d in results) == 50  # one limit for both: the scripts are atomic
    denied = next(d for d in results if not d.allowed)
    assert denied.denied_by == REQUESTS and 0 < denied.retry_after <= 1.2 + 0.01
    assert denied.headers()["x-ratelimit-remaining-requests"] == "0"
    first = min((d for d in results if d.allowed), key=lambda d: -d.remaining_requests)
    assert first.remaining_requests == 49 and first.headers()["x-ratelimit-reset-requests"] in ("2s", "1s")


async def test_tokens_charged_on_finish_are_shared(make) -> None:  # type: ignore[no-untyped-def]
    k = KeyLimits(tokens_per_minute=600)
    a, b = make({"k": k}), make({"k": k})
    d = await a.admit("k", k)
    assert d.allowed and d.remaining_tokens == 600
    a.finish("k", d, 6000)
    await a.drain(2)  # the charge is sent after the answer, in the background
    d2 = await b.admit("k", k)
    assert d2.denied_by == TOKENS and 530 <= d2.retry_after <= 541  # 5400 below zero at 10 tokens/s
    assert d2.headers()["x-ratelimit-reset-tokens"] in ("10m0s", "9m59s", "9m58s")


async def test_in_flight_leases_and_a_killed_instance(make, redis_server: RedisServer) -> None:  # type: ignore[no-untyped-def]
    k = KeyLimits(max_in_flight=2)
    dead = make({"k": k}, lease_ttl=1.0)
    live = make({"k": k}, lease_ttl=1.0)
    d1, d2 = await dead.admit("k", k), await dead.admit("k", k)
    assert d1.allowed and d2.allowed
    assert (await live.admit("k", k)).denied_by == IN_FLIGHT
    dead._renewer.cancel()  # type: ignore[union-attr]  # the instance "dies": nothing renews, nothing finishes
    # its leases expire after lease_ttl; the live instance's own lease is renewed past it
    for _ in range(100):
        d = await live.admit("k", k)
        if d.allowed:
            break
        await asyncio.sleep(0.05)
    assert d.allowed
    await asyncio.sleep(1.5)  # longer than lease_ttl: renewal keeps the live lease
    # count the leases still live by Redis's clock (expired ones stay in the set until the next admission
    # prunes them, and the two dead ones need not have expired in the same admission attempt)
    assert _live_leases(redis_server, "tp:{k}:if") == 1
    live.finish("k", d, 0)
    await live.drain(2)
    assert redis_server.command("ZCARD", "tp:{k}:if").strip() == b":0"


def _live_leases(redis_server: RedisServer, key: str) -> int:
    """Leases whose expiry (score, in µs of Redis's TIME) is still ahead."""
    t = redis_server.command("TIME").split(b"\r\n")  # *2, $len, seconds, $len, micros
    now = int(t[2]) * 1_000_000 + int(t[4])
    reply = redis_server.command("ZCOUNT", key, f"({now}", "+inf")
    return int(reply.strip().lstrip(b":"))


async def test_redis_state_expires(make, redis_server: RedisServer) -> None:  # type: ignore[no-untyped-def]
    k = KeyLimits(requests_per_minute=6000)
    lim = make({"k": k})
    assert (await lim.admit("k", k)).allowed
    ttl = int(redis_server.command("PTTL", "tp:{k}").strip()[1:])
    assert 0 < ttl <= 1010  # full again after 10 ms (+1 s slack): Redis memory does not grow with time


async def test_outage_allow_then_recover(make, redis_server: RedisServer,  # type: ignore[no-untyped-def]
                                         caplog: pytest.LogCaptureFixture) -> None:
    k = KeyLimits(requests_per_minute=2)
    lim = make({"k": k}, timeout=0.05, retry_after=0.2)
    assert (await lim.admit("k", k)).allowed
    redis_server.kill()
    with caplog.at_level(logging.WARNING, "teraproxy.ratelimit"):
        outcomes = [await lim.admit("k", k) for _ in range(20)]
    assert all(d.allowed for d in outcomes) and all(d.headers() == {} for d in outcomes)
    assert lim.errors == 20
    assert len([r for r in caplog.records if "rate-limit backend" in r.getMessage()]) == 1
    redis_server.start()  # empty again, as a restarted cache is
    await asyncio.sleep(0.25)
    a, b, c = [await lim.admit("k", k) for _ in range(3)]
    assert a.allowed and b.allowed and c.denied_by == REQUESTS  # limits enforced again, by itself


async def test_outage_deny(make, redis_server: RedisServer) -> None:  # type: ignore[no-untyped-def]
    k = KeyLimits(requests_per_minute=100)
    lim = make({"k": k}, on_error_allow=False, timeout=0.05, retry_after=0.2)
    redis_server.kill()
    d = await lim.admit("k", k)
    assert d.denied_by == BACKEND and not d.allowed
    redis_server.start()
    await asyncio.sleep(0.25)
    assert (await lim.admit("k", k)).allowed


async def test_a_hung_redis_costs_at_most_the_timeout(make, redis_server: RedisServer) -> None:  # type: ignore[no-untyped-def]
    """SIGSTOP stands for a Redis that accepts but never answers: the call gives up after its deadline."""
    import os
    import signal
    import time

    k = KeyLimits(requests_per_minute=100)
    lim = make({"k": k}, timeout=0.05)
    assert (await lim.admit("k", k)).allowed  # connected
    assert redis_server.proc is not None
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        d = await lim.admit("k", k)
        took = time.monotonic() - t0
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    assert d.allowed and lim.errors == 1
    assert took < 1.0  # bounded by the deadline (50 ms), with room for a loaded machine


async def test_unlimited_keys_never_touch_redis(make, redis_server: RedisServer) -> None:  # type: ignore[no-untyped-def]
    lim = make({"free": KeyLimits()})
    redis_server.kill()
    assert (await lim.admit("free", KeyLimits())).allowed and lim.errors == 0
