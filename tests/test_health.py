"""Fault injection against real simulated replicas: health checks, breakers, retries, commit point."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from tests.conftest import MODEL, ROOT, Cluster, Proxy, free_port, openai_client, run_cli, wait_for

CHAT = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
STREAM = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True})
FAST_HEALTH = {"interval": "100ms", "timeout": "200ms", "fall": 2, "rise": 2, "slow_start": 0}


def replicas(p: Proxy) -> Any:
    return p.table[MODEL].replicas


async def post(http: aiohttp.ClientSession, p: Proxy, body: bytes = CHAT) -> tuple[int, bytes, Any]:
    async with http.post(f"{p.v1}/chat/completions", data=body) as resp:
        return resp.status, await resp.read(), resp.headers


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_5xx_before_headers_is_retried_elsewhere(cluster: Cluster, http: aiohttp.ClientSession,
                                                       status: int) -> None:
    bad, good = await cluster.replica(), await cluster.replica()
    bad.faults.fail_status = status
    p = await cluster.proxy([bad, good], breaker={"failures": 2, "open": "1m"})
    results = [await post(http, p) for _ in range(20)]
    assert all(s == 200 for s, _, _ in results)
    assert bad.stats.generation_requests == 2  # two failures opened its breaker; then it was skipped
    assert replicas(p)[0].breaker.state == "open" and replicas(p)[1].breaker.state == "closed"
    assert good.stats.completed == 20


async def test_all_replicas_5xx_keeps_status_never_same_replica_twice(cluster: Cluster,
                                                                      http: aiohttp.ClientSession) -> None:
    a, b = await cluster.replica(), await cluster.replica()
    a.faults.fail_status = b.faults.fail_status = 503
    p = await cluster.proxy([a, b], retry={"attempts": 3})
    status, body, _ = await post(http, p)
    assert status == 503 and orjson.loads(body)["error"]["message"] == "simulated engine failure"
    assert a.stats.generation_requests == 1 and b.stats.generation_requests == 1


async def test_connection_refused_is_retried(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    good = await cluster.replica()
    dead = f"http://127.0.0.1:{free_port()}"
    p = await cluster.proxy(models=[{"id": MODEL, "replicas": [{"url": dead}, {"url": good.url}]}],
                            breaker={"failures": 1, "open": "1m"})
    # 20 tries: with random tie-breaks the dead replica is picked at least once (all but 1 in 10^6)
    assert all([(await post(http, p))[0] == 200 for _ in range(20)])
    assert replicas(p)[0].breaker.state == "open" and good.stats.completed == 20


async def test_hang_before_headers_times_out_and_retries(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    hung, good = await cluster.replica(), await cluster.replica()
    hung.faults.hang_before_headers = True
    p = await cluster.proxy([hung, good], timeouts={"headers": "300ms"}, breaker={"failures": 1})
    t0 = time.monotonic()
    results = [await post(http, p) for _ in range(4)]
    assert all(s == 200 for s, _, _ in results)
    assert time.monotonic() - t0 < 2.0  # at most one 300 ms timeout was paid, then the breaker opened
    await wait_for(lambda: hung.stats.active == 0, 1.0)  # the abandoned upstream request was closed


async def test_stream_dying_before_first_event_is_retried(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    """The commit point: a 200 with no complete event yet is still retryable."""
    flaky, good = await cluster.replica(reasoning_field="none", tokens=5), await cluster.replica(
        reasoning_field="none", tokens=5)
    flaky.faults.reset_after = 0
    p = await cluster.proxy([flaky, good])
    replicas(p)[1].in_flight = 1000  # every first attempt goes to the flaky replica
    for _ in range(4):
        status, raw, _ = await post(http, p, STREAM)
        frames = raw.split(b"\n\n")[:-1]
        assert status == 200 and frames[-1] == b"data: [DONE]" and b'"error"' not in raw
        assert len(frames) == 1 + 5 + 1  # role, 5 tokens, DONE: nothing duplicated from the failed try
    replicas(p)[1].in_flight = 0
    assert flaky.stats.generation_requests == 4 and good.stats.completed == 4


async def test_failure_after_commit_is_not_retried(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    flaky, good = await cluster.replica(reasoning_field="none"), await cluster.replica(reasoning_field="none")
    flaky.faults.reset_after = 3
    p = await cluster.proxy([flaky, good], breaker={"failures": 1, "open": "1m"})
    replicas(p)[1].in_flight = 1000  # make sure the first attempt goes to the flaky one
    status, raw, _ = await post(http, p, STREAM)
    replicas(p)[1].in_flight = 0
    assert status == 200 and raw.endswith(b"data: [DONE]\n\n") and b'"bad_gateway"' in raw
    assert good.stats.generation_requests == 0  # no second attempt once bytes went out
    assert replicas(p)[0].breaker.state == "open"  # but the failure counts against the replica


async def test_4xx_does_not_count_against_replica(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    r = await cluster.replica()
    r.faults.fail_status = 422
    p = await cluster.proxy([r], breaker={"failures": 1})
    for _ in range(3):
        assert (await post(http, p))[0] == 422
    assert replicas(p)[0].breaker.state == "closed" and r.stats.generation_requests == 3


async def test_no_healthy_replica_503_with_retry_after(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    r = await cluster.replica()
    r.faults.fail_status = 500
    p = await cluster.proxy([r], breaker={"failures": 1, "open": "7s"}, retry={"attempts": 1})
    assert (await post(http, p))[0] == 500
    status, body, headers = await post(http, p)
    err = orjson.loads(body)["error"]
    assert status == 503 and err["code"] == "no_healthy_replica" and MODEL in err["message"]
    assert 6 <= int(headers["Retry-After"]) <= 7
    async with openai_client(p) as client:
        with pytest.raises(openai.InternalServerError) as ei:
            await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert ei.value.status_code == 503


async def test_half_open_probe_closes_breaker(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    r = await cluster.replica(reasoning_field="none", itl_ms=100, tokens=10)
    r.faults.fail_status, r.faults.fail_count = 500, 1
    p = await cluster.proxy([r], breaker={"failures": 1, "open": "200ms"}, retry={"attempts": 1})
    assert (await post(http, p))[0] == 500
    assert (await post(http, p))[0] == 503
    await asyncio.sleep(0.25)
    # the probe is a long stream: the breaker closes at its first event, not at its end
    async with http.post(f"{p.v1}/chat/completions", data=STREAM) as resp:
        await resp.content.readany()
        assert replicas(p)[0].breaker.state == "closed"
        assert (await post(http, p))[0] == 200  # others get through while the probe still streams
        await resp.read()


async def test_health_flapping_and_recovery(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    a, b = await cluster.replica(), await cluster.replica()
    p = await cluster.proxy([a, b], health=FAST_HEALTH)
    ra, rb = replicas(p)
    await wait_for(lambda: ra.checked and rb.checked, 3)
    a.faults.health_status = 503
    took_down = await wait_for(lambda: not ra.up, 3)
    assert "HTTP 503" in ra.reason and took_down < 1.0  # fall=2 at 100 ms
    before = a.stats.completed
    assert all([(await post(http, p))[0] == 200 for _ in range(5)])
    assert a.stats.completed == before  # steered away while down
    a.faults.health_status = 200
    took_up = await wait_for(lambda: ra.up, 3)
    assert took_up < 1.5 and ra.reason == "healthy"


async def test_engine_dead_port_open(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    """/health answers 500 and completions hang: health takes it out, clients see no error."""
    a, b = await cluster.replica(), await cluster.replica()
    p = await cluster.proxy([a, b], health=FAST_HEALTH, timeouts={"headers": "2s"})
    ra, _ = replicas(p)
    await wait_for(lambda: all(r.checked for r in replicas(p)), 3)
    a.faults.health_status, a.faults.hang_before_headers = 500, True
    await wait_for(lambda: not ra.up, 3)
    results = await asyncio.gather(*(post(http, p) for _ in range(10)))
    assert all(s == 200 for s, _, _ in results) and b.stats.completed >= 10


async def test_wrong_model_stays_down_and_says_why(cluster: Cluster) -> None:
    right, wrong = await cluster.replica(), await cluster.replica(model="meta-llama/Llama-3.1-8B")
    p = await cluster.proxy([right, wrong], health=FAST_HEALTH)
    rr, rw = replicas(p)
    await wait_for(lambda: rr.checked and rw.checked, 3)
    await asyncio.sleep(0.5)
    assert not rw.up and rw.reason == f"serves meta-llama/Llama-3.1-8B, not {MODEL}"


async def test_warmup_and_slow_start(cluster: Cluster) -> None:
    """Warm-up and slow start are for a replica that comes back from down, not for a proxy restart."""
    r = await cluster.replica()
    p = await cluster.proxy([r], health={**FAST_HEALTH, "slow_start": "10s"})
    rep = replicas(p)[0]
    assert rep.up and rep.reason == "assumed up until its first health check"
    await wait_for(lambda: rep.checked, 3)
    assert rep.up and rep.reason == "healthy"
    assert r.stats.generation_requests == 0  # it was serving already: no warm-up at start-up
    assert rep.effective_weight(time.monotonic()) == rep.weight  # and full weight
    r.faults.health_status = 500
    await wait_for(lambda: not rep.up, 3)
    r.faults.health_status = 200
    await wait_for(lambda: rep.up, 3)
    assert r.stats.generation_requests == 1  # exactly one warm-up before it took traffic again
    assert orjson.loads(r.stats.last_body)["max_tokens"] == 1
    assert rep.effective_weight(time.monotonic()) < 0.2  # and ramping from 10%


async def test_admin_upstreams_and_status_cli(cluster: Cluster, http: aiohttp.ClientSession, tmp_path: Any) -> None:
    from tests.conftest import write_config

    a, b = await cluster.replica(), await cluster.replica()
    b.faults.health_status = 500
    p = await cluster.proxy([a, b], health=FAST_HEALTH)
    await wait_for(lambda: replicas(p)[0].checked and replicas(p)[1].checked, 3)
    async with http.get(f"{p.admin}/admin/upstreams") as resp:
        doc = await resp.json()
    reps = doc["models"][0]["replicas"]
    assert [r["up"] for r in reps] == [True, False] and reps[1]["reason"] == "health check answered HTTP 500"
    assert reps[0]["breaker"]["state"] == "closed" and reps[0]["latency_ms"] is not None
    async with http.get(f"{p.base}/admin/upstreams") as resp:
        assert resp.status == 404  # never on the API port
    cfg = write_config(tmp_path / "c.yaml", {"listen": str(p.config.listen), "admin_listen": str(p.config.admin_listen),
                                             "auth": "off", "models": [{"id": MODEL, "replicas": [{"url": a.url}]}]})
    out = await asyncio.to_thread(run_cli, "status", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["MODEL", "REPLICA", "UP", "BREAKER"]
    assert a.url in lines[1] and " up " in lines[1] and "DOWN" in lines[2] and "HTTP 500" in lines[2]


async def test_affinity_by_session_header(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    reps = [await cluster.replica() for _ in range(3)]
    p = await cluster.proxy(models=[{"id": MODEL, "policy": "affinity", "replicas": [{"url": r.url} for r in reps]}])
    for session in ("alice", "bob", "carol", "dave"):
        before = [r.stats.completed for r in reps]
        for _ in range(5):
            async with http.post(f"{p.v1}/chat/completions", data=CHAT, headers={"X-Session-ID": session}) as resp:
                assert resp.status == 200
                await resp.read()
        delta = [r.stats.completed - b for r, b in zip(reps, before, strict=True)]
        assert sorted(delta) == [0, 0, 5], (session, delta)


async def test_load_with_replica_killed(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    """300 non-streamed requests at concurrency 12; one replica process is SIGKILLed mid-way."""
    ports = [free_port(), free_port()]
    cmd = [sys.executable, "-m", "teraproxy", "sim", "--tokens", "8", "--ttft", "5", "--port"]
    procs = [subprocess.Popen([*cmd, str(pt)], cwd=ROOT,  # noqa: ASYNC220
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for pt in ports]
    try:
        p = await cluster.proxy(models=[{"id": MODEL, "replicas": [{"url": f"http://127.0.0.1:{pt}"}
                                                                   for pt in ports]}],
                                health=FAST_HEALTH, breaker={"failures": 3, "open": "30s"})
        await wait_for(lambda: all(r.up and r.checked for r in replicas(p)), 15)  # the sims have started
        statuses: list[int] = []
        first_failure: list[float] = []

        async def worker() -> None:
            while len(statuses) < 300:
                statuses.append(0)
                idx = len(statuses) - 1
                statuses[idx] = (await post(http, p))[0]
                if idx == 100:
                    procs[0].kill()
                    first_failure.append(time.monotonic())

        await asyncio.gather(*(worker() for _ in range(12)))
        assert len(statuses) >= 300 and statuses.count(200) == len(statuses), Counter(statuses)
        await wait_for(lambda: not replicas(p)[0].up, 3)  # and health checks took it out
        assert "health check failed" in replicas(p)[0].reason
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()



async def test_keepalive_comment_is_not_the_commit_point(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    """A replica that sends only an SSE comment and dies has not started an answer: retried."""
    from aiohttp import web

    async def comment_then_die(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b": keep-alive\n\n")
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return resp

    upstream = await cluster.raw_upstream(comment_then_die)
    good = await cluster.replica(reasoning_field="none", tokens=3)
    p = await cluster.proxy(models=[{"id": MODEL, "replicas": [{"url": upstream}, {"url": good.url}]}])
    replicas(p)[1].in_flight = 1000  # the first attempt goes to the comment-only replica
    status, raw, _ = await post(http, p, STREAM)
    replicas(p)[1].in_flight = 0
    assert status == 200 and b'"error"' not in raw and raw.endswith(b"data: [DONE]\n\n")
    assert good.stats.completed == 1 and b"keep-alive" not in raw


async def test_retry_budget_bounds_an_outage(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    """Every replica failing: retries stop at the budget (max(10, 20% of requests) per window)."""
    a, b = await cluster.replica(), await cluster.replica()
    a.faults.fail_status = b.faults.fail_status = 503
    p = await cluster.proxy([a, b], breaker={"failures": 1000}, retry={"attempts": 2, "budget": 0.2, "window": "1m"})
    statuses = [(await post(http, p))[0] for _ in range(30)]
    assert statuses == [503] * 30
    sent = a.stats.generation_requests + b.stats.generation_requests
    assert sent == 30 + 10  # 30 first tries, and only 10 retries (20% of 30 is 6, the floor is 10)
