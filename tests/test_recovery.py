"""Breaker and health together: a recovered replica takes traffic at once, and requests for a model
whose only replica is on trial wait for the trial's verdict instead of failing with 503."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
import orjson

from tests.conftest import MODEL, Cluster, Proxy, free_port, wait_for


def chat(max_tokens: int) -> bytes:
    return orjson.dumps({"model": MODEL, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "x"}]})


async def post(http: aiohttp.ClientSession, p: Proxy, body: bytes) -> tuple[int, Any]:
    async with http.post(f"{p.v1}/chat/completions", data=body) as resp:
        return resp.status, orjson.loads(await resp.read())


class Forwarder:
    """A TCP forwarder on a fixed loopback port that can be stopped (listener and connections gone:
    the replica looks dead) and started again (the replica is back)."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            writers = list(self.writers)
            for w in writers:
                w.transport.abort()
            for w in writers:  # until connection_lost ran: a transport left closing warns at a later GC
                with contextlib.suppress(ConnectionError):
                    await w.wait_closed()
            await self.server.wait_closed()
            self.server = None

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        self.writers.add(uw)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, uw), pipe(ur, writer))
        self.writers.discard(writer)
        self.writers.discard(uw)


async def test_replica_back_after_outage_serves_at_once(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    """The issue's reproduction: the breaker opened during an outage, the health check brought the
    replica back with a warm-up generation: that warm-up was the trial, so nobody gets a 503."""
    r = await cluster.replica(reasoning_field="none", ttft_ms=1, itl_ms=20)
    fwd = Forwarder(r.port)
    await fwd.start()
    try:
        p = await cluster.proxy(
            models=[{"id": MODEL, "replicas": [{"url": fwd.url}]}],
            health={"interval": "300ms", "timeout": "200ms", "fall": 2, "rise": 1, "slow_start": 0},
            breaker={"failures": 1, "open": "10m", "max_open": "10m", "trial_wait": 0}, retry={"attempts": 1})
        rep = p.table[MODEL].replicas[0]
        await wait_for(lambda: rep.up, 5)
        await fwd.stop()
        assert (await post(http, p, chat(1)))[0] == 502  # refused: the breaker opens (fall 2 at 300 ms: still up)
        assert rep.breaker.state == "open"
        await wait_for(lambda: not rep.up, 5)
        before = r.stats.generation_requests
        await fwd.start()
        await wait_for(lambda: rep.up, 5)
        assert r.stats.generation_requests == before + 1  # the warm-up
        assert rep.breaker.state == "closed"
        long = asyncio.ensure_future(post(http, p, chat(20)))
        short = await asyncio.gather(*(post(http, p, chat(1)) for _ in range(20)))
        assert [s for s, _ in short] == [200] * 20 and (await long)[0] == 200
    finally:
        await fwd.stop()


async def test_requests_wait_for_the_half_open_trial(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    """No health checks: a client request is the trial; the others wait for its verdict, then go."""
    r = await cluster.replica(reasoning_field="none", ttft_ms=1, itl_ms=30)
    r.faults.fail_status, r.faults.fail_count = 500, 1
    p = await cluster.proxy([r], breaker={"failures": 1, "open": "200ms", "trial_wait": "30s"},
                            retry={"attempts": 1})
    rep = p.table[MODEL].replicas[0]
    assert (await post(http, p, chat(1)))[0] == 500
    await wait_for(lambda: rep.breaker.state == "half_open", 5)
    trial = asyncio.ensure_future(post(http, p, chat(15)))
    await wait_for(rep.breaker.trial_in_flight, 5)
    short = asyncio.gather(*(post(http, p, chat(1)) for _ in range(20)))
    await wait_for(lambda: rep.trial is not None, 5)  # they are waiting, not answered
    assert not short.done() and r.stats.generation_requests == 2  # the failure and the trial only
    assert [s for s, _ in await short] == [200] * 20 and (await trial)[0] == 200
    assert rep.breaker.state == "closed" and r.stats.completed == 21


async def test_failed_trial_answers_the_waiters_at_once(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    r = await cluster.replica(reasoning_field="none")
    r.faults.fail_status, r.faults.fail_count = 500, 1
    p = await cluster.proxy([r], breaker={"failures": 1, "open": "200ms", "trial_wait": "10m"},
                            retry={"attempts": 1}, timeouts={"headers": "500ms"})
    rep = p.table[MODEL].replicas[0]
    assert (await post(http, p, chat(1)))[0] == 500
    await wait_for(lambda: rep.breaker.state == "half_open", 5)
    r.faults.hang_before_headers = True
    trial = asyncio.ensure_future(post(http, p, chat(1)))
    await wait_for(rep.breaker.trial_in_flight, 5)
    waiters = await asyncio.gather(*(post(http, p, chat(1)) for _ in range(5)))
    assert (await trial)[0] == 504  # the trial timed out: the breaker is open again
    assert [(s, b["error"]["code"]) for s, b in waiters] == [(503, "no_healthy_replica")] * 5
    assert rep.breaker.state == "open" and r.stats.generation_requests == 2


async def test_trial_wait_is_bounded(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    r = await cluster.replica(reasoning_field="none")
    r.faults.fail_status, r.faults.fail_count = 500, 1
    p = await cluster.proxy([r], breaker={"failures": 1, "open": "200ms", "trial_wait": "300ms"},
                            retry={"attempts": 1}, timeouts={"headers": "1m"})
    rep = p.table[MODEL].replicas[0]
    assert (await post(http, p, chat(1)))[0] == 500
    await wait_for(lambda: rep.breaker.state == "half_open", 5)
    r.faults.hang_before_headers = True
    trial = asyncio.ensure_future(post(http, p, chat(1)))
    await wait_for(rep.breaker.trial_in_flight, 5)
    status, body = await post(http, p, chat(1))
    assert (status, body["error"]["code"]) == (503, "no_healthy_replica")
    assert rep.breaker.trial_in_flight()  # answered by the bound, while the trial is still out
    trial.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await trial  # let the client close its connection now, not at some later test's GC
