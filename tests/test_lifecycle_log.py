"""A real `teraproxy serve`: lifecycle lines on stderr at the right level (INFO for normal events,
WARNING for trouble), shutdown logged at its start and end, and the first request after the
"listening" line already served (replicas are assumed up at start-up)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp
import orjson

from tests.conftest import MODEL, ROOT, Cluster, free_port, write_config

CHAT = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
LINE = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+): (.*)$")


class Stderr:
    """The subprocess's stderr, parsed into (level, logger, message) as it comes."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.stream = stream
        self.lines: list[tuple[str, str, str]] = []

    async def until(self, pattern: str, timeout: float = 15) -> tuple[str, str, str]:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.stream.readline()
                assert raw, f"stderr ended before {pattern!r}: {self.lines}"
                m = LINE.match(raw.decode().rstrip())
                assert m, raw  # every line is a formatted log line: no traceback, no stray print
                entry = (m.group(1), m.group(2), m.group(3))
                self.lines.append(entry)
                if re.search(pattern, entry[2]):
                    return entry


async def test_serve_logs_lifecycle_at_info_and_trouble_at_warning(cluster: Cluster, tmp_path: Path) -> None:
    sim = await cluster.replica(tokens=2)
    port = free_port()
    cfg = write_config(tmp_path / "c.yaml", {
        "listen": f"127.0.0.1:{port}", "auth": "off", "log": {"access_log": False},
        "health": {"interval": "100ms", "timeout": "500ms", "fall": 1, "rise": 1, "slow_start": 0},
        "models": [{"id": MODEL, "replicas": [{"url": sim.url}]}]})
    env = {k: v for k, v in os.environ.items() if not k.startswith("TERAPROXY_")}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "teraproxy", "serve", "--config", str(cfg),
                                                cwd=ROOT, env=env, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stderr is not None
        err = Stderr(proc.stderr)
        level, name, msg = await err.until("listening on")
        assert (level, name) == ("INFO", "teraproxy") and f"127.0.0.1:{port}" in msg
        async with aiohttp.ClientSession() as http:  # right after the listening line: served, no 503
            async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", data=CHAT) as resp:
                assert resp.status == 200, await resp.text()
        sim.faults.health_status = 503
        assert (await err.until("is down"))[:2] == ("WARNING", "teraproxy.health")  # trouble
        sim.faults.health_status = 200
        assert (await err.until("is up"))[:2] == ("INFO", "teraproxy.health")  # back to normal
        proc.send_signal(signal.SIGTERM)
        level, name, msg = await err.until("shutting down")
        assert level == "INFO" and msg.startswith("SIGTERM: shutting down") and "0 request(s) in flight" in msg
        level, _, msg = await err.until("shut down in")
        assert level == "INFO"
        async with asyncio.timeout(15):
            assert await proc.wait() == 0
        assert [e for e in err.lines if e[0] not in ("INFO", "WARNING")] == []
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
