"""usage.py: usage from bodies and streams, the usage chunk removed byte for byte, at any split."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from teraproxy import usage
from teraproxy.sim import Sim, SimOptions

CHAT = {"model": "Qwen/Qwen3-8B", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def sim_stream(include_usage: bool, tokens: int = 9) -> bytes:
    payload = dict(CHAT, stream_options={"include_usage": True}) if include_usage else dict(CHAT)
    return b"".join(Sim(SimOptions(tokens=tokens))._frames(payload, chat=True))


def run(tap: usage.UsageTap, pieces: list[bytes]) -> bytes:
    return b"".join(tap.feed(p) for p in pieces) + tap.flush()


def test_from_body_reads_vllm_usage() -> None:
    body = Sim(SimOptions(tokens=7))._full(dict(CHAT, stream=False), chat=True)
    u = usage.from_body(body)
    assert u is not None and (u.prompt, u.completion, u.total) == (12, 7, 19)


def test_from_body_nested_details_and_garbage() -> None:
    body = (b'{"choices":[{"message":{"content":"\\"usage\\": {\\"prompt_tokens\\": 999}"}}],'
            b'"usage": {"prompt_tokens": 3, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 1}}}')
    u = usage.from_body(body)
    assert u is not None and (u.prompt, u.completion) == (3, 4)
    assert usage.from_body(b'{"usage": null}') is None
    assert usage.from_body(b"not json") is None
    assert usage.from_body(b'{"usage": {"prompt_tokens": "x", "completion_tokens": -5}}').total == 0  # type: ignore[union-attr]


def test_stripped_stream_is_the_stream_the_client_asked_for() -> None:
    asked, plain = sim_stream(True), sim_stream(False)
    tap = usage.UsageTap(strip=True)
    out = run(tap, [asked])
    frames = [f + b"\n\n" for f in asked.split(b"\n\n") if f]
    assert out == b"".join(f for f in frames if b'"choices":[]' not in f)  # byte for byte, minus that chunk
    assert _norm(out) == _norm(plain)  # which is the stream without include_usage (ids differ per run)
    assert tap.usage is not None and (tap.usage.prompt, tap.usage.completion) == (12, 9)


def test_kept_when_the_client_asked() -> None:
    asked = sim_stream(True)
    tap = usage.UsageTap(strip=False)
    assert run(tap, [asked]) == asked
    assert tap.usage is not None and tap.usage.completion == 9


@settings(max_examples=300, deadline=None)
@given(cuts=st.lists(st.integers(0, 4000), max_size=12), strip=st.booleans(), crlf=st.booleans())
def test_split_invariance(cuts: list[int], strip: bool, crlf: bool) -> None:
    data = sim_stream(True)
    if crlf:
        data = data.replace(b"\n", b"\r\n")
    whole = usage.UsageTap(strip)
    expect = run(whole, [data])
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    tap = usage.UsageTap(strip)
    assert run(tap, pieces) == expect
    assert tap.usage is not None and tap.usage.total == 21
    assert tap.frames == whole.frames
    if strip:
        assert b'"choices":[]' not in expect
    else:
        assert expect == data


def test_fast_path_returns_the_same_object() -> None:
    chunk = b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n' * 3
    tap = usage.UsageTap(strip=True)
    assert tap.feed(chunk) is chunk and tap.frames == 3


def test_estimate_for_a_broken_stream() -> None:
    data = sim_stream(False, tokens=20)
    cut = data[: len(data) // 2]
    tap = usage.UsageTap(strip=True)
    tap.feed(cut)
    assert tap.usage is None and tap.estimate() >= data[: len(data) // 2].count(b'"content"') - 1 > 0


def test_not_sse_is_passed_on_and_bounded() -> None:
    tap = usage.UsageTap(strip=True)
    blob = b"x" * (2 << 20)
    assert tap.feed(blob[:100]) == b""
    assert tap.feed(blob[100:]) == blob  # no frame end in 2 MiB: given up, passed on whole
    assert tap.feed(b"more") == b"more"


def test_ask_for_usage() -> None:
    p: dict[str, object] = dict(CHAT)
    assert not usage.client_wants_usage(p)
    usage.ask_for_usage(p)
    assert p["stream_options"] == {"include_usage": True}
    q: dict[str, object] = dict(CHAT, stream_options={"include_usage": False, "continuous_usage_stats": False})
    usage.ask_for_usage(q)
    assert q["stream_options"] == {"include_usage": True, "continuous_usage_stats": False}
    assert usage.client_wants_usage(q)


def _norm(stream: bytes) -> list[object]:
    out = []
    for frame in stream.split(b"\n\n"):
        if frame.startswith(b"data: {"):
            obj = orjson.loads(frame[6:])
            obj.pop("id", None)
            obj.pop("created", None)
            out.append(obj)
        else:
            out.append(frame)
    return out


def test_from_body_incomplete_or_spaced_usage() -> None:
    assert usage.from_body(b'{"usage":{"prompt_tokens":3,"details":{"x":1') is None  # cut before its end
    u = usage.from_body(b'{"a": "}{", "usage" :\n {"prompt_tokens": 2, "d": {}, "completion_tokens": 5}}')
    assert u is not None and (u.prompt, u.completion) == (2, 5)
