"""Tests for teraproxy.sse and the rule it applies, teraproxy.reasoning (pure: no sockets, no event loop)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teraproxy import reasoning
from teraproxy import sse as sse_module
from teraproxy.reasoning import EMITS, add_request_reasoning, needs_request_rewrite, rewrite_message_body
from teraproxy.sse import SSERelay

R, RC = "reasoning", "reasoning_content"
REWRITE_EMITS = ("both", "reasoning", "reasoning_content")

# --------------------------------------------------------------------------
# reference SSE helpers (independent of the module under test)


def split_frames(stream: bytes) -> tuple[list[bytes], bytes]:
    """Complete frames and the incomplete tail; bytes.splitlines knows LF/CRLF/CR."""
    frames: list[bytes] = []
    cur = b""
    for line in stream.splitlines(keepends=True):
        cur += line
        if line in (b"\n", b"\r", b"\r\n"):
            frames.append(cur)
            cur = b""
    return frames, cur


def data_value(line: bytes) -> bytes | None:
    content = line.rstrip(b"\r\n")
    if content == b"data":
        return b""
    if not content.startswith(b"data:"):
        return None
    value = content[5:]
    return value[1:] if value.startswith(b" ") else value


def frame_payload(frame: bytes) -> bytes | None:
    values = [v for v in map(data_value, frame.splitlines(keepends=True)) if v is not None]
    return b"\n".join(values) if values else None


def frame_json(frame: bytes) -> Any:
    payload = frame_payload(frame)
    if payload is None or payload == b"[DONE]":
        return None
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None


def has_data(frame: bytes) -> bool:
    """An event with data: a frame with a data field line (comments and blank lines are not)."""
    return frame_payload(frame) is not None


def expected_stream(stream: bytes, emit: str) -> bytes:
    """What the relay must emit for a whole stream: nothing before the first event with data, then
    the complete frames (rewritten per emit); an incomplete last frame is dropped unless it is a
    [DONE], which is completed with the blank line it lacks."""
    frames, tail = split_frames(stream)
    if tail and frame_payload(tail) == b"[DONE]":
        frames.append(tail + (tail[len(tail.rstrip(b"\r\n")) :] or b"\n\n"))
    if not any(map(has_data, frames)):
        return b""
    return b"".join(expected_frame(f, emit) for f in frames)


def last_data_is_done(out: bytes) -> bool:
    payloads = [frame_payload(f) for f in split_frames(out)[0] if has_data(f)]
    return bool(payloads) and payloads[-1] == b"[DONE]"


def run(emit: str, pieces: Iterable[bytes]) -> tuple[bytes, SSERelay]:
    relay = SSERelay(emit)
    out = b"".join(relay.feed(p) for p in pieces)
    return out + relay.flush(), relay


def expected_fields(d: dict[str, Any], emit: str) -> dict[str, Any]:
    """The rewrite rule, written out plainly, for one delta/message dict."""
    has_r, has_rc = R in d, RC in d
    if emit == "passthrough" or not (has_r or has_rc):
        return d
    if has_r != has_rc and d[R if has_r else RC] is None:
        return d  # a lone null is no reasoning: left as it is
    if emit == "both":
        if has_r and has_rc:
            return d
        src, dst = (R, RC) if has_r else (RC, R)
        out: dict[str, Any] = {}
        for k, v in d.items():
            out[k] = v
            if k == src:
                out[dst] = v
        return out
    other = RC if emit == R else R
    if has_r and has_rc:
        return {k: v for k, v in d.items() if k != other}
    return {(emit if k == other else k): v for k, v in d.items()}


def expected_obj(obj: Any, emit: str, field: str = "delta") -> Any:
    if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
        return obj
    obj = dict(obj)
    choices = []
    for ch in obj["choices"]:
        if isinstance(ch, dict) and isinstance(ch.get(field), dict):
            ch = {**ch, field: expected_fields(ch[field], emit)}
        choices.append(ch)
    obj["choices"] = choices
    return obj


def expected_frame(frame: bytes, emit: str) -> bytes:
    """What the relay must emit for one complete input frame."""
    frame = expected_reasoning_frame(frame, emit)
    return expected_error_frame(frame)


def expected_error_frame(frame: bytes) -> bytes:
    """A line that is exactly `data: {"error": {...}}` with a non-string code gets a string one."""
    out = b""
    for line in frame.splitlines(keepends=True):
        content = line.rstrip(b"\r\n")
        if content.startswith(b'data: {"error"'):
            try:
                doc = orjson.loads(content[6:])
            except orjson.JSONDecodeError:
                doc = None
            if isinstance(doc, dict) and isinstance(doc.get("error"), dict) and \
                    not isinstance(doc["error"].get("code"), str):
                code = doc["error"].get("code")
                doc["error"]["code"] = str(code) if type(code) is int else "upstream_error"
                line = b"data: " + orjson.dumps(doc) + line[len(content):]
        out += line
    return out


def expected_reasoning_frame(frame: bytes, emit: str) -> bytes:
    obj = frame_json(frame)
    if obj is None or b'"reasoning' not in (frame_payload(frame) or b""):
        return frame
    new = expected_obj(obj, emit)
    if orjson.dumps(new) == orjson.dumps(obj):
        return frame  # no change needed: original bytes
    out = b""
    first = True
    for line in frame.splitlines(keepends=True):
        if data_value(line) is None:
            if line.startswith(b"\n") and out.endswith(b"\r"):
                out += b"\n"  # a lone CR (its data lines dropped) would make this LF one CRLF
            out += line
        elif first:
            term = line[len(line.rstrip(b"\r\n")) :]
            out += b"data: " + orjson.dumps(new) + term
            first = False
    return out


# --------------------------------------------------------------------------
# recorded-style streams


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "Qwen/Qwen3-8B",
        "choices": [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}],
    }


USAGE = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 1700000000,
    "model": "Qwen/Qwen3-8B",
    "choices": [],
    "usage": {
        "prompt_tokens": 12,
        "completion_tokens": 9,
        "total_tokens": 21,
        "completion_tokens_details": {"reasoning_tokens": 5},
    },
}
REASONING_TEXT = ["Let", " me", " think", " — é", " \"ok\""]
CONTENT_TEXT = [" Hello", "!"]


def sse(obj: Any, eol: bytes = b"\n", dumps: Callable[[Any], bytes] = orjson.dumps) -> bytes:
    return b"data: " + dumps(obj) + eol + eol


def done(eol: bytes = b"\n") -> bytes:
    return b"data: [DONE]" + eol + eol


def reasoning_stream(keys: tuple[str, ...], eol: bytes = b"\n", dumps: Callable[[Any], bytes] = orjson.dumps) -> bytes:
    frames = [sse(chunk({"role": "assistant", "content": ""}), eol, dumps)]
    frames += [sse(chunk({k: t for k in keys}), eol, dumps) for t in REASONING_TEXT]
    frames += [sse(chunk({"content": t}), eol, dumps) for t in CONTENT_TEXT]
    frames += [sse(chunk({}, "stop"), eol, dumps), sse(USAGE, eol, dumps), done(eol)]
    return b"".join(frames)


def ascii_dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode()


def tool_stream() -> bytes:
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": ""}}
    frames = [sse(chunk({"role": "assistant", "content": ""}))]
    frames += [sse(chunk({RC: t})) for t in REASONING_TEXT]
    frames.append(sse(chunk({"tool_calls": [call]})))
    for frag in ['{"mode": ', '"reasoning"', ', "q": "é"}']:  # needle inside a string
        frames.append(sse(chunk({"tool_calls": [{"index": 0, "function": {"arguments": frag}}]})))
    frames += [sse(chunk({}, "tool_calls")), sse(USAGE), done()]
    return b"".join(frames)


def multiline_stream() -> bytes:
    out = sse(chunk({"role": "assistant", "content": ""}))
    for t in REASONING_TEXT:
        text = json.dumps(chunk({RC: t}), indent=1, ensure_ascii=False)
        out += b"".join(b"data:" + line.encode() + b"\n" for line in text.split("\n")) + b"\n"
    for t in CONTENT_TEXT:
        out += sse(chunk({"content": t}))
    return out + done()


def comment_event_stream() -> bytes:
    out = b": keep-alive\n\n"
    out += b"event: message\nid: 0\nretry: 3000\n" + sse(chunk({"role": "assistant", "content": ""}))
    for i, t in enumerate(REASONING_TEXT):
        out += b": tick\n" + f"event: message\nid: {i + 1}\n".encode() + sse(chunk({R: t}))
        out += b": keep-alive\n\n"
    for t in CONTENT_TEXT:
        out += b"event: message\n" + sse(chunk({"content": t}))
    return out + b"event: message\n" + done()


def error_stream() -> bytes:
    err = {"error": {"message": 'bad "reasoning" budget', "type": "BadRequestError", "code": 400}}
    return sse(chunk({"role": "assistant", "content": ""})) + sse(chunk({RC: "Let"})) + sse(err) + done()


STREAMS: dict[str, bytes] = {
    "qwen3": reasoning_stream((RC,)),
    "gptoss": reasoning_stream((R,)),
    "transition": reasoning_stream((RC, R)),
    "tools": tool_stream(),
    "crlf": reasoning_stream((RC,), b"\r\n"),
    "cr": reasoning_stream((R,), b"\r"),
    "escaped": reasoning_stream((RC,), dumps=ascii_dumps),
    "multiline": multiline_stream(),
    "comments_events": comment_event_stream(),
    "error": error_stream(),
}
# name -> the reasoning key(s) the replica sent
REASONING_STREAMS = {
    "qwen3": {RC},
    "gptoss": {R},
    "transition": {R, RC},
    "tools": {RC},
    "crlf": {RC},
    "cr": {R},
    "escaped": {RC},
    "multiline": {RC},
    "comments_events": {R},
}
MODE_KEYS = {"both": {R, RC}, "reasoning": {R}, "reasoning_content": {RC}}


def test_stream_fixtures_are_well_formed() -> None:
    for name, stream in STREAMS.items():
        frames, tail = split_frames(stream)
        assert tail == b"", name
        assert b"".join(frames) == stream
        assert b"data: [DONE]" in frames[-1]
    assert b"\\u00e9" in STREAMS["escaped"]
    assert b"\r" not in STREAMS["qwen3"] and b"\n" not in STREAMS["cr"]


@pytest.mark.parametrize("emit", EMITS)
@pytest.mark.parametrize("name", sorted(REASONING_STREAMS))
def test_recorded_stream_keys_and_text(name: str, emit: str) -> None:
    stream = STREAMS[name]
    out, relay = run(emit, [stream])
    if emit == "passthrough":
        assert out == stream
        return
    in_frames, _ = split_frames(stream)
    out_frames, tail = split_frames(out)
    assert tail == b"" and len(out_frames) == len(in_frames)
    assert relay.started and relay.done and not relay.truncated
    texts: dict[str, list[str]] = {R: [], RC: []}
    content: list[str] = []
    n_reasoning = 0
    for frame in out_frames:
        obj = frame_json(frame)
        if not obj or not obj.get("choices"):
            continue
        delta = obj["choices"][0]["delta"]
        keys = {R, RC} & delta.keys()
        if keys:
            n_reasoning += 1
            assert keys == MODE_KEYS[emit], (frame, emit)
            for k in keys:
                texts[k].append(delta[k])
            assert "content" not in delta or delta["content"] == ""
        content.append(delta.get("content") or "")
    assert n_reasoning == len(REASONING_TEXT)
    for k in MODE_KEYS[emit]:
        assert texts[k] == REASONING_TEXT
    assert "".join(content) == ("" if name == "tools" else "".join(CONTENT_TEXT))
    changed = not (emit == "both" and REASONING_STREAMS[name] == {R, RC})
    changed = changed and not (emit != "both" and REASONING_STREAMS[name] == {emit})
    assert relay.rewritten == (len(REASONING_TEXT) if changed else 0)
    assert relay.bad_frames == 0


@pytest.mark.parametrize("emit", EMITS)
@pytest.mark.parametrize("name", sorted(STREAMS))
def test_recorded_stream_frames_exact(name: str, emit: str) -> None:
    stream = STREAMS[name]
    out, _ = run(emit, [stream])
    in_frames, _ = split_frames(stream)
    assert out == b"".join(expected_frame(f, emit) for f in in_frames)  # passthrough: only an error's code


def test_crlf_and_cr_rewrites_keep_line_endings() -> None:
    out, _ = run("both", [STREAMS["crlf"]])
    assert b"\n\n" not in out and out.count(b"\r\n\r\n") == STREAMS["crlf"].count(b"\r\n\r\n")
    out, _ = run("reasoning_content", [STREAMS["cr"]])
    assert b"\n" not in out and b'"reasoning_content":"Let"}' in out and b'"reasoning"' not in out


def test_multiline_and_other_lines_collapse_to_one_data_line() -> None:
    frame = b'event: delta\r\ndata: {"choices":[{"delta":\r\n: note\r\ndata:{"reasoning":"hi"}}]}\r\nid: 5\r\n\r\n'
    out, relay = run("both", [frame])
    expected = (
        b"event: delta\r\n"
        b'data: {"choices":[{"delta":{"reasoning":"hi","reasoning_content":"hi"}}]}\r\n'
        b": note\r\nid: 5\r\n\r\n"
    )
    assert out == expected and relay.rewritten == 1 and relay.started and not relay.done


def test_a_lone_cr_left_before_the_blank_line_does_not_eat_its_lf() -> None:
    # Hypothesis found it: with the data lines between gone, ": c\r" + "\n" would read as one CRLF
    # line end, and the frame (here the last, so the [DONE] before it stops counting) never ends.
    for frame, kept in ((b'data: {"choices":[{"delta":\n: c\rdata: {"reasoning":"x"}}]}\n\n', b": c\r\n\n"),
                        (b'data: {"choices":[{"delta":{"reasoning":"x"}}]}\rdata:\n\n', b"\r\n\n")):
        out, relay = run("both", [b"data: [DONE]\n\n", frame])
        assert out.endswith(kept) and relay.rewritten == 1 and not relay.done
        assert split_frames(out) == ([b"data: [DONE]\n\n", out[14:]], b"")


def test_error_usage_done_and_needle_in_strings_pass_unchanged() -> None:
    for name in ("error", "tools"):
        for emit in EMITS:
            out, _ = run(emit, [STREAMS[name]])
            in_frames, _ = split_frames(STREAMS[name])
            out_frames, _ = split_frames(out)
            for a, b in zip(in_frames, out_frames, strict=True):
                obj = frame_json(a)
                if obj and "error" in obj:  # vLLM's in-stream error: only its code changes, to a string
                    assert orjson.loads(b[6:]) == {"error": {**obj["error"], "code": str(obj["error"]["code"])}}
                elif not (obj and obj.get("choices") and {R, RC} & obj["choices"][0]["delta"].keys()):
                    assert a == b
    usage = sse(USAGE)
    relay = SSERelay("both")
    assert relay.feed(usage) is usage and relay.rewritten == 0 and relay.bad_frames == 0


def test_in_stream_error_code_becomes_a_string() -> None:
    """vLLM's own error event (engine died), as it sends it, alone, bunched, or split anywhere."""
    err = (b'data: {"error": {"message": "EngineCore encountered an issue.", "type": "InternalServerError", '
           b'"param": null, "code": 500}}\n\n')
    fixed = (b'data: {"error":{"message":"EngineCore encountered an issue.","type":"InternalServerError",'
             b'"param":null,"code":"500"}}\n\n')
    tok, done = sse(chunk({"content": "x"})), b"data: [DONE]\n\n"
    for emit in REWRITE_EMITS:
        relay = SSERelay(emit)
        assert relay.feed(tok) is tok and relay.feed(err) == fixed and relay.feed(done) is done
        assert run(emit, [tok + err + done])[0] == tok + fixed + done
        assert run(emit, [tok + err[:40], err[40:] + done])[0] == tok + fixed + done
        assert run(emit, [err + done])[0] == fixed + done  # before the first event too
        already = b'data: {"error": {"message": "m", "code": "500"}}\n\n'
        assert SSERelay(emit).feed(already) is already
    for pieces in ([tok + err + done], [tok, err, done], [err + done], [tok + err[:30], err[30:] + done]):
        assert run("passthrough", pieces)[0] == b"".join(pieces).replace(err, fixed)  # passthrough frames too


def test_key_order_alias_inserted_after_existing_key() -> None:
    frame = sse(chunk({"role": "assistant", RC: "x", "content": ""}))
    cases = {
        "both": ["role", RC, R, "content"],
        "reasoning": ["role", R, "content"],
        "reasoning_content": ["role", RC, "content"],
    }
    for emit, keys in cases.items():
        out, _ = run(emit, [frame])
        delta = frame_json(out)["choices"][0]["delta"]
        assert list(delta) == keys
        assert delta[keys[1]] == "x"
    out, _ = run("both", [sse(chunk({R: None, "content": "hi"}))])
    assert list(frame_json(out)["choices"][0]["delta"].items()) == [(R, None), ("content", "hi")]  # null: no alias


def test_both_keys_present_are_kept_even_if_different() -> None:
    frame = b'data: {"choices": [{"delta": {"reasoning_content": "a", "reasoning": "b"}}]}\n\n'
    relay = SSERelay("both")
    assert relay.feed(frame) is frame and relay.rewritten == 0
    out, _ = run("reasoning", [frame])
    assert frame_json(out)["choices"][0]["delta"] == {R: "b"}
    out, _ = run("reasoning_content", [frame])
    assert frame_json(out)["choices"][0]["delta"] == {RC: "a"}


def test_multiple_choices() -> None:
    obj = chunk({RC: "a"})
    obj["choices"].append({"index": 1, "delta": {"content": "x"}, "logprobs": None, "finish_reason": None})
    obj["choices"].append({"index": 2, "delta": {R: "c"}, "logprobs": None, "finish_reason": None})
    out, relay = run("both", [sse(obj)])
    deltas = [c["delta"] for c in frame_json(out)["choices"]]
    assert deltas == [{RC: "a", R: "a"}, {"content": "x"}, {R: "c", RC: "c"}]
    assert relay.rewritten == 1


# --------------------------------------------------------------------------
# splitting


@pytest.mark.parametrize("emit", EMITS)
@pytest.mark.parametrize("name", sorted(STREAMS))
def test_every_split_offset(name: str, emit: str) -> None:
    stream = STREAMS[name]
    whole, _ = run(emit, [stream])
    for i in range(len(stream) + 1):
        out, _ = run(emit, [stream[:i], stream[i:]])
        assert out == whole, i
    out, relay = run(emit, [stream[i : i + 1] for i in range(len(stream))])
    assert out == whole == expected_stream(stream, emit)
    assert relay.started and relay.done  # a [DONE] split over many reads still ends the stream


@pytest.mark.parametrize("name", ["gptoss", "crlf", "cr", "comments_events"])
def test_feed_returns_complete_frames_and_holds_at_most_one(name: str) -> None:
    # Using passthrough-equivalent content (no rewrite), the output after every
    # byte must be exactly the input's decided complete frames.
    stream = STREAMS[name]
    relay = SSERelay("reasoning" if name != "crlf" else "reasoning_content")
    out = b""
    for i in range(len(stream)):
        out += relay.feed(stream[i : i + 1])
        seen = stream[: i + 1]
        decided = seen[:-1] if seen.endswith(b"\r") else seen  # a trailing CR is undecided
        frames, _ = split_frames(decided)
        assert out == (b"".join(frames) if any(map(has_data, frames)) else b""), i
    # A frame ending in a CR blank line is only decided at EOF.
    assert relay.flush() == (split_frames(stream)[0][-1] if stream.endswith(b"\r") else b"")


def test_split_inside_needle_and_crlf() -> None:
    frame = b'data: {"choices":[{"delta":{"reasoning_content":"x"}}]}\r\n\r\n'
    whole, _ = run("both", [frame])
    i = frame.index(b"reasoning") + 4
    relay = SSERelay("both")
    assert relay.feed(frame[:i]) == b""
    assert relay.feed(frame[i:-1]) == b""  # ends in CR: undecided
    assert relay.feed(frame[-1:]) == whole


def test_trailing_cr_is_held_until_next_byte() -> None:
    relay = SSERelay("both")
    assert relay.feed(b"data: 1\r\r") == b""
    assert relay.feed(b"\ndata: 2") == b"data: 1\r\r\n"
    assert relay.feed(b"\r\r") == b""
    assert relay.feed(b"x") == b"data: 2\r\r"
    assert relay.flush() == b"" and relay.truncated  # "x" is no complete frame
    assert relay.started


def test_flush_drops_incomplete_tail_and_completes_cr_frame() -> None:
    tail = b'data: {"choices":[{"delta":{"reasoning":"x"}}]}\n'
    relay = SSERelay("both")
    assert relay.feed(tail) == b""
    assert relay.flush() == b"" and not relay.started and relay.truncated
    assert relay.flush() == b""
    relay = SSERelay("passthrough")
    first = b'data: {"x":1}\n\n'
    assert relay.feed(first + tail) == first
    assert relay.flush() == b"" and relay.truncated and not relay.done
    # A CR blank line at EOF does end the frame.
    relay = SSERelay("both")
    assert relay.feed(b'data: {"choices":[{"delta":{"reasoning":"x"}}]}\r\r') == b""
    assert relay.flush() == b'data: {"choices":[{"delta":{"reasoning":"x","reasoning_content":"x"}}]}\r\r'
    assert relay.started and relay.rewritten == 1 and not relay.truncated


def test_blank_lines_are_empty_frames_not_events() -> None:
    stream = b"\n\ndata: 1\n\n\n\n: c\r\n\r\n\r\r"
    for pieces in ([stream], [stream[i : i + 1] for i in range(len(stream))]):
        out, relay = run("both", pieces)
        assert out == stream and relay.started and not relay.done


@pytest.mark.parametrize("emit", EMITS)
def test_done_split_over_many_reads_is_seen(emit: str) -> None:
    body = sse(chunk({"content": "x"}))
    for eol in EOLS:
        stream = body + done(eol)
        for cut in range(1, len(stream)):
            for pieces in ([stream[:cut], stream[cut:]], [stream[i : i + 3] for i in range(0, len(stream), 3)],
                           [stream[i : i + 1] for i in range(len(stream))]):
                out, relay = run(emit, pieces)
                assert out == stream and relay.done, (eol, cut)
    # a [DONE] that is not the last event with data does not end the stream; a comment after it does
    assert not run(emit, [done() + body])[1].done
    assert run(emit, [body, done(), b": bye\n\n", b": data: [DONE]\n\n"])[1].done
    assert not run(emit, [body + b": data: [DONE]\n\n"])[1].done
    assert not run(emit, [body + b'data: "[DONE]"\n\n'])[1].done
    # lenient: a [DONE] cut off before its blank line still ends the stream, and is completed
    for tail, completed in ((b"data: [DONE]", b"data: [DONE]\n\n"), (b"data: [DONE]\r\n", b"data: [DONE]\r\n\r\n"),
                            (b"data: [DONE]\r", b"data: [DONE]\r\r")):
        out, relay = run(emit, [body + tail[:5], tail[5:]])
        assert out == body + completed and relay.done and not relay.truncated


@pytest.mark.parametrize("emit", EMITS)
def test_comments_are_not_events_with_data(emit: str) -> None:
    relay = SSERelay(emit)
    assert relay.feed(b": data: ping\n\n") == b""  # looks like data, is a comment
    assert relay.feed(b"event: message\nid: 1\n\n") == b"" and not relay.started  # no data line: no event
    first = b'data: {"choices":[]}\n\n'
    assert relay.feed(first[:-1]) == b"" and not relay.started  # data, but not complete yet
    assert relay.feed(b"\n") == b": data: ping\n\nevent: message\nid: 1\n\n" + first and relay.started
    assert SSERelay(emit).feed(b"data\n\n") == b"data\n\n"  # a data field without a colon is one


@pytest.mark.parametrize("emit", EMITS)
def test_oversize_event_is_reported_and_let_go(emit: str) -> None:
    first = sse(chunk({"content": "x"}))
    # after the start: the one frame that grows past max_event
    relay = SSERelay(emit, max_event=1000)
    assert relay.feed(first) == first
    assert relay.feed(b"data: " + b"a" * 600) == b"" and not relay.oversize
    assert relay.feed(b"a" * 600) == b"" and relay.oversize
    assert relay.feed(b"\n\n" + first) == b"" and relay.flush() == b""  # nothing more, ever
    assert len(relay._held) == 0  # the memory was let go
    # a complete frame over the bound in one read is caught too, after the frames before it
    relay = SSERelay(emit, max_event=1000)
    big = b"data: " + b"b" * 1200 + b"\n\n"
    assert relay.feed(first + big) == b"" and relay.oversize and not relay.started
    relay = SSERelay(emit, max_event=1000)
    assert relay.feed(first) == first and relay.feed(first + big) == first and relay.oversize
    # before the start: everything held until the first event with data counts
    relay = SSERelay(emit, max_event=1000)
    for _ in range(1000 // 14 + 1):
        assert relay.feed(b": keep-alive\n\n") == b""
    assert relay.oversize and not relay.started
    # frames up to the bound pass
    relay = SSERelay(emit, max_event=len(big))
    assert relay.feed(big[:500]) == b"" and relay.feed(big[500:]) == big and not relay.oversize


@pytest.mark.parametrize("emit", EMITS)
def test_nothing_is_returned_before_the_first_event(emit: str) -> None:
    # The proxy commits the response at the first non-empty feed() result.
    relay = SSERelay(emit)
    assert relay.feed(b"\n") == b""
    assert relay.feed(b"\r\n\r") == b""
    assert not relay.started
    first = sse(chunk({"content": "x"}))
    assert relay.feed(first) == b"\n\r\n\r" + first
    assert relay.started
    assert relay.feed(b"\n") == b"\n"  # after the first event, blank lines flow on


# --------------------------------------------------------------------------
# fast path, passthrough, bad frames, large frames


def test_fast_path_returns_same_object() -> None:
    relay = SSERelay("both")
    frames = [sse(chunk({"content": t})) for t in ["a", "b", "c"]]
    for f in frames:
        assert relay.feed(f) is f
    many = b"".join(frames * 20) + done()
    assert relay.feed(many) is many and relay.done
    assert relay.rewritten == 0
    crlf = sse(chunk({"content": "x"}), b"\r\n") * 3
    assert relay.feed(crlf) is crlf  # general path, still no copy
    assert not relay.done
    # Complete frames plus a partial one: the complete part now, the tail later.
    part = frames[0] + frames[1][:50]
    assert relay.feed(part) == frames[0]
    assert relay.feed(frames[1][50:]) == frames[1]
    # passthrough: any chunk that ends on a frame boundary
    relay = SSERelay("passthrough")
    for f in [*frames, crlf, many, b": c\r\n\n"]:
        assert relay.feed(f) is f


def test_no_needle_frames_are_never_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = orjson.loads

    def counting(data: Any) -> Any:
        calls.append(bytes(data))
        return real(data)

    monkeypatch.setattr(orjson, "loads", counting)
    stream = b"".join(sse(chunk({"content": t}), eol) for t in "abcdef" for eol in (b"\n", b"\r\n", b"\r"))
    stream += sse(chunk({RC: "r"})) + done()
    for pieces in ([stream], [stream[i : i + 7] for i in range(0, len(stream), 7)]):
        calls.clear()
        run("both", pieces)
        # the reasoning frame's parse, and the shape learnt from it (a probe with the needle, its value)
        assert calls and all(b'"reasoning_content"' in c or c == b'"r"' for c in calls), calls


def test_passthrough_holds_until_first_event_then_frames() -> None:
    first = sse(chunk({"role": "assistant", "content": ""}))
    relay = SSERelay("passthrough")
    assert relay.feed(b"\n") == b""  # a blank line is no event
    assert relay.feed(first[:10]) == b""
    assert not relay.started
    half = b'data: {"choices":[{"delta":{"reasoning_content":"x"'
    assert relay.feed(first[10:] + half) == b"\n" + first  # the half frame is held back
    assert relay.started
    tail = b"}}]}\n\n"
    assert relay.feed(tail) == half + tail
    assert relay.feed(tail) is tail
    assert relay.flush() == b"" and relay.rewritten == 0 and not relay.truncated
    relay = SSERelay("passthrough")
    assert relay.feed(first) is first


def test_invalid_json_with_needle_passes_unchanged() -> None:
    bad = b'data: {"choices":[{"delta":{"reasoning":"x"}]\n\n'
    good = sse(chunk({RC: "y"}))
    for emit in REWRITE_EMITS:
        for pieces in ([bad], [bad + good], [bad[:20], bad[20:] + good[:5], good[5:]]):
            out, relay = run(emit, pieces)
            assert out.startswith(bad)
            assert relay.bad_frames == 1
    relay = SSERelay("both")
    assert relay.feed(b"data: not json\n\n") == b"data: not json\n\n" and relay.bad_frames == 0
    nested = b'data: {"choices":[{"delta":{"reasoning":"x","d":' + b"[" * 300 + b"]" * 300 + b"}}]}\n\n"
    assert relay.feed(nested) == nested and relay.bad_frames == 1  # orjson.dumps depth limit


def test_large_frame_split_in_4k_chunks() -> None:
    text = ("思考 step é \\ \" " * 20000)[: 200 * 1024]
    frame = sse(chunk({R: text}))
    assert len(frame) > 200 * 1024
    for emit in REWRITE_EMITS:
        relay = SSERelay(emit)
        outs = [relay.feed(frame[i : i + 4096]) for i in range(0, len(frame), 4096)]
        assert all(o == b"" for o in outs[:-1])
        out = outs[-1] + relay.flush()
        assert set(frame_json(out)["choices"][0]["delta"].items()) == {(k, text) for k in MODE_KEYS[emit]}
        assert relay.started and not relay.oversize


def test_bad_emit_raises() -> None:
    with pytest.raises(ValueError):
        SSERelay("reasoning-content")
    with pytest.raises(ValueError):
        rewrite_message_body(b"{}", "none")


# --------------------------------------------------------------------------
# non-streamed bodies and requests


def completion(message: dict[str, Any]) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-2",
            "object": "chat.completion",
            "created": 1700000000,
            "model": "Qwen/Qwen3-8B",
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        }
    )


@pytest.mark.parametrize("src", [R, RC])
def test_rewrite_message_body_modes(src: str) -> None:
    body = completion({"role": "assistant", "content": "hi", src: "why é", "tool_calls": []})
    for emit in REWRITE_EMITS:
        out = rewrite_message_body(body, emit)
        msg = orjson.loads(out)["choices"][0]["message"]
        keys = sorted(MODE_KEYS[emit])
        assert sorted({R, RC} & msg.keys()) == keys
        assert all(msg[k] == "why é" for k in keys)
        assert orjson.loads(out) == expected_obj(orjson.loads(body), emit, "message")
        assert list(msg)[:3] == ["role", "content", src if emit == "both" else emit]
        if emit == src:
            assert out is body
        else:
            assert out is not body
    assert rewrite_message_body(body, "passthrough") is body


def test_rewrite_message_body_identity_cases() -> None:
    both = completion({"role": "assistant", "content": "x", RC: "a", R: "a"})
    plain = completion({"role": "assistant", "content": 'a "reasoning" b'})
    for body in (both, plain, b"not json {\"reasoning", b'["reasoning"]', b"", b'{"choices":"reasoning"}'):
        assert rewrite_message_body(body, "both") is body
    assert rewrite_message_body(plain, "reasoning") is plain
    assert rewrite_message_body(both, "reasoning") != both


def test_null_reasoning_is_not_aliased_nor_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM sends "reasoning": null in every non-streamed answer, even without a reasoning parser."""
    body = (b'{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant",'
            b'"content":"hi","refusal":null,"reasoning":null},"finish_reason":"stop"}]}')
    spaced = orjson.loads(body)
    spaced["choices"][0]["message"][RC] = None
    spaced_body = json.dumps(spaced).encode()

    def no_parse(*a: Any) -> Any:
        raise AssertionError("parsed")

    monkeypatch.setattr(orjson, "loads", no_parse)  # the module's attribute: reasoning calls it compiled or not
    for emit in EMITS:
        assert rewrite_message_body(body, emit) is body
        assert rewrite_message_body(spaced_body, emit) is spaced_body
    monkeypatch.undo()
    text = completion({"role": "assistant", "content": 'a "reasoning":null b', R: "why"})
    assert orjson.loads(rewrite_message_body(text, "both"))["choices"][0]["message"][RC] == "why"
    two = orjson.dumps({"choices": [{"index": 0, "message": {R: "why"}}, {"index": 1, "message": {R: None}}]})
    assert [c["message"].get(RC) for c in orjson.loads(rewrite_message_body(two, "both"))["choices"]] == ["why", None]
    null_in_text = completion({"role": "assistant", "content": 'say "reasoning', R: None})
    assert rewrite_message_body(null_in_text, "both") is null_in_text  # parsed, nothing to change
    delta = sse(chunk({R: None, "content": "x"}))
    assert SSERelay("both").feed(delta) is delta


def test_add_request_reasoning() -> None:
    payload: dict[str, Any] = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "q", RC: "not assistant"},
            {"role": "assistant", "content": "a", RC: "because"},
            {"role": "assistant", "content": "b", RC: "x", R: "kept"},
            {"role": "assistant", "content": "c", RC: None},
            "not a dict",
            {"role": "assistant", "content": "d"},
        ],
    }
    assert add_request_reasoning(payload) is True
    msgs = payload["messages"]
    assert msgs[1] == {"role": "assistant", "content": "a", RC: "because", R: "because"}
    assert R not in msgs[0] and msgs[2][R] == "kept" and R not in msgs[3] and R not in msgs[5]
    assert add_request_reasoning(payload) is False  # idempotent
    bads: list[dict[str, Any]] = [{}, {"messages": None}, {"messages": "x"}, {"messages": [1, None, []]}]
    for bad in bads:
        assert add_request_reasoning(bad) is False


def test_needs_request_rewrite() -> None:
    assert needs_request_rewrite(b'{"messages":[{"role":"assistant","reasoning_content":"x"}]}')
    assert not needs_request_rewrite(b'{"messages":[{"role":"assistant","reasoning":"x"}]}')
    assert not needs_request_rewrite(b"")


# --------------------------------------------------------------------------
# property test

TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=8)
LINE_TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"), max_size=6)
EOLS = (b"\n", b"\r\n", b"\r")


@st.composite
def reasoning_delta(draw: st.DrawFn) -> dict[str, Any]:
    value = draw(st.one_of(st.none(), TEXT))
    which = draw(st.sampled_from([(R,), (RC,), (R, RC), (RC, R)]))
    items = [(k, value) for k in which]
    if len(which) == 2 and draw(st.booleans()):
        items[1] = (items[1][0], draw(TEXT))  # both keys, different values
    items += draw(st.lists(st.sampled_from([("role", "assistant"), ("content", "")]), unique=True))
    return dict(draw(st.permutations(items)))


@st.composite
def frame_lines(draw: st.DrawFn) -> tuple[list[bytes], str]:
    """One frame's lines (without terminators, without the blank line) and its kind."""
    kind = draw(
        st.sampled_from(
            ["content", "reasoning", "reasoning", "choices", "tool", "needle_text", "usage", "error",
             "bad", "done", "comment", "empty"]
        )
    )
    if kind == "empty":
        return [], kind
    if kind == "comment":
        return [b":" + draw(LINE_TEXT).encode()], kind
    if kind == "done":
        return [b"data: [DONE]"], kind
    if kind == "bad":
        return [b'data: {"choices":[{"delta":{"reasoning":"' + draw(LINE_TEXT).encode()], kind
    obj: Any
    if kind == "content":
        obj = chunk({"content": draw(TEXT)})
    elif kind == "reasoning":
        obj = chunk(draw(reasoning_delta()))
    elif kind == "choices":
        obj = chunk(draw(reasoning_delta()))
        obj["choices"].insert(0, {"index": 1, "delta": {"content": draw(TEXT)}})
    elif kind == "tool":
        obj = chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"reasoning": ' + draw(TEXT)}}]})
    elif kind == "needle_text":
        obj = chunk({"content": 'say "reasoning' + draw(TEXT)})
    elif kind == "usage":
        obj = USAGE
    else:
        obj = {"error": {"message": '"reasoning" ' + draw(TEXT), "code": 500}}
    style = draw(st.sampled_from(["orjson", "ascii", "spaced", "indent"]))
    if style == "orjson":
        payload = orjson.dumps(obj).decode()
    else:
        payload = json.dumps(
            obj, ensure_ascii=style != "spaced", indent=1 if style == "indent" else None,
            separators=(",", ":") if style == "ascii" else None,
        )
    lines = [draw(st.sampled_from([b"data:", b"data: "])) + p.encode() for p in payload.split("\n")]
    extras = draw(st.lists(st.sampled_from([b": keep-alive", b"event: message", b"id: 7", b"retry: 100"]), max_size=2))
    for extra in extras:
        lines.insert(draw(st.integers(0, len(lines))), extra)
    return lines, kind


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[bytes], bytes]:
    """(stream, its complete frames, incomplete tail)."""
    frames: list[bytes] = []
    prev_eol = b""
    for lines, _kind in draw(st.lists(frame_lines(), max_size=8)):
        frame = b""
        for line in [*lines, b""]:
            eol = draw(st.sampled_from(EOLS))
            if line == b"" and eol == b"\n" and prev_eol == b"\r":
                eol = b"\r\n"  # CR then LF would be one CRLF: keep the blank line
            frame += line + eol
            prev_eol = eol
        frames.append(frame)
    tail = b""
    if draw(st.booleans()):
        tail = b'data: {"choices":[{"delta":{"reasoning":"' + draw(LINE_TEXT).encode()
        if draw(st.booleans()):
            tail = b": c" + draw(st.sampled_from(EOLS)) + tail
    return b"".join(frames) + tail, frames, tail


@settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), st.sampled_from(EMITS), st.data())
def test_property_chunking_and_byte_identity(
    generated: tuple[bytes, list[bytes], bytes], emit: str, data: st.DataObject
) -> None:
    stream, frames, tail = generated
    assert split_frames(stream) == (frames, tail)  # the generator's framing is the real one
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]

    whole, relay_whole = run(emit, [stream])
    chunked, relay = run(emit, pieces)
    assert chunked == whole  # (1) split invariance
    # (2) complete frames only, nothing before the first event with data; frames without a
    # reasoning key (and no-op frames) are byte-identical; rewritten frames are exactly
    # orjson.dumps of the rewritten object; passthrough changes no frame.
    assert whole == expected_stream(stream, emit)
    assert relay.started == relay_whole.started == any(map(has_data, frames))
    assert relay.done == relay_whole.done == last_data_is_done(whole)
    assert relay.truncated == relay_whole.truncated == bool(tail)
    assert relay.rewritten == relay_whole.rewritten
    if emit == "passthrough":
        assert relay.rewritten == relay.bad_frames == 0
        return
    assert relay.rewritten == sum(expected_reasoning_frame(f, emit) != f for f in frames)
    assert relay.bad_frames == sum(b'"reasoning' in f and frame_json(f) is None for f in frames)


TOKENS = [b"\r", b"\n", b"\r\n", b"data:", b"data: ", b": c", b"event: x", b"x", b'"reasoning', b"[DONE]",
          b'{"choices":[{"delta":{"reasoning_content":"a"}}]}', b'{"choices":[{"delta":{"reasoning":null}}]}']


@settings(deadline=None, max_examples=200)
@given(st.lists(st.sampled_from(TOKENS), max_size=40), st.sampled_from(EMITS), st.data())
def test_property_arbitrary_bytes(tokens: list[bytes], emit: str, data: st.DataObject) -> None:
    stream = b"".join(tokens)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    whole, relay_whole = run(emit, [stream])
    chunked, relay = run(emit, pieces)
    assert chunked == whole == expected_stream(stream, emit)
    assert relay.started == relay_whole.started == bool(whole)  # (a [DONE] completed at EOF starts it too)
    assert relay.done == relay_whole.done == last_data_is_done(whole)


def _frame_start_by_pairs(buf: bytes, lo: int, hi: int, scan_from: int, eof: bool) -> int:
    """The frame start found the long way, all three blank-line pairs scanned (the oracle for the
    memchr shortcut that CR-free input takes)."""
    while True:
        q = max(buf.rfind(b"\n\n", scan_from, hi), buf.rfind(b"\n\r", scan_from, hi), buf.rfind(b"\r\r", scan_from, hi))
        if q < 0:
            break
        end = sse_module._blank_end(buf, q + 1, eof)
        if end >= 0:
            return end
        hi = q + 1
    if lo < hi and buf[lo] in b"\r\n":
        return max(sse_module._blank_end(buf, lo, eof), lo)
    return lo


@settings(max_examples=300)
@given(st.lists(st.sampled_from([b"\n", b"\r", b"\r\n", b"data: x", b":c", b"\n\n"]), max_size=12), st.data())
def test_frame_start_shortcut_matches_the_pair_scan(parts: list[bytes], data: st.DataObject) -> None:
    buf = b"".join(parts)
    hi = data.draw(st.integers(0, len(buf)))
    scan_from = data.draw(st.integers(0, hi))
    lo = data.draw(st.integers(0, scan_from))
    for eof in (False, True):
        got = sse_module._frame_start(buf, lo, hi, scan_from, eof)
        assert got == _frame_start_by_pairs(buf, lo, hi, scan_from, eof)


def test_frame_start_finds_a_blank_line_at_lo_in_cr_free_input() -> None:
    assert sse_module._frame_start(b"\nabc", 0, 4, 0, False) == 1  # the one blank line is at lo
    assert sse_module._frame_start(b"data: a\n\nb", 0, 10, 0, False) == 9


# --------------------------------------------------------------------------
# the learnt chunk shape: after the first reasoning chunk of a stream, chunks with the same bytes
# around their value are rewritten by a splice, which must give exactly what the parse gives

SHAPED = (b'data: {"id":"chatcmpl-9","object":"chat.completion.chunk","created":1,"model":"m",'
          b'"choices":[{"index":0,"delta":{')
SHAPED_END = b'},"logprobs":null,"finish_reason":null}]}\n\n'
ANY_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=6)


@st.composite
def shaped_frame(draw: st.DrawFn, key: bytes) -> bytes:
    """A frame of one stream's reasoning shape, or one that only looks like it."""
    value = orjson.dumps(draw(ANY_TEXT))
    kind = draw(st.sampled_from(["shaped"] * 6 + ["ascii", "bad_utf8", "raw_control", "null", "number", "more",
                                                  "other_end", "quote_in", "spaced", "content", "other_key"]))
    if kind == "ascii":  # valid JSON, not orjson's bytes: the parse's bytes go out
        value = json.dumps(draw(ANY_TEXT) + "é").encode()
    elif kind == "bad_utf8":
        value = b'"\xff' + value[1:]
    elif kind == "raw_control":
        value = b'"\x01' + value[1:]
    elif kind == "null":
        value = b"null"
    elif kind == "number":
        value = b"7"
    elif kind == "quote_in":  # a value that ends early: invalid JSON
        value = value[:-1] + b'"x"'
    middle = key + b":" + value
    if kind == "more":
        middle += b',"content":""'
    elif kind == "spaced":
        middle = key + b": " + value
    elif kind == "content":
        middle = b'"content":' + value
    elif kind == "other_key":  # the same bytes around the value but the other name
        middle = (b'"reasoning_content":' if key == b'"reasoning"' else b'"reasoning":') + value
    end = b'},"logprobs":null,"finish_reason":"stop"}]}\n\n' if kind == "other_end" else SHAPED_END
    return SHAPED + middle + end


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([b'"reasoning"', b'"reasoning_content"']), st.sampled_from(REWRITE_EMITS), st.data())
def test_property_learnt_shape_splice_equals_the_parse(key: bytes, emit: str, data: st.DataObject) -> None:
    first = SHAPED + key + b':"first"' + SHAPED_END  # a canonical chunk: the shape is learnt from it
    frames = [first, *data.draw(st.lists(shaped_frame(key), min_size=1, max_size=12)), done()]
    stream = b"".join(frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    out, relay = run(emit, pieces)
    assert out == expected_stream(stream, emit)
    assert relay.rewritten == sum(expected_reasoning_frame(f, emit) != f for f in frames)
    assert relay.bad_frames == sum(frame_json(f) is None for f in frames[:-1])
    changes = emit == "both" or (emit == "reasoning") != (key == b'"reasoning"')
    assert relay._shape is not None or not changes  # the splice was there to be tested


def test_shape_is_not_learnt_from_a_needle_that_is_not_the_deltas_key() -> None:
    """Chunks whose needle sits somewhere a splice would misplace: each is rewritten by a parse."""
    tricky = [
        b'data: {"choices":[{"delta":{"reasoning_content":"a"},"x":"\\"reasoning"}]}\n\n',  # two needles
        b'data: {"choices":[{"delta":{"reasoning_content":"a\\"b"}}]}\n\n',  # an escape before its end
        b'data: {"choices": [{"delta": {"reasoning_content":"a"}}]}\n\n',  # not orjson's bytes
        b'data: {"choices":[{"delta":{"x":{"reasoning_content":"a"}}}]}\n\n',  # not the delta itself
    ]
    for frame in tricky:
        stream = frame + frame.replace(b'"a', b'"b') + done()
        out, relay = run("both", [stream])
        assert out == expected_stream(stream, "both")
        assert relay._shape is None, frame
    # found by a differential fuzz: the shape learnt from the first chunk must not take the second
    # (the other key, whose value from the learnt offset on reads as a string) for one of its own
    stream = SHAPED + b'"reasoning_content":""' + SHAPED_END + SHAPED + b'"reasoning":"\\t\\"\\"\\""' + SHAPED_END
    for emit in REWRITE_EMITS:
        assert run(emit, [stream])[0] == expected_stream(stream, emit), emit
    learnt = [
        SHAPED + b'"reasoning":"x"' + SHAPED_END,
        b'data: {"choices":[{"delta":{"content":"x","reasoning_content":"a"}}]}\n\n',  # more keys in the delta
        b'data: {"choices":[{"delta":{"reasoning_content":"a","content":"x"}}]}\n\n',  # (the alias goes after it)
    ]
    for frame in learnt:
        stream = frame + frame.replace(b'"a', b'"b') + frame.replace(b'"a', b'"c\\n') + done()
        for emit in REWRITE_EMITS:
            out, relay = run(emit, [stream])
            assert out == expected_stream(stream, emit)
            assert (relay._shape is not None) == (relay.rewritten > 0), (frame, emit)


def _orjson_round_trips(value: bytes) -> bool:
    try:
        return orjson.dumps(orjson.loads(value)) == value
    except ValueError:
        return False


@settings(max_examples=400)
@given(st.one_of(
    st.binary(max_size=24).map(lambda b: b'"' + b + b'"'),
    st.text(max_size=12).map(lambda t: b'"' + t.encode("utf-8", "surrogatepass") + b'"'),
    st.text(max_size=12).map(lambda t: json.dumps(t, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    st.text(max_size=12).map(lambda t: json.dumps(t).encode()),
    st.binary(max_size=8)))
def test_canonical_string_agrees_with_orjson_round_trip(value: bytes) -> None:
    """The splice's check that a value is one JSON string in orjson's own form: its shortcut for
    values without a quote, a backslash or a control character says what the round trip says."""
    assert reasoning.canonical_string(value) == (value[:1] == b'"' and _orjson_round_trips(value))


def test_canonical_string_cases() -> None:
    ok = reasoning.canonical_string
    assert ok(b'"plain"') and ok('"é 漢 \u2028 \x7f"'.encode()) and ok(b'""')
    assert not ok(b'"\xed\xa0\x80"') and not ok(b'"\xff"')  # a surrogate, not UTF-8
    assert not ok(b'"a"b"') and not ok(b'"tab\there"') and not ok(b'"\\u00e9"') and not ok(b"null")
    assert ok(b'"line\\nbreak"') and ok(b'"q\\"uote"')  # orjson's own escapes
