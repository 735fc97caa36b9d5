"""`teraproxy sim` as a loaded vLLM: --max-num-seqs queueing, --speed, and vLLM's /metrics gauges."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import aiohttp
import orjson
import pytest

from teraproxy.loadreport import parse_metrics
from tests.conftest import MODEL, Cluster, free_port, stop_process, wait_for

pytestmark = pytest.mark.timeout(30)


async def _chat(http: aiohttp.ClientSession, url: str, stream: bool = True) -> None:
    body = {"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    async with http.post(url + "/v1/chat/completions", data=orjson.dumps(body)) as resp:
        assert resp.status == 200
        await resp.read()


async def _metrics(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return await resp.text()


async def test_max_num_seqs_queues_beyond_the_limit_and_metrics_show_it(cluster: Cluster,
                                                                         http: aiohttp.ClientSession) -> None:
    rep = await cluster.replica(max_num_seqs=2, ttft_ms=0, itl_ms=0)
    rep.faults.hang_after = 1  # running streams hold their slot until we let them go
    tasks = [asyncio.create_task(_chat(http, rep.url)) for _ in range(5)]
    await wait_for(lambda: not (rep.sim.sched.running + len(rep.sim.sched.waiters) < 5))
    text = await _metrics(http, rep.url)
    assert f'vllm:num_requests_running{{engine="0",model_name="{MODEL}"}} 2.0' in text
    assert f'vllm:num_requests_waiting{{engine="0",model_name="{MODEL}"}} 3.0' in text
    assert f'vllm:kv_cache_usage_perc{{engine="0",model_name="{MODEL}"}} 1.0' in text
    assert "# TYPE vllm:num_requests_waiting gauge" in text
    report = parse_metrics(text.encode())
    assert report is not None and (report.running, report.waiting, report.kv) == (2, 3, 1.0)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_scheduler_never_runs_more_than_max_and_completes_all(cluster: Cluster,
                                                                    http: aiohttp.ClientSession) -> None:
    rep = await cluster.replica(max_num_seqs=3, ttft_ms=5, itl_ms=1, tokens=4)
    await asyncio.gather(*(_chat(http, rep.url, stream=i % 2 == 0) for i in range(12)))
    assert rep.stats.max_running == 3 and rep.stats.max_waiting > 0
    assert rep.stats.completed == 12 and rep.sim.sched.running == 0 and not rep.sim.sched.waiters


async def test_waiting_request_whose_client_leaves_gives_up_its_place(cluster: Cluster,
                                                                      http: aiohttp.ClientSession) -> None:
    rep = await cluster.replica(max_num_seqs=1)
    rep.faults.hang_after = 1
    first = asyncio.create_task(_chat(http, rep.url))
    second = asyncio.create_task(_chat(http, rep.url))
    await wait_for(lambda: not (len(rep.sim.sched.waiters) < 1))
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)
    await wait_for(lambda: not (rep.sim.sched.waiters))
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    await wait_for(lambda: not (rep.sim.sched.running))


async def test_extra_load_faults_and_metrics_styles(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    rep = await cluster.replica()
    rep.faults.extra_running, rep.faults.extra_waiting = 7, 40
    r = parse_metrics((await _metrics(http, rep.url)).encode())
    assert r is not None and (r.running, r.waiting, r.kv) == (7, 40, 0.0)
    old = await cluster.replica(metrics="gpu", max_num_seqs=4)
    text = await _metrics(http, old.url)
    assert "vllm:gpu_cache_usage_perc{" in text and "vllm:kv_cache_usage_perc" not in text
    none = await cluster.replica(metrics="none")
    async with http.get(none.url + "/metrics") as resp:
        assert resp.status == 404
    rep.faults.metrics_status = 500
    async with http.get(rep.url + "/metrics") as resp:
        assert resp.status == 500


def test_speed_and_max_num_seqs_on_the_command_line() -> None:
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "teraproxy", "sim", "--port", str(port), "--max-num-seqs", "1",
                          "--speed", "0.5", "--ttft", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout is not None
        assert b"sim: serving" in p.stdout.readline()

        async def check() -> tuple[float, str]:
            async with aiohttp.ClientSession() as http:
                url = f"http://127.0.0.1:{port}"
                t0 = time.monotonic()
                await _chat(http, url, stream=False)
                return time.monotonic() - t0, await _metrics(http, url)

        took, text = asyncio.run(check())
        assert took >= 0.002  # --ttft 1 at --speed 0.5 is at least 2 ms
        assert "vllm:num_requests_running" in text
    finally:
        stop_process(p)
    bad = subprocess.run([sys.executable, "-m", "teraproxy", "sim", "--port", "1", "--speed", "0"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--speed" in bad.stderr
