"""/metrics on the admin listener: counts that follow real traffic, bounded labels."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MODEL, Cluster

BODY = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with http.get(url) as resp:
        assert resp.status == 200 and resp.content_type == "text/plain"
        text = await resp.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


async def test_metrics_follow_traffic(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    bad, good = await cluster.replica(), await cluster.replica(reasoning_field="reasoning_content")
    bad.faults.fail_status = 503
    p = await cluster.proxy([bad, good], auth={"keys": [{"name": "team-secret-name", "sha256": "ab" * 32}]})
    p2 = await cluster.proxy([bad, good])  # open access, to send traffic
    p2.table[MODEL].replicas[1].in_flight = 1000  # first attempts go to the failing replica
    for _ in range(6):
        async with http.post(f"{p2.v1}/chat/completions", data=BODY) as resp:
            assert resp.status == 200
    p2.table[MODEL].replicas[1].in_flight = 0
    stream = orjson.dumps({"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "x"}]})
    async with http.post(f"{p2.v1}/chat/completions", data=stream) as resp:
        await resp.read()
    async with http.post(f"{p2.v1}/chat/completions", data=b'{"model": "nope/x", "messages": []}') as resp:
        assert resp.status == 404
    async with http.get(f"{p2.v1}/some/raw/path") as resp:
        assert resp.status == 404
    ok_key = ("teraproxy_requests_total", (("code", "200"), ("model", MODEL)))
    for _ in range(50):  # a stream is counted as its handler returns, just after its last byte went out
        m = await scrape(http, f"{p2.admin}/metrics")
        if m.get(ok_key) == 7:
            break
        await asyncio.sleep(0.02)
    assert m[ok_key] == 7
    assert m[("teraproxy_requests_total", (("code", "404"), ("model", "(none)")))] == 2  # unknown model, bad path
    assert m[("teraproxy_request_duration_seconds_count", (("model", MODEL),))] == 7
    assert m[("teraproxy_time_to_first_byte_seconds_count", (("model", MODEL),))] == 7
    retries = m[("teraproxy_retries_total", (("model", MODEL),))]
    # every try of the failing replica was retried, until its breaker opened after 5 failures
    assert retries == bad.stats.generation_requests == 5
    assert m[("teraproxy_reasoning_frames_rewritten_total", (("model", MODEL),))] >= 1
    for url, up in ((bad.url, 1.0), (good.url, 1.0)):
        assert m[("teraproxy_replica_up", (("model", MODEL), ("replica", url)))] == up
    fails = m[("teraproxy_replica_failures_total", (("replica", bad.url),))]
    assert fails == bad.stats.generation_requests
    # bounded labels: no key names, no raw paths
    other = await scrape(http, f"{p.admin}/metrics")
    names = " ".join(str(k) for k in list(m) + list(other))
    assert "team-secret-name" not in names and "/some/raw/path" not in names
    async with http.get(f"{p2.base}/metrics") as resp:
        assert resp.status == 404  # never on the API port


async def test_exact_codes_bounded_model_process_and_no_created(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    r = await cluster.replica()
    p = await cluster.proxy([r], breaker={"failures": 1, "open": "1m"}, retry={"attempts": 1})
    async with http.post(f"{p.v1}/chat/completions", data=BODY) as resp:
        assert resp.status == 200
    r.faults.fail_status = 500
    async with http.post(f"{p.v1}/chat/completions", data=BODY) as resp:
        assert resp.status == 500
    async with http.post(f"{p.v1}/chat/completions", data=BODY) as resp:
        assert resp.status == 503  # the breaker is open: no_healthy_replica
    unknown = orjson.dumps({"model": "attacker/" + "x" * 2000, "messages": []})
    async with http.post(f"{p.v1}/chat/completions", data=unknown) as resp:
        assert resp.status == 404
    async with http.post(f"{p.v1}/chat/completions", data=b"{not json") as resp:
        assert resp.status == 400
    async with http.get(f"{p.admin}/metrics") as resp:
        text = await resp.text()
    m = {(s.name, tuple(sorted(s.labels.items()))): s.value
         for fam in text_string_to_metric_families(text) for s in fam.samples}
    for code, model in (("200", MODEL), ("500", MODEL), ("503", MODEL), ("404", "(none)"), ("400", "(none)")):
        assert m[("teraproxy_requests_total", (("code", code), ("model", model)))] == 1, (code, model)
    assert not [k for k in m if k[0] == "teraproxy_requests_total" and dict(k[1])["model"] not in (MODEL, "(none)")]
    assert "attacker/" not in text and "_created" not in text
    assert m[("process_resident_memory_bytes", ())] > 0 and m[("process_cpu_seconds_total", ())] > 0
    assert m[("process_open_fds", ())] > 0


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    """The plain-number histogram renders as Prometheus expects: a value on a bound counts in that
    bucket (le is <=), buckets are cumulative, +Inf is the count, _sum the total."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.registry import Collector

    from teraproxy.metrics import _BUCKETS, Hist, _hist_family

    h = Hist()
    for v in (0.005, 0.0051, 0.3, 1000.0):
        h.observe(v)

    class One(Collector):
        def collect(self):  # type: ignore[no-untyped-def]
            yield _hist_family("t_seconds", "t", [("m", h)])

    reg = CollectorRegistry()
    reg.register(One())
    got = {(s.name, s.labels.get("le")): s.value for fam in text_string_to_metric_families(
        generate_latest(reg).decode()) for s in fam.samples}
    assert got[("t_seconds_bucket", "0.005")] == 1  # the bound itself
    assert got[("t_seconds_bucket", "0.01")] == 2
    assert got[("t_seconds_bucket", "0.25")] == 2 and got[("t_seconds_bucket", "0.5")] == 3
    assert got[("t_seconds_bucket", str(float(_BUCKETS[-1])))] == 3
    assert got[("t_seconds_bucket", "+Inf")] == 4 and got[("t_seconds_count", None)] == 4
    assert abs(got[("t_seconds_sum", None)] - 1000.3101) < 1e-9


def test_request_ids_are_unique_hex() -> None:
    from teraproxy.proxy import new_request_id

    ids = [new_request_id(None) for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert new_request_id("client-given-1") == "client-given-1" and new_request_id("bad\nid") != "bad\nid"


async def test_other_codes_are_one_series(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    r = await cluster.replica()
    p = await cluster.proxy([r])
    for status in (600, 601):
        r.faults.fail_status = status
        async with http.post(f"{p.v1}/chat/completions", data=BODY) as resp:
            await resp.read()
    async with http.get(f"{p.admin}/metrics") as resp:
        text = await resp.text()
    lines = [ln for ln in text.splitlines()
             if ln.startswith("teraproxy_requests_total{") and 'code="other"' in ln]
    assert len(lines) == 1, lines  # one series per label set, as with prometheus-client's Counter
    fams = list(text_string_to_metric_families(text))  # a strict parser must take it
    assert fams
