"""The daemon under real signals: a `teraproxy serve` subprocess reloaded with SIGHUP while streams run,
drained with SIGTERM, and the `teraproxy reload` command. Replicas are real sims in the test's loop."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from .conftest import MODEL, ROOT, Cluster, Replica, free_port, run_cli, stop_process, write_config

OTHER = "other/model"
MSGS = [{"role": "user", "content": "hi"}]
pytestmark = pytest.mark.timeout(120)


class Served:
    """A `teraproxy serve` subprocess and its addresses."""

    def __init__(self, path: Path, raw: dict[str, Any], proc: subprocess.Popen[bytes], log: Path) -> None:
        self.path, self.raw, self.proc, self.log = path, raw, proc, log
        self.base = f"http://{raw['listen']}"
        self.admin = f"http://{raw['admin_listen']}"

    def write(self, models: dict[str, list[Replica]], **over: Any) -> None:
        self.raw = _raw(models, self.raw["listen"], self.raw["admin_listen"], **over)
        write_config(self.path, self.raw)

    def stderr(self) -> str:
        return self.log.read_text()


def _raw(models: dict[str, list[Replica]], listen: str, admin: str, /, **over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "listen": listen, "admin_listen": admin, "auth": "off", "log": {"access_log": False},
        "health": {"interval": "100ms", "rise": 1, "warmup": False, "timeout": "1s"},
        "models": [{"id": m, "replicas": [{"url": r.url} for r in reps]} for m, reps in models.items()]}
    raw.update(over)
    return raw


async def _admin(s: aiohttp.ClientSession, url: str) -> Any:
    async with s.get(url) as resp:
        return await resp.json()


async def _until(pred: Any, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not await pred():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def serve(tmp_path: Path, models: dict[str, list[Replica]], procs: list[Any], /, **over: Any) -> Served:
    path = tmp_path / "teraproxy.yaml"
    raw = _raw(models, f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", **over)
    write_config(path, raw)
    log = tmp_path / "serve.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "teraproxy", "serve", "--config", str(path)],  # noqa: ASYNC220
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    procs.append(proc)
    s = Served(path, raw, proc, log)

    async def ready() -> bool:
        assert proc.poll() is None, s.stderr()
        try:
            async with aiohttp.ClientSession() as c, c.get(f"{s.admin}/readyz") as resp:
                return resp.status == 200
        except aiohttp.ClientConnectionError:
            return False

    await _until(ready)
    return s


async def _stream(client: openai.AsyncOpenAI, model: str) -> int:
    """One whole stream; returns its content chunks. Raises on any error or a missing finish."""
    stream = await client.chat.completions.create(model=model, messages=MSGS, stream=True)  # type: ignore
    chunks, finish = 0, None
    async for c in stream:
        if c.choices and c.choices[0].delta.content:
            chunks += 1
        if c.choices and c.choices[0].finish_reason:
            finish = c.choices[0].finish_reason
    assert finish == "stop", "stream ended without its finish_reason"
    return chunks


async def test_twenty_sighup_reloads_under_streams_lose_nothing(cluster: Cluster, tmp_path: Path,
                                                                procs: list[Any]) -> None:
    tokens = 12
    ms = [await cluster.replica(itl_ms=15, tokens=tokens) for _ in range(4)]
    os_ = [await cluster.replica(model=OTHER, itl_ms=15, tokens=tokens) for _ in range(2)]
    s = await serve(tmp_path, {MODEL: ms[:2]}, procs)
    rng = random.Random(11)
    done: list[int] = []
    stop = asyncio.Event()

    async def worker(client: openai.AsyncOpenAI) -> None:
        while not stop.is_set():
            done.append(await _stream(client, MODEL))

    removed_while_busy = 0
    async with openai.AsyncOpenAI(base_url=f"{s.base}/v1", api_key="x", max_retries=0) as client, \
            aiohttp.ClientSession() as http:
        workers = [asyncio.create_task(worker(client)) for _ in range(6)]
        other_streams: list[asyncio.Task[int]] = []
        current = {MODEL: ms[:2]}
        watch: dict[int, int] = {}  # id(sim) -> its generation count when it was removed
        for i in range(1, 21):
            # ms[0] always stays (it is up), so MODEL always has a replica that passed its checks
            new: dict[str, list[Replica]] = {MODEL: [ms[0], *rng.sample(ms[1:], rng.randint(0, 3))]}
            if i % 2:
                new[OTHER] = rng.sample(os_, rng.randint(1, 2))
            s.write(new)
            s.proc.send_signal(signal.SIGHUP)

            async def applied(n: int = i) -> bool:
                return bool((await _admin(http, f"{s.admin}/admin/config"))["reloads"] == n)

            await _until(applied)
            gone = [r for reps in current.values() for r in reps if all(r not in v for v in new.values())]
            for r in gone:
                removed_while_busy += r.stats.active > 0
                watch[id(r)] = r.stats.generation_requests
            for reps in new.values():  # listed again: may take requests again
                for r in reps:
                    watch.pop(id(r), None)
            for r in ms + os_:  # no new request reached a replica while it was removed
                if id(r) in watch:
                    assert r.stats.generation_requests == watch[id(r)], f"request landed on removed {r.url}"
            if OTHER in new:  # streams on the model that the next reload removes
                await _until(lambda: _ready(http, s))
                other_streams += [asyncio.create_task(_stream(client, OTHER)) for _ in range(2)]
                await asyncio.sleep(0.05)
            elif OTHER in current:
                with pytest.raises(openai.NotFoundError):
                    await client.chat.completions.create(model=OTHER, messages=MSGS)  # type: ignore[arg-type]
            current = new
            await asyncio.sleep(0.05)
        stop.set()
        results = await asyncio.gather(*workers, *other_streams)
        config = await _admin(http, f"{s.admin}/admin/config")
    assert all(n == done[0] for n in done) and len(done) > 30, done  # every stream whole, none truncated
    assert all(n == done[0] for n in results[len(workers):])  # the removed model's streams finished too
    assert removed_while_busy > 0  # replicas really were removed mid-stream
    assert config["reloads"] == 20 and config["reload_failures"] == 0
    assert "Traceback" not in s.stderr()


async def _ready(http: aiohttp.ClientSession, s: Served) -> bool:
    async with http.get(f"{s.admin}/readyz") as resp:
        return resp.status == 200


async def test_reload_command_applies_or_names_the_problem(cluster: Cluster, tmp_path: Path,
                                                           procs: list[Any]) -> None:
    r1, r2 = await cluster.replica(), await cluster.replica()
    s = await serve(tmp_path, {MODEL: [r1]}, procs)
    s.write({MODEL: [r1, r2]})
    out = await asyncio.to_thread(run_cli, "reload", "--config", str(s.path))
    assert out.returncode == 0 and out.stdout.startswith("reloaded: config sha256 "), out.stderr
    async with aiohttp.ClientSession() as http:
        doc = await _admin(http, f"{s.admin}/admin/upstreams")
        assert [r["url"] for r in doc["models"][0]["replicas"]] == [r1.url, r2.url]
        raw = dict(s.raw, retry={"attempts": "three"})
        write_config(s.path, raw)
        # `check` would catch this one: bypass it by asking the running proxy directly (SIGHUP)
        s.proc.send_signal(signal.SIGHUP)

        async def failed() -> bool:
            return bool((await _admin(http, f"{s.admin}/admin/config"))["reload_failures"] == 1)

        await _until(failed)
        async with http.get(f"{s.admin}/metrics") as resp:
            text = await resp.text()
    assert "teraproxy_config_reload_failures_total 1.0" in text
    assert "reload failed, still serving the previous config: retry.attempts: must be an integer >= 1" in s.stderr()
    out = await asyncio.to_thread(run_cli, "reload", "--config", str(s.path))
    assert out.returncode == 2 and "retry.attempts: must be an integer >= 1" in out.stderr


async def _raw_stream(base: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = orjson.dumps({"model": MODEL, "stream": True, "messages": MSGS})
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    return reader, writer


async def _read_to_end(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), 30)


async def test_sigterm_drains_streams_then_exits_0(cluster: Cluster, tmp_path: Path, procs: list[Any]) -> None:
    r = await cluster.replica(itl_ms=40, tokens=25)
    s = await serve(tmp_path, {MODEL: [r]}, procs)
    async with aiohttp.ClientSession() as http:
        idle = await asyncio.open_connection(*s.raw["listen"].split(":"))  # an idle keep-alive client
        reader, writer = await _raw_stream(s.base)
        s.proc.send_signal(signal.SIGTERM)
        await _until(lambda: _not_ready(http, s))  # /readyz says 503 from the drain's start
        with pytest.raises(OSError):  # the listener is closed at once: new connections are refused
            await asyncio.open_connection(*s.raw["listen"].split(":"))
        assert await asyncio.wait_for(idle[0].read(), 5) == b""  # the idle connection was closed
        data = await _read_to_end(reader)
    writer.close()
    idle[1].close()
    assert b'"finish_reason":"stop"' in data and b"error" not in data
    assert data.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert await asyncio.to_thread(s.proc.wait, 10) == 0
    err = s.stderr()
    assert "SIGTERM: shutting down: listeners close, 1 request(s) in flight get up to 30s" in err
    assert "shut down in " in err


async def _not_ready(http: aiohttp.ClientSession, s: Served) -> bool:
    async with http.get(f"{s.admin}/readyz") as resp:
        return resp.status == 503 and (await resp.text()) == "not ready: draining\n"


async def test_drain_deadline_ends_streams_with_an_error_event(cluster: Cluster, tmp_path: Path,
                                                               procs: list[Any]) -> None:
    r = await cluster.replica(itl_ms=50, tokens=400)  # a 20 s stream against a 0.5 s drain
    s = await serve(tmp_path, {MODEL: [r]}, procs, shutdown={"drain": "500ms"})
    reader, writer = await _raw_stream(s.base)
    await reader.readuntil(b'"content":')  # the stream is under way
    s.proc.send_signal(signal.SIGTERM)
    data = await _read_to_end(reader)
    writer.close()
    assert b'"code":"server_shutting_down"' in data
    # an error event, [DONE], and the chunked body's proper end: never a silent cut
    assert data.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert await asyncio.to_thread(s.proc.wait, 10) == 0
    assert "drain time (0.5s) is over: cut 1 answer(s) in progress" in s.stderr()
    await asyncio.sleep(0.3)
    assert r.stats.cancelled == 1  # the replica stopped generating for it


async def test_second_sigterm_exits_at_once(cluster: Cluster, tmp_path: Path, procs: list[Any]) -> None:
    r = await cluster.replica(itl_ms=50, tokens=400)
    s = await serve(tmp_path, {MODEL: [r]}, procs)
    _, writer = await _raw_stream(s.base)
    s.proc.send_signal(signal.SIGTERM)
    async with aiohttp.ClientSession() as http:
        await _until(lambda: _not_ready(http, s))
    s.proc.send_signal(signal.SIGINT)
    assert await asyncio.to_thread(s.proc.wait, 5) == 1
    writer.close()
    assert "second SIGINT during the drain: exiting now" in s.stderr()
    stop_process(s.proc)
