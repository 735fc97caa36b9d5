"""Reasoning aliases end to end: each replica flavour × each emit mode, read with the openai SDK."""

from __future__ import annotations

import pytest

from tests.conftest import MODEL, Cluster, openai_client

THOUGHT = " alpha beta"  # what the sim reasons with 8 tokens (the first quarter)
MSGS = [{"role": "user", "content": "think"}]
EXPECT = {  # emit mode → the reasoning keys the client sees, whatever the replica sent
    "both": {"reasoning", "reasoning_content"},
    "reasoning": {"reasoning"},
    "reasoning_content": {"reasoning_content"},
}


def _keys(extra: dict[str, object] | None) -> set[str]:
    return {k for k in (extra or {}) if k in ("reasoning", "reasoning_content")}


@pytest.mark.parametrize("replica_field", ["reasoning_content", "reasoning", "both"])
@pytest.mark.parametrize("emit", ["both", "reasoning", "reasoning_content", "passthrough"])
async def test_reasoning_names(cluster: Cluster, replica_field: str, emit: str) -> None:
    r = await cluster.replica(reasoning_field=replica_field, tokens=8)
    p = await cluster.proxy([r], reasoning={"emit": emit})
    sent = {"reasoning", "reasoning_content"} if replica_field == "both" else {replica_field}
    want = sent if emit == "passthrough" else EXPECT[emit]
    async with openai_client(p) as client:
        full = await client.chat.completions.create(model=MODEL, messages=MSGS)  # type: ignore[arg-type]
        extra = full.choices[0].message.model_extra or {}
        assert _keys(extra) == want
        assert all(extra[k] == THOUGHT for k in want)
        assert full.choices[0].message.content == " gamma delta épsilon zeta eta theta"

        stream = await client.chat.completions.create(model=MODEL, messages=MSGS, stream=True)  # type: ignore
        seen: dict[str, str] = {}
        content = ""
        async for chunk in stream:
            delta = chunk.choices[0].delta
            for k in _keys(delta.model_extra):
                seen[k] = seen.get(k, "") + str((delta.model_extra or {})[k])
            content += delta.content or ""
        assert set(seen) == want and all(v == THOUGHT for v in seen.values())
        assert content == " gamma delta épsilon zeta eta theta"


async def test_per_model_override(cluster: Cluster) -> None:
    r = await cluster.replica(reasoning_field="reasoning_content", tokens=8)
    p = await cluster.proxy(reasoning={"emit": "both"}, models=[
        {"id": MODEL, "reasoning": "reasoning", "replicas": [{"url": r.url}]},
        {"id": "other/model", "replicas": [{"url": r.url}]}])
    async with openai_client(p) as client:
        one = await client.chat.completions.create(model=MODEL, messages=MSGS)  # type: ignore[arg-type]
        assert _keys(one.choices[0].message.model_extra) == {"reasoning"}
    # the other model keeps the global default (its replica rejects the id, but the mode is per model)
    assert p.table["other/model"].emit == "both" and p.table[MODEL].emit == "reasoning"


async def test_reasoning_in_can_be_turned_off(cluster: Cluster) -> None:
    import orjson

    r = await cluster.replica()
    p = await cluster.proxy(models=[{"id": MODEL, "reasoning_in": False, "replicas": [{"url": r.url}]}])
    msgs = [{"role": "assistant", "content": "a", "reasoning_content": "why"}, {"role": "user", "content": "q"}]
    async with openai_client(p) as client:
        await client.chat.completions.create(model=MODEL, messages=msgs)  # type: ignore[arg-type]
    assert "reasoning" not in orjson.loads(r.stats.last_body)["messages"][0]


async def test_bad_reasoning_frame_passes_and_is_counted(cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    """A replica bug: a frame with a reasoning key that is not JSON passes untouched, and is counted."""
    import asyncio
    import logging

    import aiohttp
    import orjson
    from aiohttp import web

    bad = b'data: {"choices":[{"delta":{"reasoning": oops}}]}\n\n'
    good = (b'data: {"id":"1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
            b'"delta":{"reasoning_content":"hm"},"logprobs":null,"finish_reason":null}]}\n\n')

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for frame in (good, bad, b"data: [DONE]\n\n"):
            await resp.write(frame)
            await asyncio.sleep(0.01)
        return resp

    upstream = await cluster.raw_upstream(handler)
    p = await cluster.proxy(models=[{"id": MODEL, "replicas": [{"url": upstream}]}])
    body = orjson.dumps({"model": MODEL, "stream": True, "messages": MSGS})
    with caplog.at_level(logging.INFO):
        async with aiohttp.ClientSession() as http, http.post(f"{p.v1}/chat/completions", data=body) as resp:
            raw = await resp.read()
    assert bad in raw and b'"reasoning_content":"hm","reasoning":"hm"' in raw
    assert raw.endswith(b"data: [DONE]\n\n")
    (line,) = p.access_lines()
    assert line["bad_frames"] == 1 and line["rewritten"] == 1
    assert any("not valid JSON" in r.getMessage() for r in caplog.records)
