"""timeouts.first_event_keepalive: the status line and `: keep-alive` comments while a stream has no event;
a replica failing before its first event is still retried elsewhere; when retries run out, an error event."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
from aiohttp import web

from .conftest import MODEL, Cluster

BODY = orjson.dumps({"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]})


async def cold_then_close(request: web.Request) -> web.StreamResponse:
    """A replica that sends its headers, stays silent for a while, then ends without any event."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await asyncio.sleep(0.5)
    await resp.write_eof()
    return resp


async def _post(p_v1: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as http, http.post(f"{p_v1}/chat/completions", data=BODY) as resp:
        return resp.status, await resp.read()


async def test_keepalives_until_the_first_event_and_a_retry_behind_them(cluster: Cluster) -> None:
    cold = await cluster.raw_upstream(cold_then_close)
    warm = await cluster.replica(ttft_ms=300)
    p = await cluster.proxy(timeouts={"first_event_keepalive": "100ms"},
                            models=[{"id": MODEL, "replicas": [{"url": cold}, {"url": warm.url}]}])
    p.table[MODEL].replicas[1].in_flight = 1000  # the first attempt goes to the cold replica
    status, body = await _post(p.v1)
    p.table[MODEL].replicas[1].in_flight = 0
    head, _, rest = body.partition(b"data:")
    assert status == 200 and head.count(b": keep-alive\n\n") >= 3  # ~0.8 s of waiting, one every 0.1 s
    assert rest.rstrip().endswith(b"[DONE]") and b'"error"' not in body and b'"finish_reason":"stop"' in body
    assert warm.stats.completed == 1  # the retry on the other replica gave the answer


async def test_keepalives_then_an_error_event_when_retries_run_out(cluster: Cluster) -> None:
    cold = await cluster.raw_upstream(cold_then_close)
    p = await cluster.proxy(timeouts={"first_event_keepalive": "100ms"},
                            models=[{"id": MODEL, "replicas": [{"url": cold}]}])
    status, body = await _post(p.v1)
    head, _, rest = body.partition(b"data:")
    assert status == 200 and head.count(b": keep-alive\n\n") >= 2
    event = orjson.loads(rest.split(b"\n\n", 1)[0])
    assert event["error"]["code"] == "bad_gateway" and body.endswith(b"data: [DONE]\n\n")


async def test_off_by_default_no_comment_before_the_first_event(cluster: Cluster) -> None:
    warm = await cluster.replica(ttft_ms=300)
    p = await cluster.proxy([warm])
    status, body = await _post(p.v1)
    assert status == 200 and body.startswith(b"data:")
