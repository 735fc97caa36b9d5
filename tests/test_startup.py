"""A proxy that (re)starts in front of a running fleet routes at once (nginx's behaviour): replicas are
assumed up until a check or a request says otherwise; a replica really down at start-up goes down at its
first failing check, and requests sent before it are retried elsewhere."""

from __future__ import annotations

import aiohttp
import orjson

from teraproxy.config import parse_config
from teraproxy.health import HealthChecker
from teraproxy.upstreams import PENDING, Replica, build_table
from tests.conftest import MODEL, Cluster, free_port, openai_client, wait_for

CHAT = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
SLOW_HEALTH = {"interval": "5s", "fall": 3, "rise": 2}  # the defaults' shape: no check before the request


async def test_first_request_after_start_succeeds(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    r = await cluster.replica(tokens=3)
    p = await cluster.proxy([r], health=SLOW_HEALTH)  # health checks on, as in production
    async with http.post(f"{p.v1}/chat/completions", data=CHAT) as resp:  # at once: no check has run yet
        assert resp.status == 200, await resp.text()
    async with openai_client(p) as client:
        answer = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content
        chunks = [c async for c in await client.chat.completions.create(
            model=MODEL, stream=True, messages=[{"role": "user", "content": "hi"}])]
        assert any(c.choices and c.choices[0].finish_reason for c in chunks)
    assert r.stats.completed == 3  # and no warm-up request: the replica was serving already


async def test_dead_replica_at_start_is_down_after_its_first_check(cluster: Cluster,
                                                                   http: aiohttp.ClientSession) -> None:
    good = await cluster.replica(tokens=3)
    dead = f"http://127.0.0.1:{free_port()}"
    p = await cluster.proxy(models=[{"id": MODEL, "replicas": [{"url": dead}, {"url": good.url}]}],
                            health={"interval": "200ms", "fall": 5, "rise": 2}, breaker={"failures": 1000})
    rd = p.table[MODEL].replicas[0]
    # before any check both are routable; requests that pick the dead one are retried on the good one
    statuses = []
    for _ in range(10):
        async with http.post(f"{p.v1}/chat/completions", data=CHAT) as resp:
            statuses.append(resp.status)
    assert statuses == [200] * 10
    await wait_for(lambda: rd.last_check is not None, 3)
    # its first failing check took it down, though fall is 5: it was never confirmed
    assert not rd.up and rd.reason.startswith("health check failed")
    assert p.table[MODEL].replicas[1].up


async def test_pending_replica_takes_traffic_only_after_checks_and_warmup(cluster: Cluster) -> None:
    """The other initial state (for replicas a reload adds): down until checks and the warm-up pass."""
    r = await cluster.replica()
    config = parse_config({"listen": "127.0.0.1:1", "auth": "off",
                           "health": {"interval": "100ms", "rise": 2, "slow_start": 0},
                           "models": [{"id": MODEL, "replicas": [{"url": r.url}]}]})
    table = build_table(config, make=lambda cfg, models, config, clock: Replica(cfg, models, config, clock, PENDING))
    rep = table[MODEL].replicas[0]
    assert not rep.up and not rep.available(MODEL) and rep.reason == "not checked yet"
    async with aiohttp.ClientSession() as session:
        checker = HealthChecker(config, session)
        checker.sync([rep])
        try:
            await wait_for(lambda: rep.up, 3)
        finally:
            await checker.stop()
    assert r.stats.generation_requests == 1 and orjson.loads(r.stats.last_body)["max_tokens"] == 1  # warmed

