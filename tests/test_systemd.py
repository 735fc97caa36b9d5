"""systemd integration against real sockets: a datagram socket standing in for systemd's notify socket
(path and abstract), listening sockets handed to a child as LISTEN_FDS, two instances on one port."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from teraproxy import systemd

from .conftest import MODEL, ROOT, Cluster, free_port, write_config
from .test_service import _raw, _until

pytestmark = pytest.mark.timeout(90)


class NotifySocket:
    """A bound AF_UNIX datagram socket, read as systemd reads its notify socket."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setblocking(False)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def drain(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                break
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            self.messages.append((time.monotonic(), fields))
        return [m for _, m in self.messages]

    async def wait_for(self, key: str, after: int = 0, timeout: float = 10.0) -> dict[str, str]:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while True:
            for m in self.drain()[after:]:
                if key in m:
                    return m
            assert time.monotonic() < deadline, f"no {key} from teraproxy; got {self.drain()}"
            await asyncio.sleep(0.02)


def _serve(path: Path, env: dict[str, str], log: Path, *args: str, **kw: Any) -> subprocess.Popen[bytes]:
    with log.open("wb") as err:
        return subprocess.Popen([sys.executable, "-m", "teraproxy", "serve", "--config", str(path), *args],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, **env}, **kw)


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
async def test_notify_ready_status_reload_watchdog_stopping(cluster: Cluster, tmp_path: Path, procs: list[Any],
                                                            abstract: bool) -> None:
    r = await cluster.replica()
    address = f"@teraproxy-test-{os.getpid()}-{free_port()}" if abstract else str(tmp_path / "notify")
    notify = NotifySocket(address)
    listen, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    raw = _raw({}, listen, admin, health={"interval": "2s", "timeout": "1s", "warmup": False})
    raw["models"] = [{"id": MODEL, "replicas": [{"url": r.url}]}]
    path = write_config(tmp_path / "c.yaml", raw)
    proc = _serve(path, {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}, tmp_path / "log")
    procs.append(proc)
    ready = await notify.wait_for("READY")
    assert r.stats.health_checks >= 1  # READY only after the first round of health checks
    assert ready["STATUS"] == "1/1 replicas up, 0 in flight"
    n = len(notify.drain())
    await asyncio.sleep(0.5)  # WATCHDOG_USEC/2 = 0.1 s: about 5 pings, sent from the event loop
    pings = [m for m in notify.drain()[n:] if m == {"WATCHDOG": "1"}]
    assert len(pings) >= 2
    n = len(notify.drain())
    proc.send_signal(signal.SIGHUP)
    reloading = await notify.wait_for("RELOADING", after=n)
    assert int(reloading["MONOTONIC_USEC"]) == pytest.approx(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000,
                                                             abs=5_000_000)
    after = notify.drain()[n:]
    assert after.index(reloading) < next(i for i, m in enumerate(after) if "READY" in m)
    n = len(notify.drain())
    proc.send_signal(signal.SIGTERM)
    stopping = await notify.wait_for("STOPPING", after=n)
    assert stopping["STATUS"].startswith("draining: ")
    assert await asyncio.to_thread(proc.wait, 10) == 0
    notify.sock.close()


def test_watchdog_interval_and_listen_fds_ignore_other_processes() -> None:
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "4000000"}) == 2.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}) is None
    assert systemd.watchdog_interval({}) is None
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "api"}
    assert systemd.listen_fds(env) == [] and env == {}  # meant for another process; removed all the same


_ACTIVATE = """
import os, sys
os.dup2(int(sys.argv[1]), 3)  # as systemd does: the first passed socket is fd 3
os.environ["LISTEN_PID"] = str(os.getpid()); os.environ["LISTEN_FDS"] = "1"
os.execv(sys.executable, [sys.executable, "-m", "teraproxy", "serve", "--config", sys.argv[2]])
"""


async def test_socket_activation_serves_inherited_socket_across_a_restart(cluster: Cluster, tmp_path: Path,
                                                                          procs: list[Any]) -> None:
    r = await cluster.replica()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(64)
    port = lsock.getsockname()[1]
    # the config names another port: an inherited socket wins, nothing is bound for the API
    raw = _raw({}, f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", health={"enabled": False})
    raw["models"] = [{"id": MODEL, "replicas": [{"url": r.url}]}]
    path = write_config(tmp_path / "c.yaml", raw)

    def start(n: int) -> subprocess.Popen[bytes]:
        with (tmp_path / f"log{n}").open("wb") as err:
            p = subprocess.Popen([sys.executable, "-c", _ACTIVATE, str(lsock.fileno()), str(path)], cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=err, pass_fds=(lsock.fileno(),))
        procs.append(p)
        return p

    async def models(http: aiohttp.ClientSession) -> int:
        async with http.get(f"http://127.0.0.1:{port}/v1/models") as resp:
            return resp.status

    first = start(1)
    async with aiohttp.ClientSession() as http:
        await _until(lambda: _ok(models(http)))
        first.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(first.wait, 10) == 0
        # no process now: the kernel still accepts (the socket is held open) and queues the request
        pending = asyncio.create_task(models(http))
        await asyncio.sleep(0.3)
        assert not pending.done()
        start(2)
        assert await asyncio.wait_for(pending, 15) == 200  # answered by the next process, never refused
    assert "(inherited socket)" in (tmp_path / "log1").read_text()
    lsock.close()


async def _ok(coro: Any) -> bool:
    try:
        return bool(await coro == 200)
    except aiohttp.ClientConnectionError:
        return False


async def test_two_instances_share_one_port_with_reuse_port(cluster: Cluster, tmp_path: Path,
                                                           procs: list[Any]) -> None:
    r = await cluster.replica()
    listen = f"127.0.0.1:{free_port()}"
    admins = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    raw = _raw({}, listen, admins[0], health={"enabled": False}, listen_reuse_port=True)
    raw["models"] = [{"id": MODEL, "replicas": [{"url": r.url}]}]
    path = write_config(tmp_path / "c.yaml", raw)
    for i, admin in enumerate(admins):  # one config file, each instance with its own admin port
        procs.append(_serve(path, {}, tmp_path / f"log{i}", "--admin-listen", admin))
    async with aiohttp.ClientSession() as http:
        for admin in admins:
            await _until(lambda a=admin: _ok(_status(http, f"http://{a}/readyz")))
        for _ in range(40):  # a new connection each time: the kernel spreads them over both
            async with http.get(f"http://{listen}/v1/models", headers={"Connection": "close"}) as resp:
                assert resp.status == 200
        served = []
        for admin in admins:
            async with http.get(f"http://{admin}/metrics") as resp:
                text = await resp.text()
            ok = 'teraproxy_requests_total{code="200",model="(none)"}'  # /v1/models names no model
            line = next(x for x in text.splitlines() if x.startswith(ok))
            served.append(float(line.rsplit(" ", 1)[1]))
    assert sum(served) == 40 and all(n > 0 for n in served), served


async def _status(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url) as resp:
        return resp.status
