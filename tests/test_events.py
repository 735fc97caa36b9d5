"""GET /admin/events (SSE): replica up/down with the reason, breaker changes, reloads; a slow watcher is
dropped; `teraproxy status --watch` follows it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from teraproxy.app import RELOADER
from teraproxy.events import QUEUE, EventBus

from .conftest import MODEL, ROOT, Cluster, free_port, write_config


async def _next(resp: aiohttp.ClientResponse, event: str) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while True:
            line = (await resp.content.readline()).decode().strip()
            if line.startswith("data:"):
                doc: dict[str, Any] = orjson.loads(line[5:])
                if doc["event"] == event:
                    return doc


def _raw(url: str, listen: int, admin: int, **over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"listen": f"127.0.0.1:{listen}", "admin_listen": f"127.0.0.1:{admin}", "auth": "off",
                           "log": {"access_log": False},
                           "health": {"interval": "100ms", "fall": 1, "rise": 1, "warmup": False, "timeout": "1s"},
                           "models": [{"id": MODEL, "replicas": [{"url": url}]}]}
    raw.update(over)
    return raw


async def test_events_stream_replica_changes_and_reloads(cluster: Cluster, tmp_path: Path) -> None:
    r = await cluster.replica()
    listen, admin = free_port(), free_port()
    path = write_config(tmp_path / "c.yaml", _raw(r.url, listen, admin))
    p = await cluster.proxy_from_file(path)
    async with aiohttp.ClientSession() as http, http.get(f"{p.admin}/admin/events") as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        await _next(resp, "hello")
        r.faults.health_status = 503
        down = await _next(resp, "replica_down")
        assert down["replica"] == r.url and down["reason"] == "health check answered HTTP 503"
        r.faults.health_status = 200
        assert (await _next(resp, "replica_up"))["replica"] == r.url
        write_config(path, _raw(r.url, listen, admin, retry={"attempts": 2}))
        assert p.app[RELOADER].reload() == []
        ok = await _next(resp, "reload")
        assert ok["ok"] is True and len(ok["sha256"]) == 64
        write_config(path, _raw(r.url, listen, admin, retry={"attempts": 0}))
        p.app[RELOADER].reload()
        bad = await _next(resp, "reload")
        assert bad == {**bad, "ok": False, "problems": ["retry.attempts: must be an integer >= 1"]}


async def test_a_watcher_that_falls_behind_is_dropped() -> None:
    bus = EventBus()
    slow, fast = bus.watch(), bus.watch()
    for i in range(QUEUE + 1):
        bus.publish("tick", n=i)
        while not fast.queue.empty():
            fast.queue.get_nowait()
    assert slow.dropped and bus.watchers == {fast}  # never more than QUEUE events held for it
    assert slow.queue.qsize() == QUEUE


async def test_status_watch_redraws_on_events(cluster: Cluster, tmp_path: Path) -> None:
    r = await cluster.replica()
    listen, admin = free_port(), free_port()
    path = write_config(tmp_path / "c.yaml", _raw(r.url, listen, admin))
    p = await cluster.proxy_from_file(path)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "teraproxy", "status", "--watch", "--config",
                                                str(path), cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        seen = b""
        async with asyncio.timeout(15):
            while b'"event":"hello"' not in seen:
                seen += await proc.stdout.read(4096)
            assert b"MODEL" in seen and r.url.encode() in seen  # the replica table is drawn
            p.app[RELOADER].reload()
            while b'"event":"reload"' not in seen:
                seen += await proc.stdout.read(4096)
    finally:
        proc.terminate()
        await proc.wait()
