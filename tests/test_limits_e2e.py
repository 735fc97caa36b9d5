"""Keys' limits and usage through a real proxy, real sim replicas and the real openai SDK."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from teraproxy.app import LIVE
from teraproxy.auth import hash_key
from tests.conftest import MODEL, Cluster, openai_client

MSG = [{"role": "user", "content": "hi"}]


def keys(*entries: tuple[str, str, dict[str, Any]]) -> dict[str, Any]:
    return {"keys": [{"name": name, "sha256": hash_key(secret), **extra} for secret, name, extra in entries]}


async def metrics_text(http: aiohttp.ClientSession, admin: str | None) -> str:
    async with http.get(f"{admin}/metrics") as r:
        return await r.text()


async def test_requests_per_minute_through_the_sdk(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    r = await cluster.replica()
    p = await cluster.proxy([r], auth=keys(("sk-a", "team-a", {"requests_per_minute": 2})))
    async with openai_client(p, "sk-a") as c:
        raw = await c.chat.completions.with_raw_response.create(model=MODEL, messages=MSG)
        assert raw.parse().choices[0].message.content
        h = raw.headers
        assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("2", "1")
        assert h["x-ratelimit-reset-requests"] == "30s" and "x-ratelimit-limit-tokens" not in h
        await c.chat.completions.create(model=MODEL, messages=MSG)
        with pytest.raises(openai.RateLimitError) as ei:
            await c.chat.completions.create(model=MODEL, messages=MSG)
    e = ei.value
    assert e.status_code == 429 and e.code == "rate_limit_exceeded" and e.type == "rate_limit_error"
    assert "team-a" in e.message and "requests per minute" in e.message and "limit 2" in e.message
    assert e.response.headers["retry-after"] in ("29", "30")
    assert e.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert e.response.headers["x-ratelimit-reset-requests"] in ("59s", "1m0s")
    assert r.stats.generation_requests == 2  # the refused request cost the replica nothing
    text = await metrics_text(http, p.admin)
    assert 'teraproxy_rate_limited_total{key="team-a",limit="requests"} 1.0' in text
    assert p.access_lines()[-1]["status"] == 429 and p.access_lines()[-1]["error"] == "rate_limit_exceeded"


async def test_invalid_keys_and_refused_models_consume_nothing(cluster: Cluster) -> None:
    r = await cluster.replica()
    p = await cluster.proxy([r], auth=keys(("sk-a", "team-a", {"requests_per_minute": 1, "models": [MODEL]})))
    async with openai_client(p, "sk-wrong") as bad:
        for _ in range(20):
            with pytest.raises(openai.AuthenticationError):
                await bad.chat.completions.create(model=MODEL, messages=MSG)
    async with openai_client(p, "sk-a") as c:
        for _ in range(5):
            with pytest.raises((openai.PermissionDeniedError, openai.NotFoundError)):
                await c.chat.completions.create(model="other/model", messages=MSG)
        await c.chat.completions.create(model=MODEL, messages=MSG)  # the one request of the minute
        with pytest.raises(openai.RateLimitError):
            await c.chat.completions.create(model=MODEL, messages=MSG)
    quota = p.app[LIVE].current.limits
    assert quota is not None and set(quota.limiter._state) == {"team-a"}  # type: ignore[attr-defined]


async def test_a_burst_of_200_at_a_50_per_minute_key(cluster: Cluster) -> None:
    r = await cluster.replica()
    p = await cluster.proxy([r], auth=keys(("sk-a", "team-a", {"requests_per_minute": 50})),
                            log={"access_log": False})

    async def one(c: Any) -> bool:
        try:
            await c.chat.completions.create(model=MODEL, messages=MSG, max_tokens=1)
            return True
        except openai.RateLimitError:
            return False

    async with openai_client(p, "sk-a") as c:
        t0 = time.monotonic()
        results = await asyncio.gather(*(one(c) for _ in range(200)))
        elapsed = time.monotonic() - t0
    admitted = sum(results)
    # exactly the burst, plus what the bucket refilled meanwhile (one per 1.2 s; 0 on a fast machine)
    assert 50 <= admitted <= 50 + int(elapsed / 1.2)
    assert r.stats.generation_requests == admitted


async def test_tokens_per_minute_charged_from_reported_usage(cluster: Cluster) -> None:
    r = await cluster.replica()  # the sim reports 12 prompt + 16 completion tokens
    p = await cluster.proxy([r], auth=keys(("sk-a", "team-a", {"tokens_per_minute": 30})))
    async with openai_client(p, "sk-a") as c:
        first = await c.chat.completions.with_raw_response.create(model=MODEL, messages=MSG)
        assert first.headers["x-ratelimit-limit-tokens"] == "30"
        assert first.headers["x-ratelimit-remaining-tokens"] == "30"
        second = await c.chat.completions.with_raw_response.create(model=MODEL, messages=MSG)
        assert second.headers["x-ratelimit-remaining-tokens"] == "2"  # 30 - 28, admitted while positive
        with pytest.raises(openai.RateLimitError) as ei:
            await c.chat.completions.create(model=MODEL, messages=MSG)
    e = ei.value
    assert "tokens per minute" in e.message and e.code == "rate_limit_exceeded"
    assert 50 <= int(e.response.headers["retry-after"]) <= 53  # 26 below zero at 0.5 tokens/s
    lines = p.access_lines()
    assert [(x["prompt_tokens"], x["completion_tokens"]) for x in lines[:2]] == [(12, 16), (12, 16)]


async def test_stream_usage_asked_for_and_removed(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    r = await cluster.replica(tokens=5)
    p = await cluster.proxy([r], auth=keys(("sk-a", "team-a", {"tokens_per_minute": 100}), ("sk-b", "free", {})))
    body = orjson.dumps({"model": MODEL, "messages": MSG, "stream": True})
    streams = {}
    for secret in ("sk-a", "sk-b"):
        async with http.post(f"{p.v1}/chat/completions", data=body,
                             headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}) as resp:
            assert resp.status == 200
            streams[secret] = await resp.read()
        sent = orjson.loads(r.stats.last_body)
        assert sent.get("stream_options") == ({"include_usage": True} if secret == "sk-a" else None)
    limited, free = streams["sk-a"], streams["sk-b"]
    assert b'"choices":[]' not in limited and b'"usage"' not in limited and limited.endswith(b"data: [DONE]\n\n")
    assert limited.count(b"\n\n") == free.count(b"\n\n")  # the same frames as without the rewrite
    line = p.access_lines()[0]
    assert (line["key"], line["prompt_tokens"], line["completion_tokens"]) == ("team-a", 12, 5)
    async with openai_client(p, "sk-a") as c:
        raw = await c.chat.completions.with_raw_response.create(model=MODEL, messages=MSG, stream=True)
        chunks = [ch async for ch in raw.parse()]
        assert all(ch.choices and ch.usage is None for ch in chunks)
        assert 100 - 17 <= int(raw.headers["x-ratelimit-remaining-tokens"]) < 100  # 17 charged, 1.7/s refilled
        asked = await c.chat.completions.create(model=MODEL, messages=MSG, stream=True,
                                                stream_options={"include_usage": True})
        chunks = [ch async for ch in asked]
        assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 17
    text = await metrics_text(http, p.admin)
    assert 'teraproxy_tokens_total{key="team-a",kind="completion",model="Qwen/Qwen3-8B"} 15.0' in text
    assert 'teraproxy_tokens_total{key="team-a",kind="prompt",model="Qwen/Qwen3-8B"} 36.0' in text


async def test_max_in_flight(cluster: Cluster) -> None:
    r = await cluster.replica(itl_ms=30.0, tokens=20)
    p = await cluster.proxy([r], auth=keys(("sk-a", "team-a", {"max_in_flight": 1})))
    async with openai_client(p, "sk-a") as c:
        stream = await c.chat.completions.create(model=MODEL, messages=MSG, stream=True)
        first = await stream.__anext__()
        assert first.choices
        with pytest.raises(openai.RateLimitError) as ei:
            await c.chat.completions.create(model=MODEL, messages=MSG)
        assert ei.value.code == "too_many_concurrent_requests" and "at most 1 in flight" in ei.value.message
        assert ei.value.response.headers["retry-after"] == "1"
        rest = [ch async for ch in stream]
        assert rest
        await c.chat.completions.create(model=MODEL, messages=MSG)  # the slot was given back


async def test_a_broken_stream_is_charged_an_estimate(cluster: Cluster) -> None:
    r = await cluster.replica(tokens=30)
    r.faults.reset_after = 12  # the replica dies after 12 frames, before its usage chunk
    p = await cluster.proxy([r], auth=keys(("sk-a", "team-a", {"tokens_per_minute": 100000})))
    async with openai_client(p, "sk-a") as c:
        stream = await c.chat.completions.create(model=MODEL, messages=MSG, stream=True)
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass
    line = p.access_lines()[0]
    assert line["tokens_estimated"] is True
    assert line["completion_tokens"] >= 11  # at least one per content frame relayed (12 frames, one is the role)
    assert line["prompt_tokens"] > 0


async def test_unlimited_keys_get_no_headers_but_are_metered(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    r = await cluster.replica()
    p = await cluster.proxy([r], auth=keys(("sk-b", "free", {})))
    async with openai_client(p, "sk-b") as c:
        raw = await c.chat.completions.with_raw_response.create(model=MODEL, messages=MSG)
    assert not [h for h in raw.headers if h.startswith("x-ratelimit")]
    assert orjson.loads(r.stats.last_body).get("stream_options") is None
    text = await metrics_text(http, p.admin)
    assert 'teraproxy_tokens_total{key="free",kind="completion",model="Qwen/Qwen3-8B"} 16.0' in text
    assert "teraproxy_ratelimit_backend_errors_total 0.0" in text


async def test_meter_streams_asks_every_stream(cluster: Cluster) -> None:
    r = await cluster.replica(tokens=4)
    p = await cluster.proxy([r], ratelimit={"meter_streams": True})  # auth: off, no limits anywhere
    async with openai_client(p) as c:
        chunks = [ch async for ch in await c.chat.completions.create(model=MODEL, messages=MSG, stream=True)]
    assert all(ch.choices for ch in chunks)
    assert orjson.loads(r.stats.last_body)["stream_options"] == {"include_usage": True}
    line = p.access_lines()[0]
    assert (line["key"], line["prompt_tokens"], line["completion_tokens"]) == (None, 12, 4)


def test_a_reload_keeps_budgets_and_applies_new_limits() -> None:
    from teraproxy.config import parse_config
    from teraproxy.ratelimit import MemoryLimiter
    from teraproxy.runtime import build

    def config(rpm: int, extra: tuple[tuple[str, str, dict[str, Any]], ...] = ()) -> Any:
        return parse_config({"listen": "127.0.0.1:1", "health": {"enabled": False},
                             "auth": keys(("sk-a", "team-a", {"requests_per_minute": rpm}), *extra),
                             "models": [{"id": MODEL, "replicas": [{"url": "http://127.0.0.1:2"}]}]})

    first = build(config(2))
    assert first.limits is not None
    lim = first.limits.limiter
    assert isinstance(lim, MemoryLimiter)
    assert lim.admit_now("team-a", first.limits.by_key["team-a"]).allowed
    second = build(config(2, (("sk-b", "team-b", {"max_in_flight": 1}),)), previous=first)
    assert second.limits is not None and second.limits.limiter is lim  # one limiter for the process
    a = second.limits.by_key["team-a"]
    assert lim.admit_now("team-a", a).allowed
    assert not lim.admit_now("team-a", a).allowed  # the budget survived the reload: 2 in all, not 2 more
    assert lim.admit_now("team-b", second.limits.by_key["team-b"]).allowed  # a new key got its state
    third = build(config(2), previous=second)
    assert third.limits is not None and set(lim._state) == {"team-a"}  # a removed key's state is dropped
