"""One server listed under two models is one replica: one breaker, one in-flight count, one health task;
/v1/models is checked for every model it serves, and a model it does not list leaves only that pool."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from teraproxy.config import ConfigError, parse_config
from tests.conftest import MODEL, Cluster, wait_for

OTHER = "org/other-model"
FAST = {"interval": "100ms", "timeout": "500ms", "fall": 1, "rise": 1, "slow_start": 0}


def body(model: str, **kw: object) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], **kw})


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with http.get(f"{url}/metrics") as resp:
        text = await resp.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


async def test_one_server_two_models_is_one_replica(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    sim = await cluster.replica(aliases=(OTHER,), itl_ms=50, tokens=10)
    p = await cluster.proxy(models=[{"id": MODEL, "replicas": [{"url": sim.url}]},
                                    {"id": OTHER, "replicas": [{"url": sim.url}]}],
                            health=FAST, breaker={"failures": 2, "open": "1m"}, retry={"attempts": 1})
    a, b = p.table[MODEL].replicas[0], p.table[OTHER].replicas[0]
    assert a is b and a.models == (MODEL, OTHER)
    # one health task for the server, whose check found both models in /v1/models
    health_tasks = [t for t in asyncio.all_tasks() if t.get_name().startswith("health:")]
    assert [t.get_name() for t in health_tasks] == [f"health:{sim.url}"]
    await wait_for(lambda: a.checked, 3)
    assert a.up and a.missing == {} and sim.stats.generation_requests == 0

    # its load is counted once, whichever model the request named
    async with http.post(f"{p.v1}/chat/completions", data=body(MODEL, stream=True)) as s1, \
            http.post(f"{p.v1}/chat/completions", data=body(OTHER, stream=True)) as s2:
        await s1.content.readany()
        await s2.content.readany()
        assert a.in_flight == 2
        m = await scrape(http, p.admin or "")
        assert m[("teraproxy_replica_in_flight", (("replica", sim.url),))] == 2
        assert not [k for k in m if k[0] == "teraproxy_replica_in_flight" and k != (
            "teraproxy_replica_in_flight", (("replica", sim.url),))]  # one series per server
        await s1.read()
        await s2.read()

    # one breaker: failures through one model open it for both
    sim.faults.fail_status = 500
    for _ in range(2):
        async with http.post(f"{p.v1}/chat/completions", data=body(MODEL)) as resp:
            assert resp.status == 500
    async with http.post(f"{p.v1}/chat/completions", data=body(OTHER)) as resp:
        assert resp.status == 503 and (await resp.json())["error"]["code"] == "no_healthy_replica"
    assert sim.stats.generation_requests == 2 + 2

    async with http.get(f"{p.admin}/admin/upstreams") as resp:
        doc = await resp.json()
    shown = {m["id"]: m["replicas"] for m in doc["models"]}
    assert [r["models"] for r in shown[MODEL]] == [[MODEL, OTHER]] == [r["models"] for r in shown[OTHER]]
    assert shown[MODEL][0]["breaker"]["state"] == shown[OTHER][0]["breaker"]["state"] == "open"


async def test_model_not_listed_leaves_only_its_pool(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    sim = await cluster.replica(tokens=3)  # serves MODEL only
    p = await cluster.proxy(models=[{"id": MODEL, "replicas": [{"url": sim.url}]},
                                    {"id": OTHER, "replicas": [{"url": sim.url}]}], health=FAST)
    rep = p.table[MODEL].replicas[0]
    await wait_for(lambda: rep.checked, 3)
    assert rep.up and set(rep.missing) == {OTHER}
    async with http.post(f"{p.v1}/chat/completions", data=body(MODEL)) as resp:
        assert resp.status == 200
    async with http.post(f"{p.v1}/chat/completions", data=body(OTHER)) as resp:
        assert resp.status == 503
    m = await scrape(http, p.admin or "")
    assert m[("teraproxy_replica_up", (("model", MODEL), ("replica", sim.url)))] == 1
    assert m[("teraproxy_replica_up", (("model", OTHER), ("replica", sim.url)))] == 0
    async with http.get(f"{p.admin}/admin/upstreams") as resp:
        doc = {m["id"]: m["replicas"][0] for m in (await resp.json())["models"]}
    assert doc[MODEL]["up"] and doc[MODEL]["reason"] == "healthy"
    assert not doc[OTHER]["up"] and doc[OTHER]["reason"] == f"serves {MODEL}, not {OTHER}"


@pytest.mark.parametrize("second", [{"api_key": "sk-b"}, {"weight": 2}])
def test_one_server_has_one_key_and_one_weight(second: dict[str, object]) -> None:
    url = "http://127.0.0.1:8001"
    with pytest.raises(ConfigError) as ei:
        parse_config({"listen": "127.0.0.1:1", "auth": "off",
                      "models": [{"id": MODEL, "replicas": [{"url": url}]},
                                 {"id": OTHER, "replicas": [{"url": url + "/", **second}]}]})
    assert ei.value.problems == [f"models[1].replicas[0]: {url} is also listed at models[0].replicas[0] with "
                                 "another api_key or weight (one server has one key and one weight)"]
