"""loadreport.py: the parser of vLLM's /metrics (pure) and the scraping tasks against real sims."""

from __future__ import annotations

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from teraproxy.config import LoadConfig, parse_config
from teraproxy.loadreport import LoadReporter, parse_metrics
from teraproxy.upstreams import ModelPool, build_table
from tests.conftest import MODEL, Cluster, wait_for

pytestmark = pytest.mark.timeout(30)

# the shape of a real vLLM v1 exposition (names, HELP/TYPE lines, sorted labels, histograms around)
VLLM = b"""# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 12345.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen3-8B"} 3.0
vllm:num_requests_running{engine="1",model_name="Qwen/Qwen3-8B"} 4.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="Qwen/Qwen3-8B"} 5.0
vllm:num_requests_waiting{engine="1",model_name="Qwen/Qwen3-8B"} 0.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="Qwen/Qwen3-8B",reason="capacity"} 99.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="Qwen/Qwen3-8B"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="Qwen/Qwen3-8B"} 0.7
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="Qwen/Qwen3-8B"} 0.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="Qwen/Qwen3-8B"} 1.5
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="Qwen/Qwen3-8B"} 40.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="Qwen/Qwen3-8B"} 2.0
vllm:request_success_created{engine="0",finished_reason="stop",model_name="Qwen/Qwen3-8B"} 1.7e9
"""


def test_parses_vllm_v1_gauges_summing_engines_and_averaging_kv() -> None:
    r = parse_metrics(VLLM, at=12.5, in_flight=2)
    assert r is not None
    assert (r.running, r.waiting, r.at, r.in_flight, r.completed, r.rate) == (7, 5, 12.5, 2, 42.0, None)
    assert r.kv == pytest.approx(0.6)


def test_older_gauge_names_and_unlabelled_samples() -> None:
    text = (b"vllm:num_requests_running 2\nvllm:num_requests_waiting 1 1700000000000\n"
            b'vllm:gpu_cache_usage_perc{model_name="m"} 0.25\n')
    r = parse_metrics(text)
    assert r is not None and (r.running, r.waiting, r.kv) == (2, 1, 0.25)
    # v0.10 exports both names during the deprecation: the current one wins
    both = text + b'vllm:kv_cache_usage_perc{model_name="m"} 0.75\n'
    assert parse_metrics(both).kv == 0.75  # type: ignore[union-attr]


def test_not_vllm_or_broken_lines_give_no_report_or_are_skipped() -> None:
    assert parse_metrics(b"") is None
    assert parse_metrics(b"# HELP up\nup 1\nsglang:num_running_reqs 3\n") is None
    text = (b"vllm:num_requests_running{engine=\"0\" 7\nvllm:num_requests_running NaN\n"
            b"vllm:num_requests_running -3\nvllm:num_requests_running\nvllm:num_requests_waiting abc\n"
            b"vllm:num_requests_running 1\n")
    r = parse_metrics(text)
    assert r is not None and (r.running, r.waiting, r.kv) == (1, 0, None)
    assert parse_metrics(b"vllm:kv_cache_usage_perc 7\nvllm:num_requests_running 0\n").kv == 1.0  # type: ignore[union-attr]


@given(st.binary(max_size=300))
def test_parser_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    r = parse_metrics(b"vllm:num_requests_running 1\n" + data)
    assert r is None or (r.running >= 0 and r.waiting >= 0 and (r.kv is None or 0 <= r.kv <= 1))


def _table(urls: list[str]) -> dict[str, ModelPool]:
    return build_table(parse_config({"listen": "127.0.0.1:1", "auth": "off", "health": {"enabled": False},
                                     "models": [{"id": MODEL, "replicas": [{"url": u} for u in urls]}]}))


async def test_scrape_real_sims_with_and_without_the_endpoint(cluster: Cluster) -> None:
    loaded = await cluster.replica(max_num_seqs=8)
    loaded.faults.extra_running, loaded.faults.extra_waiting = 6, 9
    bare = await cluster.replica(metrics="none")
    table = _table([loaded.url, bare.url])
    r1, r2 = table[MODEL].replicas
    async with aiohttp.ClientSession() as s:
        rep = LoadReporter(LoadConfig(), [r1, r2], s)
        assert await rep.scrape(r1) is True
        assert await rep.scrape(r2) is False
    assert r1.report is not None and (r1.report.running, r1.report.waiting) == (6, 9)
    assert r1.report.kv == 0.75 and r2.report is None and r1.report.completed == 0.0
    # the second scrape measures the completion rate against the first
    loaded.sim.stats.completed = 5
    async with aiohttp.ClientSession() as s:
        await LoadReporter(LoadConfig(), [r1], s).scrape(r1)
    assert r1.report.rate is not None and r1.report.rate > 0 and r1.report.completed == 5.0
    snap = r1.snapshot(MODEL)["report"]
    assert isinstance(snap, dict) and snap["waiting"] == 9 and snap["stale"] is False


async def test_failed_scrape_keeps_the_old_report_to_age_out_and_tasks_stop(cluster: Cluster) -> None:
    rep_sim = await cluster.replica()
    table = _table([rep_sim.url])
    r = table[MODEL].replicas[0]
    async with aiohttp.ClientSession() as s:
        reporter = LoadReporter(LoadConfig(interval=0.02, timeout=0.5), [r], s)
        reporter.start()
        await wait_for(lambda: not (rep_sim.stats.metrics_scrapes < 3))
        first = r.report
        assert first is not None
        rep_sim.faults.metrics_status = 500
        n = rep_sim.stats.metrics_scrapes
        await wait_for(lambda: not (rep_sim.stats.metrics_scrapes < n + 2))
        kept = r.report
        n = rep_sim.stats.metrics_scrapes
        await wait_for(lambda: not (rep_sim.stats.metrics_scrapes < n + 3))
        assert r.report is kept  # a failed scrape does not replace (or drop) it: it ages out
        await reporter.stop()
        assert not reporter.tasks


async def test_oversized_metrics_give_no_report(cluster: Cluster) -> None:
    from aiohttp import web

    async def huge(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(80):
            await resp.write(b"# padding " + b"x" * 65536 + b"\n")
        return resp

    url = await cluster.raw_upstream(huge, more=(("GET", "/metrics", huge),))
    table = _table([url])
    r = table[MODEL].replicas[0]
    async with aiohttp.ClientSession() as s:
        assert await LoadReporter(LoadConfig(), [r], s).scrape(r) is False
    assert r.report is None
