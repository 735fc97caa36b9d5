"""Reads the proxy makes on its own behalf are bounded, and the access log never blocks the event
loop: a replica with an endless health or models answer, stdout as a pipe nobody reads."""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading
from typing import BinaryIO

import aiohttp
import orjson
from aiohttp import web

from teraproxy.app import ACCESS
from tests.conftest import MODEL, Cluster, wait_for

BODY = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})


async def _endless(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    await resp.prepare(request)
    chunk = b"x" * 65536
    try:
        for _ in range(100_000):  # 6 GiB unless the reader hangs up
            await resp.write(chunk)
    except ConnectionError:
        pass
    return resp


async def _ok(request: web.Request) -> web.Response:
    return web.Response()


async def _models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": MODEL}]})


async def _chat(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"choices": []})


async def _check_fails(cluster: Cluster, health: object, models: object, reason: str) -> None:
    url = await cluster.raw_upstream(_chat, more=(("GET", "/health", health), ("GET", "/v1/models", models)))
    p = await cluster.proxy(health={"interval": "100ms", "timeout": "20s", "rise": 1},
                            models=[{"id": MODEL, "replicas": [{"url": url}]}])
    rep = p.table[MODEL].replicas[0]
    await wait_for(lambda: reason in (rep.reason or ""), 10)  # long before the 20 s timeout
    assert not rep.up


async def test_endless_health_answer_fails_the_check(cluster: Cluster) -> None:
    await _check_fails(cluster, _endless, _models, "health check failed: answer over 65536 bytes")


async def test_endless_models_answer_fails_the_admission(cluster: Cluster) -> None:
    await _check_fails(cluster, _ok, _endless, "admission check failed: answer over")


async def _requests(p_v1: str, n: int) -> list[int]:
    async with aiohttp.ClientSession() as http:
        async def one() -> int:
            async with http.post(f"{p_v1}/chat/completions", data=BODY) as resp:
                await resp.read()
                return resp.status

        out: list[int] = []
        for _ in range(n // 10):
            out += await asyncio.gather(*(one() for _ in range(10)))
        return out


def _writer(fd: int) -> BinaryIO:
    return open(fd, "wb", buffering=0)


async def _metric(admin: str, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{admin}/metrics") as resp:
        text = await resp.text()
    (line,) = [x for x in text.splitlines() if x.startswith(name + " ")]
    return float(line.split()[1])


async def test_access_log_on_a_pipe_nobody_reads_never_blocks_requests(cluster: Cluster) -> None:
    r = await cluster.replica()
    p = await cluster.proxy([r], log={"access_log": True, "access_log_buffer": "16KiB"})
    rfd, wfd = os.pipe()
    fcntl.fcntl(wfd, fcntl.F_SETPIPE_SZ, 4096)  # a small pipe: full after a dozen lines
    alog = p.app[ACCESS]
    alog.stream = _writer(wfd)  # closed below
    try:
        statuses = await asyncio.wait_for(_requests(p.v1, 200), 30)  # the loop never waits for the pipe
        assert statuses == [200] * 200
        alog.hand_over()
        await wait_for(lambda: alog.dropped > 0, 5)
        assert await _metric(p.admin or "", "teraproxy_access_log_dropped_total") == alog.dropped
    finally:
        os.set_blocking(rfd, False)
        while not alog.flush(0.01):  # let the writer finish before the app closes its log
            try:
                os.read(rfd, 65536)
            except BlockingIOError:
                pass
        alog.stream.close()
        os.close(rfd)


async def test_access_log_with_a_reader_loses_no_line(cluster: Cluster) -> None:
    r = await cluster.replica()
    p = await cluster.proxy([r], log={"access_log": True})
    rfd, wfd = os.pipe()
    alog = p.app[ACCESS]
    alog.stream = _writer(wfd)  # closed below
    got = bytearray()

    def read() -> None:
        while chunk := os.read(rfd, 65536):
            got.extend(chunk)

    reader = threading.Thread(target=read, name="test-stdout-reader")
    reader.start()
    try:
        assert await asyncio.wait_for(_requests(p.v1, 300), 30) == [200] * 300
        assert alog.flush(10)
    finally:
        alog.stream.close()  # EOF for the reader
        await asyncio.to_thread(reader.join, 10)
        os.close(rfd)
    lines = [orjson.loads(x) for x in got.splitlines()]
    assert len(lines) == 300 and alog.dropped == 0
    assert len({line["rid"] for line in lines}) == 300
