"""Replicas that misbehave on the wire (hand-written, real loopback sockets), and the proxy's own
connection pool under a burst: none of it may exhaust the proxy or be blamed on a healthy replica."""

from __future__ import annotations

import asyncio
import resource
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import aiohttp
import orjson
from aiohttp import web

from teraproxy.client import Client, PoolBusy
from teraproxy.exchange import MAX_HEAD
from tests.conftest import MODEL, Cluster

BODY = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
OTHER = "other/model"
# the raw replicas below speak only the chat route: no /metrics scraping (it would be counted as traffic)
RAW: dict[str, object] = {"load": {"enabled": False}}
_Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_replica(handler: _Handler) -> AsyncIterator[str]:
    """A replica that is a bare asyncio server running ``handler`` per connection; yields its URL."""
    writers: list[asyncio.StreamWriter] = []

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the proxy cut us off: that is the point
        finally:
            writer.close()

    srv = await asyncio.start_server(run, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
    finally:
        srv.close()
        for w in writers:
            w.close()
        await srv.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request (head and Content-Length body) off the connection; b"" at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return b""
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


async def post(http: aiohttp.ClientSession, url: str, model: str = MODEL) -> tuple[int, dict[str, str], bytes]:
    body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    async with http.post(url, data=body) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def _models(url: str, healthy: str) -> list[dict[str, object]]:
    return [{"id": MODEL, "replicas": [{"url": url}]}, {"id": OTHER, "replicas": [{"url": healthy}]}]


# -- item 1: the response head is bounded -----------------------------------------------------------
async def _endless_header(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
    for _ in range(50_000):  # 200 MiB unless we are cut off
        writer.write(b"a" * 4096)
        await writer.drain()


async def _endless_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\n")
    for i in range(10_000_000):
        writer.write(b"X-H%d: v\r\n" % i)
        if i % 64 == 0:
            await writer.drain()


async def _head_test(cluster: Cluster, handler: _Handler) -> None:
    healthy = await cluster.replica(model=OTHER, ttft_ms=50)
    async with raw_replica(handler) as url:
        p = await cluster.proxy(**RAW, models=_models(url, healthy.url), timeouts={"headers": "60s", "idle": "60s"})
        before = rss_mib()
        async with aiohttp.ClientSession() as http:
            bad = asyncio.create_task(post(http, f"{p.v1}/chat/completions"))
            good = [await asyncio.wait_for(post(http, f"{p.v1}/chat/completions", OTHER), 10) for _ in range(5)]
            status, _, body = await asyncio.wait_for(bad, 10)
        assert [g[0] for g in good] == [200] * 5  # the healthy replica is answered meanwhile
        assert status == 502 and b"response head" in body, body
        assert rss_mib() - before < 64  # a head is held up to MAX_HEAD, never the endless stream
        rep = p.table[MODEL].replicas[0]
        assert rep.failures == 1  # counted against the replica that sent it


async def test_endless_response_header_is_cut_at_the_head_limit(cluster: Cluster) -> None:
    await _head_test(cluster, _endless_header)


async def test_endless_small_response_headers_are_cut_at_the_header_limit(cluster: Cluster) -> None:
    await _head_test(cluster, _endless_headers)


async def test_head_split_over_many_reads_is_collected_linearly() -> None:
    """Just under the limit, one byte per read: accepted, and no read joins the head again."""
    value = b"v" * (MAX_HEAD - 200)

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        head = b"HTTP/1.1 200 OK\r\nX-Big: " + value + b"\r\nContent-Length: 2\r\n\r\n"
        for i in range(0, len(head), 512):  # many small writes (each a separate read, mostly)
            writer.write(head[i:i + 512])
            await writer.drain()
        writer.write(b"ok")
        await writer.drain()

    async with raw_replica(trickle) as url:
        port = int(url.rsplit(":", 1)[1])
        c = Client(limit=4, keepalive=5, connect_timeout=2)
        try:
            ex = await c.request(("127.0.0.1", port, False), b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0"
                                 b"\r\n\r\n", b"", 10, 10)
            assert ex.header(b"x-big") == value and await ex.read_all(100) == b"ok"
            c.release(ex)
        finally:
            await c.close()


# -- item 2: limits.max_response --------------------------------------------------------------------
def _big_body(total: int | None, declare: bool) -> _Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if declare:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                         % (total or 2**40))
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b" " * 65536
        sent = 0
        while total is None or sent < total:
            writer.write(chunk if declare else b"10000\r\n" + chunk + b"\r\n")
            sent += len(chunk)
            await writer.drain()
        if not declare:
            writer.write(b"0\r\n\r\n")
        await writer.drain()

    return handler


async def _max_response_test(cluster: Cluster, total: int | None, declare: bool) -> None:
    seen: list[int] = []
    handler = _big_body(total, declare)

    async def counting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(1)
        await handler(reader, writer)

    async with raw_replica(counting) as u1, raw_replica(counting) as u2:
        p = await cluster.proxy(**RAW, limits={"max_response": "1MiB"}, log={"access_log": True},
                                models=[{"id": MODEL, "replicas": [{"url": u1}, {"url": u2}]}])
        before = rss_mib()
        async with aiohttp.ClientSession() as http:
            status, _, body = await asyncio.wait_for(post(http, f"{p.v1}/chat/completions"), 20)
        assert status == 502 and orjson.loads(body)["error"]["code"] == "response_too_large", body[:300]
        assert rss_mib() - before < 64
        assert len(seen) == 1  # not retried: another replica would generate the same answer again
        (line,) = p.access_lines()
        assert line["attempts"] == 1 and line["error"] == "response_too_large"
        assert sum(r.failures for r in p.table[MODEL].replicas) == 1


async def test_answer_over_max_response_is_502(cluster: Cluster) -> None:
    await _max_response_test(cluster, 8 * 2**20, declare=False)  # complete, but 8x the limit


async def test_endless_answer_is_cut_at_max_response(cluster: Cluster) -> None:
    await _max_response_test(cluster, None, declare=False)


async def test_declared_length_over_max_response_fails_at_once(cluster: Cluster) -> None:
    await _max_response_test(cluster, None, declare=True)


async def test_answer_under_max_response_passes(cluster: Cluster) -> None:
    async with raw_replica(_big_body(512 * 1024, declare=True)) as url:
        p = await cluster.proxy(**RAW, limits={"max_response": "1MiB"},
                                models=[{"id": MODEL, "replicas": [{"url": url}]}])
        async with aiohttp.ClientSession() as http:
            status, _, body = await asyncio.wait_for(post(http, f"{p.v1}/chat/completions"), 20)
        assert status == 200 and len(body) == 512 * 1024


# -- item 4: the proxy's own pool is not a replica's fault ----------------------------------------
async def test_exhausted_pool_answers_503_busy_and_never_blames_replicas(cluster: Cluster) -> None:
    gate = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await request.read()
        await gate.wait()
        return web.json_response({"choices": []})

    urls = [await cluster.raw_upstream(slow), await cluster.raw_upstream(slow)]
    p = await cluster.proxy(upstream={"max_connections": 2}, timeouts={"connect": "1s"}, log={"access_log": True},
                            models=[{"id": MODEL, "replicas": [{"url": u} for u in urls]}])
    async with aiohttp.ClientSession() as http:
        tasks = [asyncio.create_task(post(http, f"{p.v1}/chat/completions")) for _ in range(20)]
        done: list[tuple[int, dict[str, str], bytes]] = []
        for fut in asyncio.as_completed(tasks):
            done.append(await fut)
            if len(done) == 18:
                gate.set()  # only now may the two requests holding connections finish
        busy = done[:18]
    for status, headers, body in busy:
        assert status == 503 and headers.get("Retry-After") == "1", (status, body[:200])
        assert orjson.loads(body)["error"]["code"] == "upstream_busy"
    assert [d[0] for d in done[18:]] == [200, 200]
    for r in p.table[MODEL].replicas:
        assert r.breaker.state == "closed" and r.failures == 0 and r.in_flight == 0
    assert all(line["attempts"] == 1 for line in p.access_lines())  # no retry on another replica: same pool


async def test_pool_is_fifo_and_an_evicted_connection_goes_to_the_first_in_line() -> None:
    """limit 1: the one connection (to X) comes back while a waiter for Y is first in line and a
    request for X is ready to run. Y gets the slot (X's connection is closed for it); X waits."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader):
            writer.write(answer)
            await writer.drain()

    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    async with raw_replica(serve) as ux, raw_replica(serve) as uy:
        x = ("127.0.0.1", int(ux.rsplit(":", 1)[1]), False)
        y = ("127.0.0.1", int(uy.rsplit(":", 1)[1]), False)
        loop = asyncio.get_running_loop()
        c = Client(limit=1, keepalive=5, connect_timeout=1)
        order: list[str] = []

        async def take(name: str, origin: tuple[str, int, bool]) -> None:
            conn, _ = await c._acquire(origin, loop)
            order.append(name)
            c._close(conn)

        try:
            ex = await c.request(x, head, b"", 5, 5)
            assert await ex.read_all(10) == b"ok"
            wy = asyncio.create_task(take("y", y))
            await asyncio.sleep(0.05)  # y is waiting
            wx = asyncio.create_task(take("x", x))  # ready to run before y is woken
            c.release(ex)  # the connection to X is free again
            await asyncio.wait_for(asyncio.gather(wy, wx), 5)
            assert order == ["y", "x"]
            assert c.open == 0
        finally:
            await c.close()


async def test_pool_wait_timeout_is_pool_busy_not_an_upstream_failure() -> None:
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)

    async with raw_replica(hold) as url:
        origin = ("127.0.0.1", int(url.rsplit(":", 1)[1]), False)
        loop = asyncio.get_running_loop()
        c = Client(limit=1, keepalive=5, connect_timeout=0.2)
        try:
            held, _ = await c._acquire(origin, loop)
            try:
                await c._acquire(origin, loop)
                raise AssertionError("expected PoolBusy")
            except PoolBusy:
                pass
            c._close(held)
            assert c.open == 0 and not c._someone_waits()
        finally:
            await c.close()


# -- item 6: a written request is never replayed --------------------------------------------------
async def test_request_read_then_connection_closed_is_not_replayed(cluster: Cluster) -> None:
    """The replica answers a connection's first request and, on the reused connection, reads the
    second and closes without answering: it must see that request exactly once."""
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        while req := await read_request(reader):
            seen.append(req)
            n += 1
            if n == 2:
                return  # read it, then close: the replica may well be running it
            answer = b'{"choices":[]}'
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(answer), answer))
            await writer.drain()

    async with raw_replica(handler) as url:
        p = await cluster.proxy(**RAW, models=[{"id": MODEL, "replicas": [{"url": url}]}])
        async with aiohttp.ClientSession() as http:
            first = await post(http, f"{p.v1}/chat/completions")
            second = await post(http, f"{p.v1}/chat/completions")
        assert first[0] == 200
        assert second[0] == 502
        assert len(seen) == 2  # one per client request: nothing was sent twice


async def test_stale_pooled_connection_is_caught_before_the_write() -> None:
    """The replica closed an idle pooled connection and the event loop has not seen it yet (here:
    reading paused): the request goes out on a new connection, once."""
    seen: list[int] = []
    close_idle, closed = asyncio.Event(), asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn_no = len(seen)
        seen.append(0)
        while await read_request(reader):
            seen[conn_no] += 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            if conn_no == 0:
                await close_idle.wait()
                writer.close()
                await writer.wait_closed()
                closed.set()  # on loopback our side has the FIN once close() returned
                return

    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    async with raw_replica(handler) as url:
        origin = ("127.0.0.1", int(url.rsplit(":", 1)[1]), False)
        c = Client(limit=4, keepalive=5, connect_timeout=1)
        try:
            ex = await c.request(origin, head, b"", 2, 2)
            assert await ex.read_all(10) == b"ok"
            c.release(ex)
            (conn,) = c._idle[origin]
            assert conn.transport is not None
            conn.transport.pause_reading()  # the loop cannot see the replica's FIN
            close_idle.set()
            await asyncio.wait_for(closed.wait(), 5)
            ex = await c.request(origin, head, b"", 2, 2)
            assert await ex.read_all(10) == b"ok"
            c.release(ex)
            assert seen == [1, 1]
        finally:
            await c.close()
