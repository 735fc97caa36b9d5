"""Fixtures: real `teraproxy sim` replicas and a real proxy, on loopback sockets.

In-process servers (same event loop as the test) are used where a test needs to steer a
replica's faults or read its counters directly; CLI tests start real subprocesses.
"""

from __future__ import annotations

import asyncio
import io
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web
from hypothesis import settings

from teraproxy.app import ACCESS, LIVE, start_servers
from teraproxy.config import Config, load_config, parse_config
from teraproxy.sim import Faults, Sim, SimOptions, start_sim
from teraproxy.upstreams import ModelPool

if TYPE_CHECKING:
    from tests.redisd import RedisServer

MODEL = "Qwen/Qwen3-8B"
# Tests must not depend on machine speed: no per-example deadline for property tests (the default 200 ms
# failed a correct test on a loaded 2-core machine).
settings.register_profile("teraproxy", deadline=None)
settings.load_profile("teraproxy")
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Replica:
    def __init__(self, runner: web.AppRunner, sim: Sim, port: int) -> None:
        self.runner = runner
        self.sim = sim
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    @property
    def faults(self) -> Faults:
        return self.sim.faults

    @property
    def stats(self) -> Any:
        return self.sim.stats

    async def stop(self) -> None:
        await self.runner.cleanup()


class Cluster:
    """Sims and proxies started by one test; all stopped at its end."""

    def __init__(self) -> None:
        self.replicas: list[Replica] = []
        self.runners: list[web.AppRunner] = []

    async def replica(self, model: str = MODEL, port: int | None = None, **opts: Any) -> Replica:
        port = port or free_port()
        runner, sim = await start_sim("127.0.0.1", port, SimOptions(model=model, **opts))
        r = Replica(runner, sim, port)
        self.replicas.append(r)
        return r

    async def raw_upstream(self, handler: Any, more: tuple[tuple[str, str, Any], ...] = ()) -> str:
        """An upstream with POST /v1/chat/completions (and ``more`` (method, path, handler) routes) for
        wire behaviour the sim has no flag for; returns its base URL."""
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        for method, path, h in more:
            app.router.add_route(method, path, h)
        runner = web.AppRunner(app)
        await runner.setup()
        self.runners.append(runner)
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return f"http://127.0.0.1:{port}"

    async def proxy(self, replicas: list[Replica] | None = None, **over: Any) -> Proxy:
        raw: dict[str, Any] = {
            "listen": f"127.0.0.1:{free_port()}",
            "admin_listen": f"127.0.0.1:{free_port()}",
            "auth": "off",
            "health": {"enabled": False},
            "load": {"enabled": False},  # no /metrics scrapes hitting hand-written replicas; load tests set it
            "models": [{"id": MODEL, "replicas": [{"url": r.url} for r in replicas or []]}],
        }
        raw.update(over)
        config = parse_config(raw)
        app, runners = await start_servers(config)
        self.runners[:0] = list(reversed(runners))
        return Proxy(config, app)

    async def proxy_from_file(self, path: Path) -> Proxy:
        """A proxy started from a config file, as `teraproxy serve --config` does (so it can reload)."""
        config = load_config(path)
        app, runners = await start_servers(config, str(path))
        self.runners[:0] = list(reversed(runners))
        return Proxy(config, app)

    async def close(self) -> None:
        for runner in self.runners:
            await runner.cleanup()
        for r in self.replicas:
            await r.stop()
        # transports closed above finish on the loop's next iterations (connection_lost is scheduled
        # with call_soon); let them, or the loop ends with "closing" transports and GC warns about them
        for _ in range(5):
            await asyncio.sleep(0)


class Proxy:
    def __init__(self, config: Config, app: web.Application) -> None:
        self.config = config
        self.app = app
        self.access = io.BytesIO()
        if config.log.access_log:  # the real writer, into a buffer the test can read
            app[ACCESS].stream = self.access
        self.base = f"http://{config.listen}"
        self.v1 = f"{self.base}/v1"
        self.admin = f"http://{config.admin_listen}" if config.admin_listen else None

    @property
    def table(self) -> dict[str, ModelPool]:
        """The live routing table (a reload replaces it)."""
        return self.app[LIVE].current.table

    def access_lines(self) -> list[dict[str, Any]]:
        self.app[ACCESS].flush()
        return [orjson.loads(line) for line in self.access.getvalue().splitlines()]


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    c = Cluster()
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@asynccontextmanager
async def openai_client(proxy: Proxy, key: str = "sk-test", **kw: Any) -> AsyncIterator[Any]:
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=proxy.v1, api_key=key, max_retries=0, **kw) as client:
        yield client


async def paused_stream(proxy: Proxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw streamed chat request from a client with a small receive buffer that has stopped reading;
    resume with ``reader._transport.resume_reading()``."""
    body = orjson.dumps({"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.config.listen.port, limit=2**20)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    reader._transport.pause_reading()  # type: ignore[attr-defined]
    return reader, writer


async def wait_for(pred: Any, timeout: float = 5.0, step: float = 0.02) -> float:  # noqa: ASYNC109
    """Poll until pred() is true; returns the seconds it took. Fails the test on timeout."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(step)
    return time.monotonic() - t0


# -- subprocess helpers -------------------------------------------------------------------------
def run_cli(*args: str, timeout: float = 30, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "teraproxy", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kw)


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Subprocesses a test starts; terminated (by their own pid) at its end."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        stop_process(p)


def stop_process(p: subprocess.Popen[Any]) -> None:
    """SIGTERM a process this test started (by its own pid), SIGKILL after 10 s; close its pipes."""
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for f in (p.stdout, p.stderr):
        if f is not None:
            f.close()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port (tests that need Redis take this)."""
    from tests.redisd import RedisServer  # here: redisd imports free_port from this module

    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()
