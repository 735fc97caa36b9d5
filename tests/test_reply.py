"""Complete answers written in one write (reply.py) and the API port's own router (app.Api), on raw
loopback sockets: what aiohttp's web.Response and router did must still hold byte for byte where
clients can see it (status line version, Connection, Content-Length, pipelining, 404/405 shapes)."""

from __future__ import annotations

import asyncio

import orjson

from teraproxy.reply import Heads
from tests.conftest import MODEL, Cluster
from tests.test_edges import _answers, _chat, _exchange


def _post(body: bytes, version: str = "1.1", extra: str = "") -> bytes:
    return (f"POST /v1/chat/completions HTTP/{version}\r\nHost: x\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _head_of(raw: bytes) -> str:
    return raw.partition(b"\r\n\r\n")[0].decode("latin-1")


async def test_complete_answer_headers_and_pipelining(cluster: Cluster) -> None:
    p = await cluster.proxy([await cluster.replica()], log={"access_log": True})
    port = int(p.base.rsplit(":", 1)[1])
    body = _chat()
    raw = await _exchange(port, _post(body, extra="X-Request-ID: one\r\n") + _post(body)
                          + _post(body, extra="Connection: close\r\n"))
    answers = _answers(raw)
    assert [s for s, _, _ in answers] == [200, 200, 200]
    heads = [h for _, h, _ in answers]
    assert heads[0]["x-request-id"] == "one" and heads[1]["x-request-id"] != "one"
    for h, (_, _, b) in zip(heads, answers, strict=True):
        assert h["server"] == "teraproxy" and h["content-type"].startswith("application/json")
        assert int(h["content-length"]) == len(b) and "date" in h
        assert orjson.loads(b)["object"] == "chat.completion"
    assert "connection" not in heads[0] and heads[2]["connection"] == "close"  # and then it closed
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    lines = p.access_lines()
    assert [(x["status"], x["path"]) for x in lines] == [(200, "/v1/chat/completions")] * 3


async def test_http10_keep_alive_and_close(cluster: Cluster) -> None:
    p = await cluster.proxy([await cluster.replica()])
    port = int(p.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_post(_chat(), "1.0", "Connection: keep-alive\r\n"))
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode("latin-1")
        assert head.startswith("HTTP/1.0 200 OK\r\n") and "Connection: keep-alive" in head
        n = int(head.lower().split("content-length: ")[1].split("\r\n")[0])
        await reader.readexactly(n)
        writer.write(_post(_chat(), "1.0"))  # no keep-alive asked: answered, then closed
        rest = await asyncio.wait_for(reader.read(), 10)
        assert rest.startswith(b"HTTP/1.0 200 OK\r\n") and b"Connection:" not in rest.partition(b"\r\n\r\n")[0]
    finally:
        writer.close()


async def test_router_404_405_and_model_by_prefix(cluster: Cluster) -> None:
    p = await cluster.proxy([await cluster.replica()])
    port = int(p.base.rsplit(":", 1)[1])
    req = (b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n"
           b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n"
           b"GET /v1/models/ HTTP/1.1\r\nHost: x\r\n\r\n"
           b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
           b"GET /v1/models/" + MODEL.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    raw = await _exchange(port, req)
    # the HEAD answer has no body by HTTP's rules: split by hand at the last head
    first, last = raw[:raw.rindex(b"HTTP/1.1 ")], raw[raw.rindex(b"HTTP/1.1 "):]
    (s1, h1, b1), (s2, _, b2), (s3, _, _) = _answers(first[:first.rindex(b"HTTP/1.1 ")])
    assert (s1, h1["allow"]) == (405, "POST") and orjson.loads(b1)["error"]["message"].endswith("use POST.")
    assert s2 == 404 and orjson.loads(b2)["error"]["code"] == "unsupported_endpoint"
    assert s3 == 404
    assert _head_of(first[first.rindex(b"HTTP/1.1 "):]).startswith("HTTP/1.1 405")
    (s5, _, b5), = _answers(last)
    assert s5 == 200 and orjson.loads(b5)["id"] == MODEL


def test_heads_encode_once() -> None:
    heads = Heads()
    a = heads.line((1, 1), 200)
    assert a == b"HTTP/1.1 200 OK\r\nServer: teraproxy\r\n" and heads.line((1, 1), 200) is a
    assert heads.line((1, 0), 599).startswith(b"HTTP/1.0 599 \r\n")
