"""Load-aware routing and the admission queue end to end: real sims exposing /metrics, a real proxy,
the openai SDK (and raw sockets where a client must vanish)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

import openai
import orjson
import pytest

from teraproxy.app import LIVE
from teraproxy.upstreams import ModelPool
from tests.conftest import MODEL, Cluster, Proxy, openai_client, wait_for

pytestmark = pytest.mark.timeout(60)
MSG = [{"role": "user", "content": "hi"}]


def _pool(p: Proxy) -> ModelPool:
    return p.app[LIVE].current.table[MODEL]


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def _ask(p: Proxy, key: str = "sk-test", **kw: Any) -> Any:
    async with openai_client(p, key) as c:
        return await c.chat.completions.create(model=MODEL, messages=MSG, max_tokens=4, **kw)


async def test_traffic_moves_away_from_a_replica_reporting_a_long_waiting_queue(cluster: Cluster) -> None:
    busy = await cluster.replica()
    idle = await cluster.replica()
    busy.faults.extra_running, busy.faults.extra_waiting = 8, 50  # other clients' load on it
    p = await cluster.proxy([busy, idle], load={"interval": "50ms", "stale_after": "30s"})
    pool = _pool(p)
    await wait_for(lambda: all(r.report is not None for r in pool.replicas))
    async with openai_client(p) as c:
        for _ in range(30):
            await c.chat.completions.create(model=MODEL, messages=MSG)
    assert busy.stats.generation_requests == 0 and idle.stats.generation_requests == 30
    # once its queue has drained (the next reports say so), it takes traffic again
    busy.faults.extra_running = busy.faults.extra_waiting = 0
    await wait_for(lambda: pool.replicas[0].report is not None and pool.replicas[0].report.waiting == 0)
    for _ in range(30):
        await _ask(p)
    assert busy.stats.generation_requests > 0


async def _stream_one(c: Any) -> None:
    s = await c.chat.completions.create(model=MODEL, messages=MSG, stream=True)
    async for _ in s:
        pass


async def _burst(p: Proxy, fast: Any, slow: Any, n: int) -> tuple[int, int]:
    """``n`` streamed requests at once; how many each replica was sent."""
    f0, s0 = fast.stats.generation_requests, slow.stats.generation_requests
    async with openai_client(p) as c:
        await asyncio.gather(*(_stream_one(c) for _ in range(n)))
    return fast.stats.generation_requests - f0, slow.stats.generation_requests - s0


async def test_a_replica_twice_as_fast_is_given_the_longer_queue(cluster: Cluster) -> None:
    """Two sims with 2 slots each, one at half speed. Once both drain rates are measured (a closed
    loop keeps both saturated), a burst of 30 requests is split by expected wait: the fast replica
    gets about 19 of them (its queue twice as long as the slow one's), where counts alone split 15/15."""
    opts: dict[str, Any] = {"max_num_seqs": 2, "ttft_ms": 20, "itl_ms": 10, "tokens": 8}
    fast = await cluster.replica(**opts)
    slow = await cluster.replica(**opts, speed=0.5)
    p = await cluster.proxy([fast, slow], load={"interval": "50ms", "stale_after": "30s"})
    counts_only = await cluster.proxy([fast, slow])
    pool = _pool(p)
    done = asyncio.Event()
    async with openai_client(p) as c:
        async def loop() -> None:
            while not done.is_set():
                await _stream_one(c)
        learners = [asyncio.create_task(loop()) for _ in range(12)]
        await wait_for(lambda: all(r.report is not None and r.report.rate for r in pool.replicas), timeout=15)
        done.set()
        await asyncio.gather(*learners)
    r_fast, r_slow = pool.replicas
    assert r_fast.report is not None and r_slow.report is not None
    assert r_fast.report.rate is not None and r_slow.report.rate is not None
    assert r_fast.report.rate > 1.4 * r_slow.report.rate and r_fast.report.slots == r_slow.report.slots == 2
    await wait_for(lambda: fast.sim.sched.running == slow.sim.sched.running == 0)
    to_fast, to_slow = await _burst(p, fast, slow, 30)
    assert to_fast + to_slow == 30 and to_fast >= 1.4 * to_slow, (to_fast, to_slow)
    # the same burst by counts alone: an even split
    await wait_for(lambda: fast.sim.sched.running == slow.sim.sched.running == 0)
    assert await _burst(counts_only, fast, slow, 30) == (15, 15)


async def test_stale_or_missing_reports_fall_back_to_local_counts(cluster: Cluster) -> None:
    stale = await cluster.replica()
    bare = await cluster.replica(metrics="none")
    stale.faults.extra_waiting = 50
    p = await cluster.proxy([stale, bare], load={"interval": "50ms", "stale_after": "200ms"})
    r_stale, r_bare = _pool(p).replicas
    await wait_for(lambda: r_stale.report is not None and r_stale.report.waiting == 50)
    assert r_bare.report is None
    stale.faults.metrics_status = 500  # its reports stop: the last one (50 waiting) ages out
    await wait_for(lambda: r_stale.report is not None and time.monotonic() - r_stale.report.at > 0.2)
    for _ in range(40):
        await _ask(p)
    # local counts are equal (one request at a time): ties are broken at random, both get traffic
    assert stale.stats.generation_requests > 0 and bare.stats.generation_requests > 0


async def test_affinity_skips_a_saturated_replica(cluster: Cluster) -> None:
    a = await cluster.replica()
    b = await cluster.replica()
    p = await cluster.proxy([a, b], load={"interval": "50ms", "stale_after": "30s"},
                            models=[{"id": MODEL, "policy": "affinity", "replicas": [{"url": a.url}, {"url": b.url}]}])
    pool = _pool(p)
    await wait_for(lambda: all(r.report is not None for r in pool.replicas))
    async with openai_client(p) as c:
        await c.chat.completions.create(model=MODEL, messages=MSG, user="sess-1")
    home, other = (a, b) if a.stats.generation_requests else (b, a)
    home.faults.extra_waiting = 5
    i = pool.replicas.index(next(r for r in pool.replicas if r.url == home.url))
    await wait_for(lambda: (rep := pool.replicas[i].report) is not None and rep.waiting == 5)
    async with openai_client(p) as c:
        for _ in range(3):
            await c.chat.completions.create(model=MODEL, messages=MSG, user="sess-1")
    assert home.stats.generation_requests == 1 and other.stats.generation_requests == 3


async def _hold(p: Proxy, key: str = "sk-test") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw streamed request (3000 tokens) that occupies a slot until its socket is closed; the
    proxy finds the client gone at its next write."""
    body = orjson.dumps({"model": MODEL, "stream": True, "messages": MSG})
    reader, writer = await asyncio.open_connection("127.0.0.1", p.config.listen.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode()
                 + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    return reader, writer


async def test_queue_bounds_full_and_timeout_answer_503(cluster: Cluster) -> None:
    r = await cluster.replica(tokens=3000, itl_ms=20)  # a request without max_tokens holds its slot for 60 s
    p = await cluster.proxy(models=[{"id": MODEL, "replicas": [{"url": r.url, "max_in_flight": 1}]}],
                            queue={"max": 1, "timeout": "300ms"})
    q = _pool(p).queue
    assert q is not None
    _, w = await _hold(p)
    await wait_for(lambda: r.stats.active == 1)
    waiting = asyncio.create_task(_ask(p))
    await wait_for(lambda: len(q.q) == 1)
    with pytest.raises(openai.InternalServerError) as full:
        await _ask(p)
    assert full.value.status_code == 503 and full.value.response.headers["Retry-After"] == "1"
    assert isinstance(full.value.body, dict) and full.value.body["code"] == "queue_full"
    with pytest.raises(openai.InternalServerError) as late:
        await waiting
    assert isinstance(late.value.body, dict) and late.value.body["code"] == "queue_timeout"
    assert late.value.response.headers["Retry-After"] == "1"
    assert r.stats.generation_requests == 1  # neither reached the replica
    lines = [x for x in p.access_lines() if x["error"] == "queue_timeout"]
    assert len(lines) == 1 and lines[0]["queue_ms"] >= 300
    metrics = await _admin_metrics(p)
    assert "teraproxy_queue_wait_seconds_count{model=\"Qwen/Qwen3-8B\"} 1.0" in metrics, metrics
    w.close()
    await w.wait_closed()
    await wait_for(lambda: r.stats.active == 0)  # the client left: the proxy let go of the replica


async def _admin_metrics(p: Proxy) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(f"{p.admin}/metrics") as resp:
        return await resp.text()


async def test_a_queued_client_that_disconnects_leaves_the_queue(cluster: Cluster) -> None:
    r = await cluster.replica(tokens=3000, itl_ms=20)
    p = await cluster.proxy(models=[{"id": MODEL, "replicas": [{"url": r.url, "max_in_flight": 1}]}])
    q = _pool(p).queue
    assert q is not None
    _, w1 = await _hold(p)
    await wait_for(lambda: r.stats.active == 1)
    _, w2 = await _hold(p)
    await wait_for(lambda: len(q.q) == 1)
    assert 'teraproxy_queue_depth{model="Qwen/Qwen3-8B"} 1.0' in await _admin_metrics(p)
    w2.close()
    await w2.wait_closed()
    # at once in effect: probed on its EOF and again PROBE_SOON later (1 s apart, it took 2 s)
    took = await wait_for(lambda: len(q.q) == 0, timeout=5.0)
    assert took < 1.5, took
    # the slot is still the first request's; when it leaves, the next one runs at once
    w1.close()
    await w1.wait_closed()
    await wait_for(lambda: r.stats.active == 0)
    reply = await _ask(p)
    assert reply.choices[0].message.content
    assert r.stats.generation_requests == 2 and q.reserved == 0


async def test_fair_order_across_keys_and_priorities_without_starvation(cluster: Cluster) -> None:
    r = await cluster.replica(ttft_ms=20, tokens=3000, itl_ms=5)
    keys = [{"name": "flood", "sha256": _sha("sk-flood")}, {"name": "solo", "sha256": _sha("sk-solo")},
            {"name": "vip", "sha256": _sha("sk-vip"), "priority": "high"},
            {"name": "batch", "sha256": _sha("sk-batch"), "priority": "low"}]
    p = await cluster.proxy(auth={"keys": keys},
                            models=[{"id": MODEL, "replicas": [{"url": r.url, "max_in_flight": 1}]}])
    q = _pool(p).queue
    assert q is not None
    _, w = await _hold(p, "sk-flood")
    await wait_for(lambda: r.stats.active == 1)
    order = ["sk-flood"] * 3 + ["sk-solo"] + ["sk-batch"] + ["sk-vip"] * 6
    tasks = []
    for i, k in enumerate(order):  # queued one after the other, in this order
        tasks.append(asyncio.create_task(_ask(p, k)))
        await wait_for(lambda n=i + 1: len(q.q) == n or tasks[-1].done())
        assert not tasks[-1].done(), tasks[-1].exception()
    w.close()  # the held slot frees: the queue drains one request at a time
    await w.wait_closed()
    await asyncio.gather(*tasks)
    served = [x["key"] for x in p.access_lines() if x["status"] == 200]
    # high first, most of the time; normal keys round robin (solo is not behind flood's three);
    # low keeps its floor share: it is not last although six high requests came before it was served
    assert served[:2] == ["vip", "vip"]
    normal = [k for k in served if k in ("flood", "solo")]
    assert normal == ["flood", "solo", "flood", "flood"]
    assert served.index("batch") < len(served) - 1
    assert all(x["queue_ms"] is not None for x in p.access_lines() if x["status"] == 200)
