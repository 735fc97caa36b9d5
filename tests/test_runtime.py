"""The live snapshot and its reload (in process): state carried by URL, retirement, refused reloads."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from teraproxy.app import LIVE, RELOADER
from teraproxy.config import parse_config
from teraproxy.runtime import Live, build

from .conftest import MODEL, Cluster, free_port, openai_client, wait_for, write_config

OTHER = "other/model"
MSGS = [{"role": "user", "content": "hi"}]


def _raw(models: dict[str, list[str]], listen: int, admin: int, **over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "listen": f"127.0.0.1:{listen}", "admin_listen": f"127.0.0.1:{admin}", "auth": "off",
        "health": {"enabled": False}, "log": {"access_log": False},
        "models": [{"id": m, "replicas": [{"url": u} for u in urls]} for m, urls in models.items()]}
    raw.update(over)
    return raw


def test_build_carries_replica_objects_by_url() -> None:
    a, b, c = "http://127.0.0.1:9001", "http://127.0.0.1:9002", "http://127.0.0.1:9003"
    first = build(parse_config(_raw({MODEL: [a, b]}, 9000, 9009)))
    live = Live(first)
    ra, rb = first.table[MODEL].replicas
    ra.in_flight, ra.failures = 3, 7
    ra.breaker.record(False)
    second = build(parse_config(_raw({MODEL: [a, c], OTHER: [b]}, 9000, 9009, breaker={"failures": 9})),
                   previous=first)
    removed = live.swap(second)
    kept = second.table[MODEL].replicas[0]
    assert kept is ra and kept.in_flight == 3 and kept.failures == 7
    assert kept.breaker.snapshot()["consecutive_failures"] == 1 and kept.breaker.failures == 9  # new setting
    # a server moved to another model is the same server: its health and breaker are its own
    assert second.table[OTHER].replicas[0] is rb and rb.models == (OTHER,) and removed == []
    third = build(parse_config(_raw({MODEL: [a, c]}, 9000, 9009)), previous=second)
    assert live.swap(third) == [rb] and rb.retired and not rb.available(OTHER)
    assert live.current is third and list(live.retiring.values()) == [rb]
    # listed again while still draining: the same object comes back, no longer retired
    fourth = build(parse_config(_raw({MODEL: [a, b]}, 9000, 9009)), previous=third,
                   spare=tuple(live.retiring.values()))
    live.swap(fourth)
    assert fourth.table[MODEL].replicas[1] is rb and not rb.retired and id(rb) not in live.retiring


async def test_reload_swaps_table_and_new_replica_waits_for_its_checks(cluster: Cluster, tmp_path: Path) -> None:
    r1, r2, r3 = await cluster.replica(), await cluster.replica(), await cluster.replica(model=OTHER)
    listen, admin = free_port(), free_port()
    health = {"interval": "100ms", "rise": 1, "warmup": False}
    path = write_config(tmp_path / "c.yaml", _raw({MODEL: [r1.url]}, listen, admin, health=health))
    p = await cluster.proxy_from_file(path)
    live = p.app[LIVE]
    await wait_for(lambda: live.current.table[MODEL].replicas[0].up)
    old = live.current.table[MODEL].replicas[0]
    sha0 = live.current.sha256
    write_config(path, _raw({MODEL: [r1.url, r2.url], OTHER: [r3.url]}, listen, admin, health=health))
    assert p.app[RELOADER].reload() == []
    new = live.current.table[MODEL].replicas
    assert new[0] is old and new[0].up  # carried: no new checks, no lost traffic
    assert not new[1].up  # a new replica takes traffic only once its checks pass
    await wait_for(lambda: new[1].up and live.current.table[OTHER].replicas[0].up)
    async with openai_client(p) as client:
        out = await client.chat.completions.create(model=OTHER, messages=MSGS)  # type: ignore[arg-type]
    assert out.choices[0].message.content
    async with aiohttp.ClientSession() as s, s.get(f"{p.admin}/admin/config") as resp:
        doc = await resp.json()
    assert doc["sha256"] == live.current.sha256 != sha0 and doc["reloads"] == 1


async def test_invalid_reload_keeps_serving_and_names_each_key(cluster: Cluster, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    r1 = await cluster.replica()
    listen, admin = free_port(), free_port()
    path = write_config(tmp_path / "c.yaml", _raw({MODEL: [r1.url]}, listen, admin))
    p = await cluster.proxy_from_file(path)
    before = p.app[LIVE].current
    raw = _raw({MODEL: ["ftp://nope"]}, listen, admin, retry={"attempts": 0, "bogus": 1})
    write_config(path, raw)
    with caplog.at_level(logging.ERROR, logger="teraproxy.runtime"):
        problems = p.app[RELOADER].reload()
    assert sorted(problems) == ["models[0].replicas[0].url: not an http(s) URL",
                                "retry.attempts: must be an integer >= 1",
                                "retry.bogus: unknown key (allowed: attempts, budget, window)"]
    assert len([r for r in caplog.records if "reload failed" in r.getMessage()]) == 3
    assert p.app[LIVE].current is before
    async with openai_client(p) as client:
        await client.chat.completions.create(model=MODEL, messages=MSGS)  # type: ignore[arg-type]
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{p.admin}/metrics") as resp:
            text = await resp.text()
        assert "teraproxy_config_reload_failures_total 1.0" in text
        async with s.post(f"{p.admin}/admin/reload") as resp:  # what `teraproxy reload` calls
            assert resp.status == 422
            assert (await resp.json())["problems"] == problems
    path.write_text("models: [\n")
    assert "c.yaml: invalid YAML at line 2" in p.app[RELOADER].reload()[0]


async def test_removed_model_404s_while_its_running_stream_finishes(cluster: Cluster, tmp_path: Path) -> None:
    r1, r2 = await cluster.replica(), await cluster.replica(model=OTHER, itl_ms=20, tokens=30)
    listen, admin = free_port(), free_port()
    path = write_config(tmp_path / "c.yaml", _raw({MODEL: [r1.url], OTHER: [r2.url]}, listen, admin))
    p = await cluster.proxy_from_file(path)
    retired = p.table[OTHER].replicas[0]
    async with openai_client(p) as client:
        stream = await client.chat.completions.create(model=OTHER, messages=MSGS, stream=True)  # type: ignore
        it = stream.__aiter__()
        first = await it.__anext__()
        write_config(path, _raw({MODEL: [r1.url]}, listen, admin))
        assert p.app[RELOADER].reload() == []
        assert retired.retired and p.app[LIVE].retiring
        import openai

        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model=OTHER, messages=MSGS)  # type: ignore[arg-type]
        rest = [c async for c in it]
    assert first.choices and rest[-1].choices[0].finish_reason == "stop"
    await wait_for(lambda: not p.app[LIVE].retiring)  # closed once its last stream ended


async def test_reload_cannot_move_listen_addresses(cluster: Cluster, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    r1 = await cluster.replica()
    listen, admin = free_port(), free_port()
    path = write_config(tmp_path / "c.yaml", _raw({MODEL: [r1.url]}, listen, admin))
    p = await cluster.proxy_from_file(path)
    write_config(path, _raw({MODEL: [r1.url]}, free_port(), admin, retry={"attempts": 1}))
    with caplog.at_level(logging.WARNING, logger="teraproxy.runtime"):
        assert p.app[RELOADER].reload() == []
    assert any(r.getMessage().startswith("reload: listen: changed from 127.0.0.1:") for r in caplog.records)
    cfg = p.app[LIVE].current.config
    assert cfg.listen.port == listen and cfg.retry.attempts == 1  # the rest of the config did change
    async with openai_client(p) as client:
        await asyncio.wait_for(client.models.list(), 5)
