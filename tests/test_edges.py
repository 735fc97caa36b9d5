"""The edges a client sees, on raw loopback sockets: malformed HTTP, Expect: 100-continue,
half-closed clients, models a key may not use, capped echoes, X-Forwarded-* / Forwarded."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import itertools
import logging
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from teraproxy.edge import Throttle
from tests.conftest import MODEL, ROOT, Cluster, Proxy, free_port, openai_client, wait_for, write_config

Answer = tuple[int, dict[str, str], bytes]


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def _exchange(port: int, data: bytes, *, half: bool = False, timeout: float = 10.0) -> bytes:  # noqa: ASYNC109
    """Send ``data`` (then shut the write side if ``half``) and read until the proxy closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    if half:
        await writer.drain()
        writer.write_eof()  # shutdown(SHUT_WR), like `nc -N`
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def _answers(raw: bytes) -> list[Answer]:
    """Split a byte stream into HTTP responses (1xx interim ones included); bodies by length or chunks."""
    out: list[Answer] = []
    while raw:
        head, sep, raw = raw.partition(b"\r\n\r\n")
        assert sep, f"incomplete head: {head[:200]!r}"
        line, *fields = head.decode("latin-1").split("\r\n")
        status = int(line.split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
        body = b""
        if status >= 200:
            if "content-length" in headers:
                n = int(headers["content-length"])
                body, raw = raw[:n], raw[n:]
                assert len(body) == n, "truncated body"
            elif headers.get("transfer-encoding") == "chunked":
                while True:
                    size_line, _, raw = raw.partition(b"\r\n")
                    n = int(size_line, 16)
                    body, raw = body + raw[:n], raw[n + 2:]
                    if n == 0:
                        break
            else:
                body, raw = raw, b""
        out.append((status, headers, body))
    return out


def _final(raw: bytes) -> Answer:
    answers = _answers(raw)
    assert answers, "no answer at all"
    assert all(s < 200 for s, _, _ in answers[:-1]), answers
    return answers[-1]


def _chat(stream: bool = False, model: str = MODEL) -> bytes:
    return orjson.dumps({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})


def _post(body: bytes, *extra: bytes, path: bytes = b"/v1/chat/completions") -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + b"".join(extra)
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


# -- 11: malformed HTTP ------------------------------------------------------------------------------
MALFORMED = {
    "request line": b"G@T /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
    "header name": b"GET /v1/models HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n",
    "70 KB header": b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
    "CL and TE": (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    "not HTTP": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,
}


@pytest.mark.parametrize("kind", list(MALFORMED))
async def test_malformed_http_gets_openai_error(cluster: Cluster, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    p = await cluster.proxy([await cluster.replica()])
    with caplog.at_level(logging.DEBUG):
        raw = await _exchange(p.config.listen.port, MALFORMED[kind])
    status, headers, body = _final(raw)
    assert status == 400
    assert headers["server"] == "teraproxy" and b"aiohttp" not in raw and b"Python" not in raw
    assert headers["content-type"].startswith("application/json") and headers["x-request-id"]
    err = orjson.loads(body)["error"]
    assert err["code"] == "bad_http_request" and err["type"] == "invalid_request_error" and err["param"] is None
    assert err["message"].startswith("Malformed HTTP request") and len(err["message"]) < 300
    assert b"aaaaaaaaaa" not in body  # the client's bytes are not echoed
    lines = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].exc_info is None and "\n" not in lines[0].getMessage()  # one short line, no traceback
    assert "bad HTTP" in lines[0].getMessage()


async def test_malformed_http_logged_rate_limited_and_counted(cluster: Cluster, http: aiohttp.ClientSession,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    r = await cluster.replica()
    p = await cluster.proxy([r])
    async with http.get(f"{p.v1}/models") as resp:  # one ordinary line to compare the shape with
        assert resp.status == 200
    with caplog.at_level(logging.INFO):
        for data in MALFORMED.values():
            await _exchange(p.config.listen.port, data)
    lines = p.access_lines()
    assert len(lines) == 1 + len(MALFORMED)
    good, bad = lines[0], lines[1:]
    for line in bad:
        assert line["status"] == 400 and line["error"] == "bad_http_request" and line["peer"] == "127.0.0.1"
        assert set(line) == set(good)  # one access-log shape for every request
    logged = [r for r in caplog.records if "bad HTTP" in r.getMessage()]
    assert len(logged) == 1  # the rest were suppressed (and will be counted in the next line)
    assert p.admin is not None
    async with http.get(f"{p.admin}/metrics") as resp:
        text = await resp.text()
    counted = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("teraproxy_requests_total{")}
    # one series (whatever its labels) holds the malformed requests, another the good one
    assert sorted(counted.values()) == [1.0, float(len(MALFORMED))], counted
    assert f'teraproxy_requests_total{{code="400",model="(none)"}} {float(len(MALFORMED))}' in text


def test_throttle_counts_what_it_suppresses() -> None:
    now = [100.0]
    t = Throttle(10.0, lambda: now[0])
    assert t.allow() == 0  # the first one is logged, nothing suppressed before it
    assert t.allow() is None and t.allow() is None
    now[0] = 109.9
    assert t.allow() is None
    now[0] = 110.0
    assert t.allow() == 3  # logged, reporting the three suppressed since the last line
    assert t.allow() is None
    now[0] = 200.0
    assert t.allow() == 1


# -- 12: Expect: 100-continue ---------------------------------------------------------------------
async def _expect_head(p: Proxy, body_len: int, key: str | None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", p.config.listen.port)
    auth = b"Authorization: Bearer " + key.encode() + b"\r\n" if key else b""
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + auth
                 + b"Expect: 100-continue\r\nContent-Length: " + str(body_len).encode() + b"\r\n\r\n")
    return reader, writer


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)


async def test_expect_continue_only_after_key_and_size_checks(cluster: Cluster) -> None:
    r = await cluster.replica()
    p = await cluster.proxy([r], auth={"keys": [{"name": "a", "sha256": _sha("sk-good")}]},
                            limits={"max_body": "1KiB"})
    body = _chat()
    for key, size, status in ((None, len(body), b"401"), ("sk-bad", len(body), b"401"), ("sk-good", 5000, b"413")):
        reader, writer = await _expect_head(p, size, key)
        head = await _read_head(reader)  # the body is never sent: the answer must come without it
        assert head.startswith(b"HTTP/1.1 " + status), head
        assert b"connection: close" in head.lower()  # the unread body cannot be skipped: the connection ends
        writer.close()
    reader, writer = await _expect_head(p, len(body), "sk-good")
    assert await _read_head(reader) == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(body)
    head = await _read_head(reader)
    assert head.startswith(b"HTTP/1.1 200"), head
    writer.close()
    statuses = [line["status"] for line in p.access_lines()]
    assert statuses == [401, 401, 413, 200]


# -- 14: half-closed clients ----------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
async def test_half_closed_client_gets_the_whole_answer(cluster: Cluster, stream: bool) -> None:
    r = await cluster.replica(tokens=5, itl_ms=20)
    p = await cluster.proxy([r])
    raw = await _exchange(p.config.listen.port, _post(_chat(stream)), half=True)
    status, _, body = _final(raw)
    assert status == 200, raw[:300]
    if stream:
        assert body.startswith(b"data: {") and body.endswith(b"data: [DONE]\n\n")
    else:
        assert orjson.loads(body)["choices"][0]["message"]["content"]
    assert r.stats.completed == 1 and r.stats.cancelled == 0


async def test_half_closed_client_waiting_long_gets_interim_answers_then_the_answer(cluster: Cluster) -> None:
    r = await cluster.replica(ttft_ms=2500, tokens=2)
    p = await cluster.proxy([r])
    raw = await _exchange(p.config.listen.port, _post(_chat()), half=True)
    answers = _answers(raw)
    assert answers[0][0] == 102  # the probe that tells a half-closed client from a gone one
    status, _, body = _final(raw)
    assert status == 200 and orjson.loads(body)["choices"][0]["message"]["content"]
    assert r.stats.completed == 1


async def test_eof_inside_the_body_ends_the_connection_at_once(cluster: Cluster) -> None:
    r = await cluster.replica()
    p = await cluster.proxy([r], limits={"body_read": "30s"})
    body = _chat()
    head = _post(body)[: -len(body)]
    # that body can never be complete: the connection ends (as nginx does) instead of a 408 after 30 s
    raw = await _exchange(p.config.listen.port, head + body[:10], half=True, timeout=20)
    assert raw == b""
    assert r.stats.requests == 0


async def test_half_closed_pipelined_requests_are_all_answered(cluster: Cluster) -> None:
    r = await cluster.replica(tokens=2)
    p = await cluster.proxy([r])
    get = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    raw = await _exchange(p.config.listen.port, get + _post(_chat()) + get, half=True)
    statuses = [s for s, _, _ in _answers(raw)]
    assert [s for s in statuses if s >= 200] == [200, 200, 200]
    assert all(s == 102 for s in statuses if s < 200)  # the half-close probes (edge.PROBE_SOON): interim only


@pytest.mark.parametrize("stream", [False, True])
async def test_client_that_really_leaves_while_waiting_stops_the_replica(cluster: Cluster, stream: bool) -> None:
    r = await cluster.replica(ttft_ms=30_000)
    p = await cluster.proxy([r])
    _, writer = await asyncio.open_connection("127.0.0.1", p.config.listen.port)
    writer.write(_post(_chat(stream)))
    await wait_for(lambda: r.stats.active == 1)
    sock: socket.socket = writer.get_extra_info("socket")
    sock.shutdown(socket.SHUT_WR)  # EOF first (as a closing client sends), then the socket is gone for good
    await asyncio.sleep(0.05)
    writer.close()
    await wait_for(lambda: r.stats.cancelled == 1, timeout=10.0)
    assert r.stats.completed == 0 and r.stats.active == 0


async def test_half_close_under_uvloop_serve(cluster: Cluster, tmp_path: Path,
                                            procs: list[subprocess.Popen[bytes]]) -> None:
    """`teraproxy serve` runs on uvloop, whose EOF handling differs from asyncio's (it reports one EOF twice)."""
    r = await cluster.replica(ttft_ms=1500, tokens=2)
    port = free_port()
    cfg = write_config(tmp_path / "c.yaml", {"listen": f"127.0.0.1:{port}", "auth": "off", "health": {"enabled": False},
                                             "log": {"access_log": False},
                                             "models": [{"id": MODEL, "replicas": [{"url": r.url}]}]})
    # a Popen (started at once, no waiting), so that the procs fixture stops it by its pid
    procs.append(subprocess.Popen([sys.executable, "-m", "teraproxy", "serve", "--config", str(cfg)],  # noqa: ASYNC220
                                  cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    await wait_for(lambda: _listening(port), timeout=15)
    answers = _answers(await _exchange(port, _post(_chat()), half=True))
    assert [s for s, _, _ in answers][-1] == 200 and all(s == 102 for s, _, _ in answers[:-1])
    # 1.5 s of waiting: three probes at most (at once, PROBE_SOON, PROBE_SOON + PROBE_EVERY), not a set per EOF report
    assert 1 <= len(answers) <= 4
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    r.faults.ttft_ms = 30_000
    writer.write(_post(_chat()))
    await wait_for(lambda: r.stats.active == 1)
    writer.close()  # gone for good
    await wait_for(lambda: r.stats.cancelled == 1, timeout=10.0)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


# -- 15: models a key may not use; capped echoes -----------------------------------------------------
async def test_model_the_key_may_not_use_is_not_found(cluster: Cluster) -> None:
    r = await cluster.replica()
    p = await cluster.proxy([r], auth={"keys": [{"name": "a", "sha256": _sha("sk-a"), "models": [MODEL]}]},
                            models=[{"id": MODEL, "replicas": [{"url": r.url}]},
                                    {"id": "other/model", "replicas": [{"url": r.url}]}])
    msgs: Any = [{"role": "user", "content": "x"}]
    async with openai_client(p, key="sk-a") as client:
        errors = []
        for model in ("other/model", "absent/model"):
            with pytest.raises(openai.NotFoundError) as ei:
                await client.chat.completions.create(model=model, messages=msgs)
            errors.append(ei.value)
            with pytest.raises(openai.NotFoundError) as ei2:
                await client.completions.create(model=model, prompt="x")
            assert ei2.value.body == ei.value.body
            with pytest.raises(openai.NotFoundError) as ei3:
                await client.models.retrieve(model)
            assert ei3.value.body == ei.value.body
        hidden, absent = (e.body for e in errors)
        assert isinstance(hidden, dict) and isinstance(absent, dict)
        assert hidden["code"] == absent["code"] == "model_not_found"
        assert hidden["message"].replace("other/model", "M") == absent["message"].replace("absent/model", "M")
        assert [m.id for m in (await client.models.list()).data] == [MODEL]
        ok = await client.chat.completions.create(model=MODEL, messages=msgs)
        assert ok.choices[0].message.content
    assert r.stats.generation_requests == 1


async def test_unknown_model_echo_is_capped(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    r = await cluster.replica()
    p = await cluster.proxy([r], limits={"max_body": "4MiB"})
    huge = "m" * 3_000_000
    async with openai_client(p) as client:
        with pytest.raises(openai.NotFoundError) as ei:
            await client.chat.completions.create(model=huge, messages=[{"role": "user", "content": "x"}])
    assert isinstance(ei.value.body, dict)
    assert len(ei.value.body["message"]) < 400 and "m" * 256 + "…" in ei.value.body["message"]
    for path in (f"/v1/models/{'n' * 6000}", f"/v1/{'u' * 6000}"):
        async with http.get(p.base + path) as resp:
            assert resp.status == 404
            assert len(await resp.read()) < 600
    lines = p.access_lines()
    assert lines[0]["model"] == "m" * 256 + "…" and lines[1]["path"] == "/v1/models/" + "n" * 245 + "…"
    assert len(p.access.getvalue()) < 3000


# -- 16: X-Forwarded-For, Forwarded, X-Forwarded-Proto ----------------------------------------------
async def test_forwarding_headers_are_joined_and_appended(cluster: Cluster) -> None:
    seen: list[list[tuple[bytes, bytes]]] = []

    async def upstream(request: web.Request) -> web.Response:
        seen.append(list(request.raw_headers))
        return web.json_response({"id": "x", "object": "chat.completion", "choices": []})

    url = await cluster.raw_upstream(upstream)
    p = await cluster.proxy(models=[{"id": MODEL, "replicas": [{"url": url}]}])
    sent = _post(_chat(), b"Connection: close\r\n", b"X-Forwarded-For: 203.0.113.7, 10.0.0.1\r\n",
                 b"X-Forwarded-Proto: https\r\n", b"Forwarded: for=198.51.100.1;proto=https\r\n",
                 b"X-Forwarded-For: 10.0.0.2\r\n",
                 b"Forwarded: for=\"[2001:db8::1]\"\r\n")
    for data in (sent, _post(_chat(), b"Connection: close\r\n")):
        status, _, _ = _final(await _exchange(p.config.listen.port, data))
        assert status == 200

    def values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
        return [v for k, v in headers if k.lower() == name]

    first, plain = seen
    assert values(first, b"x-forwarded-for") == [b"203.0.113.7, 10.0.0.1, 10.0.0.2, 127.0.0.1"]
    assert values(first, b"forwarded") == [b'for=198.51.100.1;proto=https, for="[2001:db8::1]", '
                                           b"for=127.0.0.1;proto=http"]
    assert values(first, b"x-forwarded-proto") == [b"http"]  # the client's claim is replaced, not kept
    assert values(plain, b"x-forwarded-for") == [b"127.0.0.1"]
    assert values(plain, b"forwarded") == [b"for=127.0.0.1;proto=http"]
    assert values(plain, b"x-forwarded-proto") == [b"http"]


async def test_forwarding_and_hop_headers_per_request_on_one_connection(cluster: Cluster) -> None:
    """The forwarding block of a request without client values is kept per connection: requests with
    and without them, pipelined on one connection, each get their own; every Connection header's
    names are dropped, whatever their case."""
    seen: list[list[tuple[bytes, bytes]]] = []

    async def upstream(request: web.Request) -> web.Response:
        seen.append(list(request.raw_headers))
        return web.json_response({"id": "x", "object": "chat.completion", "choices": []})

    url = await cluster.raw_upstream(upstream)
    p = await cluster.proxy(models=[{"id": MODEL, "replicas": [{"url": url}]}])
    data = (_post(_chat(), b"X-Keep: 1\r\n") + _post(_chat(), b"X-Forwarded-For: 203.0.113.7\r\n")
            + _post(_chat(), b"connection: keep-alive\r\n", b"X-Hop: 1\r\n", b"x-keep: 2\r\n",
                    b"Connection: X-HOP\r\n", b"x-other-hop: 3\r\n", b"CONNECTION: x-Other-Hop, close\r\n"))
    answers = _answers(await _exchange(p.config.listen.port, data))
    assert [a[0] for a in answers] == [200, 200, 200]

    def values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
        return [v for k, v in headers if k.lower() == name]

    plain, claimed, hops = seen
    assert values(plain, b"x-forwarded-for") == [b"127.0.0.1"] and values(plain, b"x-keep") == [b"1"]
    assert values(claimed, b"x-forwarded-for") == [b"203.0.113.7, 127.0.0.1"]
    assert values(hops, b"x-forwarded-for") == [b"127.0.0.1"]
    assert values(hops, b"forwarded") == [b"for=127.0.0.1;proto=http"]
    assert values(hops, b"x-keep") == [b"2"]
    assert not values(hops, b"x-hop") and not values(hops, b"x-other-hop") and not values(hops, b"connection")


async def test_answers_carry_the_current_date(cluster: Cluster) -> None:
    """A complete answer and a stream each say Date: now, in RFC 9110's IMF-fixdate (GMT)."""
    p = await cluster.proxy([await cluster.replica()])
    seen: list[float] = []
    for stream in (False, False, True, True):  # each kind twice, a second apart: the date moves on
        before = time.time()
        status, headers, _ = _final(await _exchange(p.config.listen.port,
                                                    _post(_chat(stream), b"Connection: close\r\n")))
        assert status == 200 and headers["date"].endswith(" GMT")
        when = email.utils.parsedate_to_datetime(headers["date"]).timestamp()
        assert int(before) <= when <= time.time(), headers["date"]
        seen.append(when)
        await asyncio.sleep(1.05)
    assert seen[0] < seen[1] and seen[2] < seen[3]


def test_forwarded_node_quotes_ipv6_and_bounds_the_chain() -> None:
    from teraproxy.edge import MAX_CHAIN, forwarding

    block = forwarding([], [], "::1", False)
    assert b'Forwarded: for="[::1]";proto=http\r\n' in block and b"X-Forwarded-For: ::1\r\n" in block
    block = forwarding([], [], None, True)
    assert b"Forwarded: for=unknown;proto=https\r\n" in block and b"X-Forwarded-Proto: https\r\n" in block
    many = [b"10.0.0.%d" % (i % 250) + b" " * 100 for i in range(128)]
    xff = next(line for line in forwarding(many, [], "127.0.0.1", False).split(b"\r\n")
               if line.startswith(b"X-Forwarded-For"))
    assert len(xff) <= MAX_CHAIN + 20 and xff.endswith(b", 127.0.0.1")  # the hops nearest us are kept


async def test_no_102_for_a_pipelined_http10_request(cluster: Cluster) -> None:
    """The probes are for the request being waited on: an HTTP/1.1 one may get 102s, a pipelined
    HTTP/1.0 one after it never (a 1xx may not go to an HTTP/1.0 client)."""
    r = await cluster.replica(ttft_ms=800)
    p = await cluster.proxy([r])
    body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    head = (b"POST /v1/chat/completions HTTP/1.%d\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n")
    two = head % (1, len(body)) + body + head % (0, len(body)) + body
    raw = await _exchange(p.config.listen.port, two, half=True)
    statuses = [s for s, _, _ in _answers(raw)]
    first = statuses.index(200)
    assert all(s == 102 for s in statuses[:first]) and statuses[first + 1:] == [200], statuses


# -- the request loop (edge.Protocol.start) -----------------------------------------------------------
@contextlib.asynccontextmanager
async def _edge_server(handler: Any) -> AsyncIterator[int]:
    """The API port's runner (edge.Runner, as app.py builds it) serving ``handler`` on loopback: its port."""
    from teraproxy.app import ACCESS, METRICS, create_app
    from teraproxy.config import parse_config
    from teraproxy.edge import Edge, Runner

    app = create_app(parse_config({"listen": "127.0.0.1:1", "auth": "off", "health": {"enabled": False},
                                   "load": {"enabled": False},
                                   "models": [{"id": MODEL, "replicas": [{"url": "http://127.0.0.1:1"}]}]}))
    runner = Runner(app, Edge(app[ACCESS], app[METRICS]), handler, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield port
    finally:
        await runner.cleanup()

async def test_keep_alive_requests_run_in_the_connections_task_and_a_disconnect_cancels_the_handler() -> None:
    """edge.Protocol awaits each handler in the connection's own task (aiohttp makes a Task per
    request on Python < 3.12): three requests on one keep-alive connection, pipelined ones included,
    meet one task, in order; a client that goes away mid-request still cancels its handler."""
    seen: list[tuple[str, asyncio.Task[Any] | None]] = []
    cancelled = asyncio.Event()

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        seen.append((request.path, asyncio.current_task()))
        if request.path == "/hang":
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return web.Response(body=await request.read())

    async with _edge_server(handler) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nA")
        await reader.readuntil(b"\r\n\r\nA")
        # two pipelined requests in one write
        writer.write(b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nB"
                     b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nC")
        await reader.readuntil(b"\r\n\r\nB")
        await reader.readuntil(b"\r\n\r\nC")
        writer.write(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_for(lambda: len(seen) == 4)
        writer.transport.abort()  # gone for good (RST): aiohttp's connection_lost cancels the handler
        await asyncio.wait_for(cancelled.wait(), 5)
        assert [p for p, _ in seen] == ["/a", "/b", "/c", "/hang"]
        assert len({id(t) for _, t in seen}) == 1, "a new Task per request"


async def test_pipelined_requests_give_the_loop_back_between_answers() -> None:
    """Without a Task per request, a burst of pipelined requests with quick answers must still let
    the loop run other work between them (a ticker rescheduling itself with call_soon stands for the
    other connections): each request sees the ticker further on than the one before."""
    loop = asyncio.get_running_loop()
    ticks = [0]
    running = [True]

    def tick() -> None:
        ticks[0] += 1
        if running[0]:
            loop.call_soon(tick)

    seen: list[int] = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        seen.append(ticks[0])
        return web.Response(body=b"ok")  # answered without awaiting anything

    try:
        async with _edge_server(handler) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            tick()
            writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n" * 20)
            for _ in range(20):
                await reader.readuntil(b"\r\n\r\nok")
            writer.close()
    finally:
        running[0] = False
    assert len(seen) == 20
    assert all(b > a for a, b in itertools.pairwise(seen)), seen
