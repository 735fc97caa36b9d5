"""Fleets: teraproxy processes sharing one real redis-server hold one key's limit; Redis outages."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from teraproxy.auth import hash_key
from tests.conftest import MODEL, ROOT, Cluster, free_port, write_config
from tests.redisd import RedisServer

BODY = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})


class Instance:
    def __init__(self, base: str, admin: str) -> None:
        self.base = base
        self.admin = admin


async def serve(tmp_path: Path, name: str, replica_url: str, ratelimit: dict[str, Any], limits: dict[str, Any],
                procs: list[subprocess.Popen[bytes]], http: aiohttp.ClientSession) -> Instance:
    port, admin = free_port(), free_port()
    cfg = write_config(tmp_path / f"{name}.yaml", {
        "listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin}",
        "auth": {"keys": [{"name": "team-a", "sha256": hash_key("sk-a"), **limits}]},
        "health": {"enabled": False}, "log": {"access_log": False},
        "models": [{"id": MODEL, "replicas": [{"url": replica_url}]}], "ratelimit": ratelimit})
    # Popen returns at once (no wait), and the procs fixture stops it by its pid
    p = subprocess.Popen([sys.executable, "-m", "teraproxy", "serve", "--config", str(cfg)], cwd=ROOT,  # noqa: ASYNC220
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    procs.append(p)
    deadline = time.monotonic() + 20
    while True:
        try:
            async with http.get(f"http://127.0.0.1:{admin}/healthz") as r:
                if r.status == 200:
                    return Instance(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}")
        except aiohttp.ClientError:
            pass
        assert p.poll() is None, p.stderr.read().decode() if p.stderr else "exited"
        assert time.monotonic() < deadline, f"{name} did not start"
        await asyncio.sleep(0.05)


async def post(http: aiohttp.ClientSession, inst: Instance) -> tuple[int, dict[str, str], bytes]:
    async with http.post(f"{inst.base}/v1/chat/completions", data=BODY,
                         headers={"Authorization": "Bearer sk-a", "Content-Type": "application/json"}) as r:
        return r.status, dict(r.headers), await r.read()


async def test_two_processes_share_one_limit(tmp_path: Path, cluster: Cluster, redis_server: RedisServer,
                                             procs: list[subprocess.Popen[bytes]],
                                             http: aiohttp.ClientSession) -> None:
    r = await cluster.replica()
    # a generous deadline: this test is about atomicity, and a timed-out call would be allowed through
    rl = {"backend": "redis", "redis_url": redis_server.url, "redis_timeout": "2s"}
    a = await serve(tmp_path, "a", r.url, rl, {"requests_per_minute": 20}, procs, http)
    b = await serve(tmp_path, "b", r.url, rl, {"requests_per_minute": 20}, procs, http)
    t0 = time.monotonic()
    results = await asyncio.gather(*(post(http, inst) for inst in (a, b) * 30))
    elapsed = time.monotonic() - t0
    ok = [x for x in results if x[0] == 200]
    assert {x[0] for x in results} == {200, 429}
    # one limit for both (each alone would admit 20 of its 30: 40), plus its refill (one per 3 s)
    assert 20 <= len(ok) <= 20 + int(elapsed / 3)
    assert r.stats.generation_requests == len(ok)


async def test_redis_killed_mid_run(tmp_path: Path, cluster: Cluster, redis_server: RedisServer,
                                    procs: list[subprocess.Popen[bytes]], http: aiohttp.ClientSession) -> None:
    r = await cluster.replica()
    base = {"backend": "redis", "redis_url": redis_server.url, "redis_timeout": "100ms"}
    allow = await serve(tmp_path, "allow", r.url, {**base, "on_backend_error": "allow"},
                        {"requests_per_minute": 1000}, procs, http)
    deny = await serve(tmp_path, "deny", r.url, {**base, "on_backend_error": "deny"},
                       {"requests_per_minute": 1000}, procs, http)
    for inst in (allow, deny):
        status, headers, _ = await post(http, inst)
        assert status == 200 and "x-ratelimit-remaining-requests" in {h.lower() for h in headers}
    redis_server.kill()
    for _ in range(5):
        status, headers, _ = await post(http, allow)
        assert status == 200  # the API stays up
        assert "x-ratelimit-remaining-requests" not in {h.lower() for h in headers}
        status, headers, body = await post(http, deny)
        assert status == 503 and headers["Retry-After"] == "1"
        err = orjson.loads(body)["error"]
        assert err["code"] == "rate_limit_unavailable" and err["type"] == "server_error"
    for inst in (allow, deny):
        async with http.get(f"{inst.admin}/metrics") as m:
            text = await m.text()
        line = next(x for x in text.splitlines() if x.startswith("teraproxy_ratelimit_backend_errors_total"))
        assert float(line.split()[-1]) >= 5
    redis_server.start()  # same port, empty
    deadline = time.monotonic() + 15
    while True:  # both recover by themselves (they retry Redis every 0.5 s)
        a_status, a_headers, _ = await post(http, allow)
        d_status, _, _ = await post(http, deny)
        if d_status == 200 and "x-ratelimit-remaining-requests" in {h.lower() for h in a_headers}:
            break
        assert time.monotonic() < deadline, "did not recover after Redis came back"
        await asyncio.sleep(0.1)
    assert a_status == 200
