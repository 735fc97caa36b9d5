"""What a SIGHUP reload applies beyond the routing table, against a real `teraproxy serve` and real
sims: load scraping switched on and off and its interval, the health interval, max_in_flight and
queue.max (a request already waiting is admitted under the new bound), the upstream pool's
settings, and the keys that need a restart (one warning naming the key, the old value kept)."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import aiohttp
import openai
import pytest

from .conftest import MODEL, Cluster, Replica, free_port, write_config
from .test_service import MSGS, Served, _admin, _raw_stream, _until, serve

pytestmark = pytest.mark.timeout(60)


async def _reload(s: Served, http: aiohttp.ClientSession, n: int, **over: Any) -> None:
    """Rewrite the config with ``over`` (on top of what it was), SIGHUP, wait for reload number ``n``."""
    s.raw = dict(s.raw, **over)
    write_config(s.path, s.raw)
    s.proc.send_signal(signal.SIGHUP)

    async def applied() -> bool:
        return bool((await _admin(http, f"{s.admin}/admin/config"))["reloads"] == n)

    await _until(applied)


async def _report(http: aiohttp.ClientSession, s: Served) -> Any:
    return (await _admin(http, f"{s.admin}/admin/upstreams"))["models"][0]["replicas"][0]["report"]


async def test_reload_switches_load_scraping_on_and_off(cluster: Cluster, tmp_path: Any, procs: list[Any]) -> None:
    r = await cluster.replica()
    s = await serve(tmp_path, {MODEL: [r]}, procs, load={"enabled": False})
    async with aiohttp.ClientSession() as http:
        await asyncio.sleep(0.5)
        assert r.stats.metrics_scrapes == 0 and await _report(http, s) is None
        await _reload(s, http, 1, load={"enabled": True, "interval": "100ms"})

        async def scraped() -> bool:
            return r.stats.metrics_scrapes >= 3 and await _report(http, s) is not None

        await _until(scraped, 5)
        await _reload(s, http, 2, load={"enabled": False})
        await asyncio.sleep(0.2)
        n = r.stats.metrics_scrapes
        await asyncio.sleep(0.6)
        assert r.stats.metrics_scrapes == n  # scraping stopped
        assert await _report(http, s) is None  # and the last report is not shown (nor used) any more


async def test_reload_shortens_load_and_health_intervals(cluster: Cluster, tmp_path: Any, procs: list[Any]) -> None:
    r = await cluster.replica()
    s = await serve(tmp_path, {MODEL: [r]}, procs, load={"interval": "60s"},
                    health={"interval": "60s", "rise": 1, "warmup": False, "timeout": "1s"})
    async with aiohttp.ClientSession() as http:
        await asyncio.sleep(0.4)  # the first health check (within 0.25 s) is done; the next is a minute away
        h0, m0 = r.stats.health_checks, r.stats.metrics_scrapes
        await _reload(s, http, 1, load={"interval": "100ms"},
                      health={"interval": "100ms", "rise": 1, "warmup": False, "timeout": "1s"})

        async def faster() -> bool:
            return r.stats.health_checks >= h0 + 5 and r.stats.metrics_scrapes >= m0 + 5

        await _until(faster, 3)  # with the old intervals: none for a minute


def _capped(r: Replica, cap: int | None) -> list[dict[str, Any]]:
    rep: dict[str, Any] = {"url": r.url}
    if cap is not None:
        rep["max_in_flight"] = cap
    return [{"id": MODEL, "replicas": [rep]}]


async def _queue_full(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as e:
        await client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2)  # type: ignore[arg-type]
    assert e.value.status_code == 503 and e.value.code == "queue_full", e.value


async def test_reload_raises_max_in_flight_and_queue_max(cluster: Cluster, tmp_path: Any, procs: list[Any]) -> None:
    r = await cluster.replica(itl_ms=50, tokens=200)  # a stream holds its slot for 10 s
    s = await serve(tmp_path, {MODEL: [r]}, procs, models=_capped(r, 1), queue={"max": 1, "timeout": "20s"})
    async with aiohttp.ClientSession() as http, \
            openai.AsyncOpenAI(base_url=f"{s.base}/v1", api_key="x", max_retries=0) as client:
        _, w1 = await _raw_stream(s.base)  # takes the one slot
        waiting = asyncio.create_task(client.chat.completions.create(
            model=MODEL, messages=MSGS, max_tokens=2))  # type: ignore[call-overload]
        await _until(lambda: _depth(http, s, 1))
        await _queue_full(client)  # the queue's one place is taken
        t0 = time.monotonic()
        await _reload(s, http, 1, models=_capped(r, 3), queue={"max": 2, "timeout": "20s"})
        done = await asyncio.wait_for(waiting, 5)  # admitted under the new cap, not when the stream ends
        assert done.choices[0].finish_reason == "length" and time.monotonic() - t0 < 3
        _, w2 = await _raw_stream(s.base)
        _, w3 = await _raw_stream(s.base)  # three streams: the new cap is reached
        queued = [asyncio.create_task(client.chat.completions.create(
            model=MODEL, messages=MSGS, max_tokens=2)) for _ in range(2)]  # type: ignore[call-overload]
        await _until(lambda: _depth(http, s, 2))
        await _queue_full(client)  # the new queue bound: two wait, the third is refused
        for w in (w1, w2, w3):
            w.close()
        for q in queued:
            assert (await asyncio.wait_for(q, 10)).choices[0].finish_reason == "length"


async def test_reload_removing_max_in_flight_releases_the_queue(cluster: Cluster, tmp_path: Any,
                                                                 procs: list[Any]) -> None:
    r = await cluster.replica(itl_ms=50, tokens=200)
    s = await serve(tmp_path, {MODEL: [r]}, procs, models=_capped(r, 1), queue={"max": 5, "timeout": "20s"})
    async with aiohttp.ClientSession() as http, \
            openai.AsyncOpenAI(base_url=f"{s.base}/v1", api_key="x", max_retries=0) as client:
        _, w = await _raw_stream(s.base)
        waiting = asyncio.create_task(client.chat.completions.create(
            model=MODEL, messages=MSGS, max_tokens=2))  # type: ignore[call-overload]
        await _until(lambda: _depth(http, s, 1))
        await _reload(s, http, 1, models=_capped(r, None))
        done = await asyncio.wait_for(waiting, 3)  # no cap any more: it goes at once
        assert done.choices[0].finish_reason == "length"
        w.close()


async def _depth(http: aiohttp.ClientSession, s: Served, n: int) -> bool:
    async with http.get(f"{s.admin}/metrics") as resp:
        text = await resp.text()
    return f'teraproxy_queue_depth{{model="{MODEL}"}} {float(n)}' in text


async def test_reload_applies_upstream_pool_settings(cluster: Cluster, tmp_path: Any, procs: list[Any]) -> None:
    r = await cluster.replica(itl_ms=50, tokens=200)
    s = await serve(tmp_path, {MODEL: [r]}, procs, upstream={"max_connections": 1},
                    timeouts={"connect": "300ms"})
    async with aiohttp.ClientSession() as http, \
            openai.AsyncOpenAI(base_url=f"{s.base}/v1", api_key="x", max_retries=0) as client:
        _, w = await _raw_stream(s.base)  # holds the one upstream connection
        with pytest.raises(openai.APIStatusError) as e:
            await client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2)  # type: ignore[arg-type]
        assert e.value.status_code == 503 and "upstream.max_connections" in str(e.value)
        await _reload(s, http, 1, upstream={"max_connections": 8})
        done = await client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2)  # type: ignore
        assert done.choices[0].finish_reason == "length"
        w.close()


async def test_restart_only_keys_warn_once_and_keep_their_value(cluster: Cluster, tmp_path: Any,
                                                                 procs: list[Any]) -> None:
    r = await cluster.replica()
    s = await serve(tmp_path, {MODEL: [r]}, procs)
    old_listen = s.raw["listen"]
    async with aiohttp.ClientSession() as http:
        await _reload(s, http, 1, listen=f"127.0.0.1:{free_port()}", timeouts={"keepalive": "3s"},
                      log={"access_log": True}, ratelimit={"backend": "redis", "redis_url": "redis://127.0.0.1:1"})
        async with openai.AsyncOpenAI(base_url=f"http://{old_listen}/v1", api_key="x", max_retries=0) as client:
            done = await client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2)  # type: ignore
            assert done.choices[0].finish_reason == "length"  # still served on the old address
    err = s.stderr()
    for key in ("listen", "timeouts.keepalive", "log.access_log", "ratelimit.backend"):
        assert err.count(f"reload: {key}: changed from ") == 1, (key, err)
    assert "ratelimit.redis_url: changed from " in err
