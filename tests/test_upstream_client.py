"""The upstream connection pool and edge cases found in review: each was a real bug once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from teraproxy.client import Client, PoolBusy
from teraproxy.exchange import UpstreamTimeout
from tests.conftest import MODEL, Cluster, paused_stream, wait_for

BODY = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})


async def _post(http: aiohttp.ClientSession, url: str, body: bytes = BODY) -> int:
    async with http.post(url, data=body) as resp:
        await resp.read()
        return resp.status


async def test_waiter_gets_the_connection_returned_to_the_pool(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    r = await cluster.replica(ttft_ms=200)
    p = await cluster.proxy([r], upstream={"max_connections": 1})
    url = f"{p.v1}/chat/completions"
    results = await asyncio.wait_for(asyncio.gather(*(_post(http, url) for _ in range(4))), 5)
    assert results == [200] * 4


async def test_idle_connections_of_one_replica_do_not_starve_another(cluster: Cluster,
                                                                      http: aiohttp.ClientSession) -> None:
    r1, r2 = await cluster.replica(), await cluster.replica(model="m2")
    p = await cluster.proxy(upstream={"max_connections": 1}, models=[
        {"id": MODEL, "replicas": [{"url": r1.url}]}, {"id": "m2", "replicas": [{"url": r2.url}]}])
    assert await _post(http, f"{p.v1}/chat/completions") == 200  # leaves an idle connection to r1
    body = orjson.dumps({"model": "m2", "messages": [{"role": "user", "content": "hi"}]})
    assert await asyncio.wait_for(_post(http, f"{p.v1}/chat/completions", body), 3) == 200


@contextlib.asynccontextmanager
async def _holding_server() -> AsyncIterator[tuple[str, int, bool]]:
    """A loopback server that accepts connections and holds them open, answering nothing; yields
    its origin for Client."""
    accepted: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read(1)

    srv = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield ("127.0.0.1", srv.sockets[0].getsockname()[1], False)
    finally:
        srv.close()
        for w in accepted:
            w.close()
            with contextlib.suppress(ConnectionError):
                await w.wait_closed()
        await srv.wait_closed()


async def test_pool_wait_is_bounded_and_wakeups_are_not_lost() -> None:
    loop = asyncio.get_running_loop()
    c = Client(limit=1, keepalive=4, connect_timeout=0.3)
    async with _holding_server() as origin:
        try:
            held, _ = await c._acquire(origin, loop)
            try:  # the only slot is busy: a waiter gives up after connect_timeout
                await c._acquire(origin, loop)
                raise AssertionError("expected a timeout")
            except PoolBusy as e:
                assert "max_connections" in str(e)
            b = asyncio.create_task(c._acquire(origin, loop))
            d = asyncio.create_task(c._acquire(origin, loop))
            await asyncio.sleep(0.01)
            c._close(held)  # frees the slot and wakes b...
            b.cancel()  # ...whose client leaves in the same tick: d must get the slot instead
            conn, reused = await asyncio.wait_for(d, 1)
            assert not reused and c.open == 1
            c._close(conn)
            assert c.open == 0
        finally:
            await c.close()


async def test_slow_client_is_not_blamed_on_the_replica(cluster: Cluster) -> None:
    r = await cluster.replica(tokens=60000, reasoning_field="none")
    p = await cluster.proxy([r], timeouts={"idle": "1s"})
    reader, writer = await paused_stream(p)  # stalls longer than timeouts.idle
    await asyncio.sleep(2.5)
    reader._transport.resume_reading()  # type: ignore[attr-defined]
    raw = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    await writer.wait_closed()
    rep = p.table[MODEL].replicas[0]
    assert b"went silent" not in raw and raw.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert rep.failures == 0 and rep.breaker.state == "closed"


async def _raw(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    return data


async def test_non_latin1_forwarded_for_is_passed_through(cluster: Cluster) -> None:
    r = await cluster.replica()
    p = await cluster.proxy([r])
    data = await _raw(p.config.listen.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                      b"X-Forwarded-For: \xe2\x82\xac\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY)
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    assert r.stats.last_headers["X-Forwarded-For"] == "€, 127.0.0.1"


async def test_undecodable_body_is_400(cluster: Cluster) -> None:
    r = await cluster.replica()
    p = await cluster.proxy([r])
    body = b"\x1f\x8b\x08\x00garbagegarbage"
    data = await _raw(p.config.listen.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                      b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert data.startswith(b"HTTP/1.1 400") and b'"code":"invalid_body"' in data, data[:300]


async def test_health_survives_a_malformed_models_answer(cluster: Cluster) -> None:
    state = {"bad": True}

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": None} if state["bad"] else {"object": "list", "data": [{"id": MODEL}]})

    async def health(request: web.Request) -> web.Response:
        return web.Response()

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"choices": []})

    url = await cluster.raw_upstream(chat, more=(("GET", "/v1/models", models), ("GET", "/health", health)))
    p = await cluster.proxy(health={"interval": "100ms", "rise": 1},
                            models=[{"id": MODEL, "replicas": [{"url": url}]}])
    rep = p.table[MODEL].replicas[0]
    await asyncio.sleep(0.4)
    assert not rep.up and "serves no model" in rep.reason
    state["bad"] = False
    await wait_for(lambda: rep.up, 2)  # the watch is still alive and admits it


async def test_bytes_after_a_complete_answer_are_not_pooled(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    """A replica that sends a stray second response: the connection is dropped, never reused."""
    answer = b'{"choices":[]}'
    one = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer)
    seen: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(1)
        while await reader.read(65536):
            writer.write(one + b"HTTP/1.1 500 Oops\r\nContent-Length: 4\r\n\r\nboom")  # a stray second answer
            await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        p = await cluster.proxy(models=[{"id": MODEL, "replicas": [{"url": f"http://127.0.0.1:{port}"}]}])
        for _ in range(3):
            async with http.post(f"{p.v1}/chat/completions", data=BODY) as resp:
                assert resp.status == 200 and await resp.read() == answer  # the stray answer touched nothing
        assert len(seen) == 3  # a fresh connection each time: the desynchronised one was not reused
    finally:
        srv.close()
        await srv.wait_closed()


async def test_interim_1xx_answer_is_skipped(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    answer = b'{"choices":[]}'

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n"
                     b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(answer), answer))
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
        p = await cluster.proxy(models=[{"id": MODEL, "replicas": [{"url": url}]}])
        async with http.post(f"{p.v1}/chat/completions", data=BODY) as resp:
            assert resp.status == 200 and await resp.read() == answer and "Link" not in resp.headers
    finally:
        srv.close()
        await srv.wait_closed()


async def test_wakeup_in_the_same_turn_as_a_deadline_is_passed_on() -> None:
    loop = asyncio.get_running_loop()
    async with _holding_server() as origin:
        c = Client(limit=1, keepalive=5, connect_timeout=0.5)
        try:
            held, _ = await c._acquire(origin, loop)
            t0 = loop.time()
            a = asyncio.create_task(c._acquire(origin, loop))  # deadline t0 + 0.5
            await asyncio.sleep(0.1)
            b = asyncio.create_task(c._acquire(origin, loop))  # deadline t0 + 0.6
            await asyncio.sleep(0)
            # a busy loop spans a's deadline; the slot is freed just before it, in the same turn
            loop.call_at(t0 + 0.45, time.sleep, 0.1)
            loop.call_at(t0 + 0.49, c._close, held)
            await asyncio.gather(a, return_exceptions=True)
            conn, _ = await b  # b must get the free slot, not time out beside it
            c._close(conn)
            assert c.open == 0
        finally:
            await c.close()


async def test_cancelled_connect_frees_its_slot_once(monkeypatch: Any) -> None:
    from teraproxy import exchange

    loop = asyncio.get_running_loop()
    async with _holding_server() as origin:
        c = Client(limit=1, keepalive=5, connect_timeout=1)
        victim: list[asyncio.Task[Any]] = []
        original = exchange.Conn.connection_made

        def made(self: Any, transport: Any) -> None:  # timing only: cancel in the turn the socket connects
            original(self, transport)
            if victim and not victim[0].done():
                victim[0].cancel()

        try:
            monkeypatch.setattr(exchange.Conn, "connection_made", made)
            c.open += 1  # the slot _acquire would have taken
            victim.append(asyncio.create_task(c._dial(origin, loop)))
            await asyncio.gather(victim[0], return_exceptions=True)
            monkeypatch.undo()
            await asyncio.sleep(0.05)
            assert c.open == 0  # freed once, not twice
            conn, _ = await c._acquire(origin, loop)
            assert c.open == 1
            try:  # and the limit still holds
                await c._acquire(origin, loop)
                raise AssertionError("a second connection beyond the limit")
            except PoolBusy:
                pass
            c._close(conn)
        finally:
            await c.close()


async def test_stalled_client_is_disconnected_and_replica_freed(cluster: Cluster,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """A client that stops reading for timeouts.client_stall is cut off; the replica is released, not blamed."""
    r = await cluster.replica(tokens=60000, reasoning_field="none")
    p = await cluster.proxy([r], timeouts={"client_stall": "700ms"})
    _, writer = await paused_stream(p)  # and never reads again
    await wait_for(lambda: r.stats.active == 1, 5)
    took = await wait_for(lambda: r.stats.active == 0, 5)
    assert 0.5 < took < 3 and r.stats.cancelled == 1 and r.stats.completed == 0
    rep = p.table[MODEL].replicas[0]
    assert rep.failures == 0 and rep.breaker.state == "closed" and rep.in_flight == 0
    assert [line["status"] for line in p.access_lines()] == [499]
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]  # a stalled client is no error
    writer.close()
    await writer.wait_closed()


async def test_take_body_keeps_receiving_until_on_body_is_replaced() -> None:
    """The relays drain take_body() across awaits (the first write to a slow client can wait):
    bytes that arrive meanwhile must land in that same list, or they would be lost."""
    go = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        await go.wait()
        writer.write(b"cd")
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    c = Client(limit=4, keepalive=5, connect_timeout=1)
    try:
        origin = ("127.0.0.1", srv.sockets[0].getsockname()[1], False)
        ex = await c.request(origin, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", b"", 5, 5)
        first = ex.take_body()
        go.set()
        while not ex.complete:
            await ex.wait()
        assert b"".join(first) == b"abcd"
        c.release(ex)
    finally:
        await c.close()
        srv.close()
        await srv.wait_closed()


# -- the idle timer after the head, for every way a head can arrive ------------------------------
_HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
_INTERIM = b"HTTP/1.1 100 Continue\r\n\r\n"
_IDLE_CASES = {
    "one read": [_HEAD + b"ab"],
    "head only": [_HEAD],
    "split head": [_HEAD[:10], _HEAD[10:] + b"ab"],
    "split at blank line": [_HEAD[:-2], _HEAD[-2:]],
    "1xx and head in one read": [_INTERIM + _HEAD + b"ab"],
    "1xx, then head": [_INTERIM, _HEAD + b"ab"],
    "1xx split, head split": [_INTERIM[:5], _INTERIM[5:] + _HEAD[:7], _HEAD[7:]],
}


@pytest.mark.parametrize("name", list(_IDLE_CASES))
async def test_silent_body_after_the_head_is_timed_out(name: str) -> None:
    """However the head arrives (whole, split, after a 1xx), a replica silent after it meets the idle timeout."""
    pieces = _IDLE_CASES[name]

    handlers: list[asyncio.Task[None] | None] = []
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.current_task())  # type: ignore[arg-type]
        writers.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        for p in pieces:
            writer.write(p)
            await writer.drain()
            await asyncio.sleep(0.05)
        await asyncio.sleep(10)  # then silence

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    origin = ("127.0.0.1", srv.sockets[0].getsockname()[1], False)
    c = Client(limit=2, keepalive=4, connect_timeout=1)
    try:
        ex = await c.request(origin, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"", 2.0, 0.3)
        t0 = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await asyncio.wait_for(ex.read_all(1000), 3)
        assert time.monotonic() - t0 < 1.0
        c.release(ex)
    finally:
        await c.close()
        for w in writers:
            w.close()
        for t in handlers:
            assert t is not None
            t.cancel()
        await asyncio.gather(*(t for t in handlers if t), return_exceptions=True)
        srv.close()
        await srv.wait_closed()


async def test_a_lowered_limit_holds_while_requests_wait() -> None:
    """configure() with a lower max_connections: freed slots and returned connections are not handed
    on until the pool is back under the new limit, even with waiters in line."""
    loop = asyncio.get_running_loop()
    c = Client(limit=3, keepalive=4, connect_timeout=2)
    async with _holding_server() as origin:
        try:
            held = [(await c._acquire(origin, loop))[0] for _ in range(3)]
            waiters = [asyncio.ensure_future(c._acquire(origin, loop)) for _ in range(2)]
            await asyncio.sleep(0.05)
            c.configure(1, 4, 2)
            c._close(held[0])  # 3 open > 1: the slot goes away, nobody gets it
            c._close(held[1])
            await asyncio.sleep(0.05)
            assert c.open == 1 and not any(w.done() for w in waiters)
            c._close(held[2])  # back at the limit: this slot goes to the first waiter
            got, _ = await asyncio.wait_for(waiters[0], 2)
            assert c.open == 1 and not waiters[1].done()
            c._close(got)
            await asyncio.wait_for(waiters[1], 2)
            assert c.open == 1
            waiters[1].result()[0].transport.close()
        finally:
            await c.close()
