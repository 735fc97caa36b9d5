"""The Tera API through the proxy, with the official openai SDK against real simulated replicas."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import openai
import orjson
import pytest

from tests.conftest import MODEL, Cluster, openai_client, paused_stream, wait_for


async def test_chat_non_stream(cluster: Cluster) -> None:
    r = await cluster.replica(tokens=8, reasoning_field="reasoning")
    p = await cluster.proxy([r])
    async with openai_client(p) as client:
        resp = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    assert resp.choices[0].message.content == " gamma delta épsilon zeta eta theta"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.completion_tokens == 8
    extra = resp.choices[0].message.model_extra or {}
    assert extra["reasoning"] == extra["reasoning_content"] == " alpha beta"


async def test_chat_stream(cluster: Cluster) -> None:
    r = await cluster.replica(tokens=12, reasoning_field="none")
    p = await cluster.proxy([r])
    async with openai_client(p) as client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True})
        chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    words = [" alpha", " beta", " gamma", " delta", " épsilon", " zeta", " eta", " theta"]
    assert text == "".join(words + words[:4])
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


async def test_completions_stream_and_not(cluster: Cluster) -> None:
    r = await cluster.replica(tokens=5)
    p = await cluster.proxy([r])
    async with openai_client(p) as client:
        full = await client.completions.create(model=MODEL, prompt="Once", max_tokens=3)
        stream = await client.completions.create(model=MODEL, prompt="Once", max_tokens=3, stream=True)
        parts = [c.choices[0].text async for c in stream]
    assert full.choices[0].text == " alpha beta gamma" and full.choices[0].finish_reason == "length"
    assert "".join(parts) == full.choices[0].text


async def test_tool_call_deltas(cluster: Cluster) -> None:
    r = await cluster.replica()
    p = await cluster.proxy([r])
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    async with openai_client(p) as client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "weather?"}], tools=tools, stream=True)
        args, names, finish = [], [], None
        async for c in stream:
            for tc in c.choices[0].delta.tool_calls or []:
                if tc.function and tc.function.name:
                    names.append(tc.function.name)
                if tc.function and tc.function.arguments:
                    args.append(tc.function.arguments)
            finish = c.choices[0].finish_reason or finish
    assert names == ["get_weather"]
    assert len(args) == 3 and orjson.loads("".join(args)) == {"city": "Paris"}
    assert finish == "tool_calls"


async def test_models_list_and_slash_id(cluster: Cluster) -> None:
    r = await cluster.replica()
    p = await cluster.proxy([r], models=[{"id": MODEL, "replicas": [{"url": r.url}]},
                                         {"id": "openai/gpt-oss-20b", "replicas": [{"url": r.url}]}])
    async with openai_client(p) as client:
        ids = [m.id async for m in client.models.list()]
        one = await client.models.retrieve("openai/gpt-oss-20b")
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("nope/absent")
    assert ids == [MODEL, "openai/gpt-oss-20b"]
    assert one.id == "openai/gpt-oss-20b" and one.object == "model"


async def test_audio_speech_streams_binary(cluster: Cluster) -> None:
    r = await cluster.replica()
    p = await cluster.proxy([r])
    async with openai_client(p) as client:
        resp = await client.audio.speech.create(model=MODEL, voice="alloy", input="Hello there")
        audio = await resp.aread()
    assert audio[:4] == b"RIFF" and audio[8:12] == b"WAVE"
    assert len(audio) == 44 + 2 * 160 * len("Hello there")


async def test_unknown_fields_and_bytes_forwarded_unchanged(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    r = await cluster.replica()
    p = await cluster.proxy([r])
    body = (b'{ "model" : "Qwen/Qwen3-8B",\n "messages":[{"role":"user","content":[{"type":"text","text":"caf\\u00e9"},'
            b'{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]}],'
            b'"top_k":20,"min_p":0.05,"repetition_penalty":1.1,"guided_json":{"type":"object"},'
            b'"chat_template_kwargs":{"enable_thinking":false},"max_completion_tokens":4,'
            b'"stream_options":{"include_usage":true},"logprobs":true,"tools":[]}')
    async with http.post(f"{p.v1}/chat/completions", data=body,
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 200
        await resp.read()
    assert r.stats.last_body.encode() == body


async def test_request_side_reasoning_alias_added(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    r = await cluster.replica()
    p = await cluster.proxy([r])
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "a", "reasoning_content": "because"},
            {"role": "user", "content": "and?"}]
    async with openai_client(p) as client:
        await client.chat.completions.create(model=MODEL, messages=msgs)  # type: ignore[arg-type]
    sent = orjson.loads(r.stats.last_body)
    assert sent["messages"][1]["reasoning"] == "because"
    assert sent["messages"][1]["reasoning_content"] == "because"


async def test_headers_rules(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    r = await cluster.replica()
    p = await cluster.proxy([r], models=[{"id": MODEL, "replicas": [{"url": r.url, "api_key": "replica-secret"}]}],
                            auth={"keys": [{"name": "team-a", "sha256": _sha("sk-tera-client")}]})
    r.faults.api_key = "replica-secret"
    headers = {"Authorization": "Bearer sk-tera-client", "OpenAI-Organization": "org-1", "OpenAI-Project": "p-1",
               "Connection": "keep-alive, X-Hop", "X-Hop": "1", "Keep-Alive": "timeout=5", "TE": "trailers",
               "X-Request-ID": "req-abc-123", "X-Custom": "kept", "Accept-Encoding": "gzip"}
    body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    async with http.post(f"{p.v1}/chat/completions", data=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["X-Request-ID"] == "req-abc-123"
        assert resp.headers["Server"] == "teraproxy"  # no framework/version banner
        assert "Content-Encoding" not in resp.headers
        assert "replica-secret" not in str(resp.headers) and "replica-secret" not in await resp.text()
    up = {k.lower(): v for k, v in r.stats.last_headers.items()}
    assert up["authorization"] == "Bearer replica-secret"
    for gone in ("openai-organization", "openai-project", "x-hop", "keep-alive", "te"):
        assert gone not in up, gone
    assert up["x-request-id"] == "req-abc-123" and up["x-custom"] == "kept"
    assert up["accept-encoding"] == "identity"
    # without a client id, one is generated, forwarded and returned
    async with http.post(f"{p.v1}/chat/completions", data=body,
                         headers={"Authorization": "Bearer sk-tera-client"}) as resp:
        rid = resp.headers["X-Request-ID"]
        await resp.read()
    assert len(rid) == 32 and r.stats.last_headers["X-Request-ID"] == rid


def _sha(token: str) -> str:
    import hashlib

    return hashlib.sha256(token.encode()).hexdigest()


async def test_stream_headers_and_no_buffering(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    r = await cluster.replica(tokens=6, itl_ms=150, reasoning_field="none")
    p = await cluster.proxy([r])
    body = orjson.dumps({"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    loop = asyncio.get_running_loop()
    async with http.post(f"{p.v1}/chat/completions", data=body, headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert "Content-Encoding" not in resp.headers and "Content-Length" not in resp.headers
        t0 = loop.time()
        first = await resp.content.readany()
        t_first = loop.time() - t0
        rest = await resp.read()
    # the first frames arrive long before the whole answer (6 tokens x 150 ms): nothing buffered
    assert b'"role":"assistant"' in first and t_first < 0.5
    assert (first + rest).endswith(b"data: [DONE]\n\n")


async def test_http10_client_gets_close_delimited_stream(cluster: Cluster) -> None:
    r = await cluster.replica(tokens=3, reasoning_field="none")
    p = await cluster.proxy([r])
    body = orjson.dumps({"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    reader, writer = await asyncio.open_connection("127.0.0.1", p.config.listen.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    raw = await asyncio.wait_for(reader.read(), 5)  # read() returns only when the proxy closes
    writer.close()
    await writer.wait_closed()
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in head.lower() and b"content-length" not in head.lower()
    assert payload.startswith(b"data: {") and payload.endswith(b"data: [DONE]\n\n")


async def test_dribbling_client_is_cut_off(cluster: Cluster) -> None:
    r = await cluster.replica()
    p = await cluster.proxy([r], timeouts={"keepalive": "1s"})
    reader, writer = await asyncio.open_connection("127.0.0.1", p.config.listen.port)
    t0 = asyncio.get_running_loop().time()
    closed = False
    for ch in b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40:
        writer.write(bytes([ch]))
        await asyncio.sleep(0.1)
        if reader.at_eof() or writer.is_closing():
            closed = True
            break
        try:
            if await asyncio.wait_for(reader.read(1), 0.001) == b"":
                closed = True
                break
        except TimeoutError:
            pass
    elapsed = asyncio.get_running_loop().time() - t0
    writer.close()
    assert closed and elapsed < 2.5


async def test_client_disconnect_mid_stream_aborts_upstream(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    r = await cluster.replica(tokens=200, itl_ms=50)
    p = await cluster.proxy([r])
    body = orjson.dumps({"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    resp = await http.post(f"{p.v1}/chat/completions", data=body)
    await resp.content.readany()
    await asyncio.sleep(0.2)
    assert r.stats.active == 1
    resp.close()  # the client goes away
    took = await wait_for(lambda: r.stats.active == 0, timeout=1.0)
    assert r.stats.cancelled == 1 and r.stats.completed == 0 and took < 1.0


async def test_client_disconnect_while_waiting_aborts_upstream(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    r = await cluster.replica()
    r.faults.hang_before_headers = True
    p = await cluster.proxy([r])
    body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(TimeoutError):
        await http.post(f"{p.v1}/chat/completions", data=body, timeout=aiohttp.ClientTimeout(total=0.3))
    # the client's EOF could be a half-close: it is found gone by the second interim 102 (edge.PROBE_SOON)
    took = await wait_for(lambda: r.stats.cancelled == 1, timeout=10.0)
    assert took < 1.5, took
    assert r.stats.active == 0


async def test_replica_dies_mid_stream(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    r = await cluster.replica(tokens=20, reasoning_field="none")
    r.faults.reset_after = 5
    p = await cluster.proxy([r])
    body = orjson.dumps({"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    async with http.post(f"{p.v1}/chat/completions", data=body) as resp:
        raw = await resp.read()
    frames = raw.split(b"\n\n")[:-1]
    assert len(frames) == 5 + 2
    assert frames[-1] == b"data: [DONE]"
    err = orjson.loads(frames[-2][len(b"data: "):])
    assert err["error"]["type"] == "server_error" and err["error"]["code"] == "bad_gateway"
    contents = [orjson.loads(f[6:])["choices"][0]["delta"].get("content") for f in frames[1:5]]
    assert contents == [" alpha", " beta", " gamma", " delta"]  # each token once, in order
    # and the SDK turns that frame into an exception rather than a silent short answer
    async with openai_client(p) as client:
        stream = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                      stream=True)
        with pytest.raises(openai.APIError, match="incomplete"):
            async for _ in stream:
                pass


async def test_replica_stalls_mid_stream(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    r = await cluster.replica(tokens=20, reasoning_field="none")
    r.faults.hang_after = 3
    p = await cluster.proxy([r], timeouts={"idle": "300ms"})
    body = orjson.dumps({"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    async with http.post(f"{p.v1}/chat/completions", data=body) as resp:
        raw = await resp.read()
    frames = raw.split(b"\n\n")[:-1]
    assert frames[-1] == b"data: [DONE]" and b'"gateway_timeout"' in frames[-2] and len(frames) == 5
    await wait_for(lambda: r.stats.active == 0, timeout=1.0)  # the stalled upstream was closed


async def test_replica_4xx_keeps_status_and_message(cluster: Cluster) -> None:
    r = await cluster.replica()
    r.faults.fail_status = 400
    p = await cluster.proxy([r])
    async with openai_client(p) as client:
        with pytest.raises(openai.BadRequestError) as ei:
            await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    body = ei.value.body
    assert isinstance(body, dict) and body["message"] == "simulated engine failure"
    assert body["code"] == "400" and body["type"] == "InternalServerError"
    assert r.stats.generation_requests == 1  # a 4xx is the client's problem: not retried


async def test_replica_rejecting_gateway_key_is_502_and_logged(cluster: Cluster,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    r = await cluster.replica()
    r.faults.api_key = "the-right-one"
    p = await cluster.proxy([r], models=[{"id": MODEL, "replicas": [{"url": r.url, "api_key": "wrong"}]}])
    async with openai_client(p) as client:
        with caplog.at_level(logging.ERROR, logger="teraproxy"):
            with pytest.raises(openai.InternalServerError) as ei:
                await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert ei.value.status_code == 502
    assert any("REJECTED" in rec.getMessage() and rec.levelno == logging.ERROR for rec in caplog.records)
    assert "wrong" not in caplog.text  # the replica key itself is never logged


async def test_unreachable_replica_502_and_timeout_504(cluster: Cluster) -> None:
    from tests.conftest import free_port

    p = await cluster.proxy(models=[{"id": MODEL, "replicas": [{"url": f"http://127.0.0.1:{free_port()}"}]}])
    async with openai_client(p) as client:
        with pytest.raises(openai.InternalServerError) as ei:
            await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert ei.value.status_code == 502 and "did not answer: cannot connect" in str(ei.value)

    r = await cluster.replica()
    r.faults.hang_before_headers = True
    p2 = await cluster.proxy([r], timeouts={"headers": "300ms"})
    async with openai_client(p2) as client:
        with pytest.raises(openai.InternalServerError) as ei:
            await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert ei.value.status_code == 504


async def test_proxy_errors_have_openai_shape(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    r = await cluster.replica()
    p = await cluster.proxy([r], limits={"max_body": "1KiB"})
    url = f"{p.v1}/chat/completions"
    cases = [
        ("POST", url, b"{not json", 400, "invalid_json"),
        ("POST", url, b"[1, 2]", 400, "invalid_json"),
        ("POST", url, b'{"messages": []}', 400, "invalid_model"),
        ("POST", url, b'{"model": 7, "messages": []}', 400, "invalid_model"),
        ("POST", url, b'{"model": "Qwen/Qwen3-8B"}', 400, "missing_required_parameter"),
        ("POST", f"{p.v1}/completions", b'{"model": "Qwen/Qwen3-8B"}', 400, "missing_required_parameter"),
        ("POST", url, b'{"model": "nope", "messages": []}', 404, "model_not_found"),
        ("GET", url, b"", 405, "method_not_allowed"),
        ("POST", url, b'{"model": "' + b"x" * 2000 + b'"}', 413, "request_too_large"),
        ("POST", f"{p.v1}/embeddings", b"{}", 404, "unsupported_endpoint"),
        ("GET", f"{p.v1}/fine_tuning/jobs", b"", 404, "unsupported_endpoint"),
        ("POST", f"{p.v1}/images/generations", b"{}", 404, "unsupported_endpoint"),
        ("POST", f"{p.v1}/moderations", b"{}", 404, "unsupported_endpoint"),
    ]
    for method, u, data, status, code in cases:
        async with http.request(method, u, data=data) as resp:
            doc = await resp.json()
            assert resp.status == status, (u, data[:40], doc)
            assert set(doc["error"]) >= {"message", "type", "code"} and doc["error"]["code"] == code
            assert isinstance(doc["error"]["message"], str) and doc["error"]["message"]
            assert resp.headers["X-Request-ID"]


async def test_sdk_exception_classes(cluster: Cluster) -> None:
    r = await cluster.replica()
    p = await cluster.proxy([r], auth={"keys": [{"name": "a", "sha256": _sha("sk-good"), "models": [MODEL]}]},
                            models=[{"id": MODEL, "replicas": [{"url": r.url}]},
                                    {"id": "other/model", "replicas": [{"url": r.url}]}],
                            limits={"max_body": "2KiB"})
    msgs = [{"role": "user", "content": "x"}]
    async with openai_client(p, key="sk-good") as good, openai_client(p, key="sk-bad") as bad:
        with pytest.raises(openai.AuthenticationError):
            await bad.chat.completions.create(model=MODEL, messages=msgs)  # type: ignore[arg-type]
        with pytest.raises(openai.NotFoundError):
            await good.chat.completions.create(model="absent/model", messages=msgs)  # type: ignore[arg-type]
        with pytest.raises(openai.NotFoundError):  # a model the key may not use: as if it did not exist
            await good.chat.completions.create(model="other/model", messages=msgs)  # type: ignore[arg-type]
        with pytest.raises(openai.BadRequestError):
            await good.chat.completions.create(model=MODEL, messages="not a list")  # type: ignore[arg-type]
        with pytest.raises(openai.APIStatusError) as ei:
            await good.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 4000}])
        assert ei.value.status_code == 413
        ok = await good.chat.completions.create(model=MODEL, messages=msgs)  # type: ignore[arg-type]
        assert ok.choices[0].message.content


async def test_auth_rules(cluster: Cluster, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture) -> None:
    r = await cluster.replica()
    p = await cluster.proxy([r], auth={"keys": [{"name": "team-a", "sha256": _sha("sk-tera-secret")}]})
    url = f"{p.v1}/models"
    with caplog.at_level(logging.DEBUG):
        for hdr, code in [(None, "missing_api_key"), ("Basic abc", "invalid_api_key"), ("Bearer", "invalid_api_key"),
                          ("Bearer sk-tera-wrong", "invalid_api_key")]:
            async with http.get(url, headers={"Authorization": hdr} if hdr else {}) as resp:
                assert resp.status == 401
                assert (await resp.json())["error"]["code"] == code
                assert resp.headers["WWW-Authenticate"] == "Bearer"
        async with http.get(url, headers={"Authorization": "Bearer sk-tera-secret"}) as resp:
            assert resp.status == 200
        body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
        async with http.post(f"{p.v1}/chat/completions", data=body,
                             headers={"Authorization": "Bearer sk-tera-secret"}) as resp:
            assert resp.status == 200
    assert "sk-tera-secret" not in caplog.text and "sk-tera-wrong" not in caplog.text
    assert "Authorization" not in r.stats.last_headers  # no replica key configured: none sent


async def test_access_log_is_json_without_secrets(cluster: Cluster, http: aiohttp.ClientSession,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    r = await cluster.replica()
    p = await cluster.proxy([r], auth={"keys": [{"name": "team-a", "sha256": _sha("sk-tera-secret")}]})
    body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    with caplog.at_level(logging.DEBUG):
        async with http.post(f"{p.v1}/chat/completions", data=body,
                             headers={"Authorization": "Bearer sk-tera-secret", "X-Request-ID": "rid-1"}) as resp:
            await resp.read()
        async with http.get(f"{p.v1}/models", headers={"Authorization": "Bearer sk-tera-wrong"}) as resp:
            await resp.read()
    lines = p.access_lines()
    assert len(lines) == 2
    line = lines[0]
    assert line["rid"] == "rid-1" and line["status"] == 200 and line["key"] == "team-a"
    assert line["model"] == MODEL and line["replica"] == r.url and line["attempts"] == 1
    assert line["ttfb_ms"] > 0 and line["ms"] >= line["ttfb_ms"] and line["path"] == "/v1/chat/completions"
    assert lines[1]["status"] == 401 and lines[1]["key"] is None and lines[1]["error"] == "invalid_api_key"
    written = p.access.getvalue() + caplog.text.encode()
    assert b"sk-tera-secret" not in written and b"sk-tera-wrong" not in written


async def test_access_log_off(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    r = await cluster.replica()
    p = await cluster.proxy([r], log={"access_log": False})
    async with http.get(f"{p.v1}/models") as resp:
        assert resp.status == 200
    assert p.access_lines() == []


async def _raw_post(port: int, body_parts: list[bytes], pause: float, chunked: bool = False) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    size = sum(map(len, body_parts))
    framing = b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: %d\r\n" % size
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + framing + b"\r\n")
    for part in body_parts:
        await asyncio.sleep(pause)
        writer.write(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
    if chunked:
        writer.write(b"0\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    return raw


@pytest.mark.parametrize("chunked", [False, True])
async def test_body_in_many_pieces_is_read_whole(cluster: Cluster, chunked: bool) -> None:
    r = await cluster.replica()
    p = await cluster.proxy([r])
    body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 3000}]})
    parts = [body[i:i + 500] for i in range(0, len(body), 500)]
    raw = await _raw_post(p.config.listen.port, parts, pause=0.02, chunked=chunked)
    assert raw.startswith(b"HTTP/1.1 200"), raw[:300]
    assert r.stats.last_body.encode() == body


async def test_slow_body_gets_408(cluster: Cluster) -> None:
    r = await cluster.replica()
    p = await cluster.proxy([r], limits={"body_read": "300ms"})
    body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    raw = await _raw_post(p.config.listen.port, [body[:10], body[10:20], body[20:]], pause=0.25)
    assert raw.startswith(b"HTTP/1.1 408"), raw[:300]
    assert b'"code":"request_timeout"' in raw and r.stats.generation_requests == 0


async def test_unexpected_error_is_openai_shaped_500(cluster: Cluster, http: aiohttp.ClientSession,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    from teraproxy.app import API

    r = await cluster.replica()
    p = await cluster.proxy([r])

    async def broken(*_: object) -> None:
        raise RuntimeError("a bug")

    p.app[API].routes["/v1/chat/completions"]["POST"] = broken  # stands in for any bug on the path
    with caplog.at_level(logging.ERROR):
        async with http.post(f"{p.v1}/chat/completions", data=b"{}") as resp:
            doc = await resp.json()
    assert resp.status == 500 and doc["error"]["type"] == "server_error" and resp.headers["X-Request-ID"]
    assert any("unexpected error" in rec.getMessage() and rec.exc_info for rec in caplog.records)


async def test_slow_client_pauses_the_replica(cluster: Cluster) -> None:
    """Flow control: a client that stops reading stops the upstream too; nothing is buffered whole."""
    r = await cluster.replica(tokens=60000, reasoning_field="none")
    p = await cluster.proxy([r])
    reader, writer = await paused_stream(p)  # the client stops reading
    await asyncio.sleep(1.5)
    assert r.stats.active == 1 and r.stats.completed == 0  # ~13 MB stream: the replica is held back
    reader._transport.resume_reading()  # type: ignore[attr-defined]
    raw = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    await writer.wait_closed()
    assert raw.count(b'"content":') == 60001 and b"data: [DONE]" in raw[-40:]
    await wait_for(lambda: r.stats.completed == 1, 2)
