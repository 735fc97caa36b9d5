"""Sans-io SSE framing and reasoning-field aliasing for OpenAI chat completions.

Job: replicas stream chat completions as SSE, one ``data: {json}`` frame per
token, naming the reasoning text ``reasoning_content`` (vLLM <= 0.11, SGLang),
``reasoning`` (vLLM >= 0.16) or both (transition releases).  :class:`SSERelay`
sits between upstream and client (feed it upstream bytes, write what it
returns) and rewrites ``choices[].delta`` per ``emit``: ``both`` mirrors the
present key to the other (alias right after it), ``reasoning`` /
``reasoning_content`` keep only that name (renamed in place; of two, the other
is dropped), ``passthrough`` touches nothing.  :func:`rewrite_message_body`
does the same to a non-streamed body's ``choices[].message``;
:func:`add_request_reasoning` and :func:`needs_request_rewrite` serve requests.

Framing, as browsers parse SSE: lines end in LF, CRLF or CR (CR LF is always one
CRLF); a frame is everything up to and including its first blank line (so a
blank line right after a frame is an *empty* frame); ``events`` counts complete
non-empty frames.  A frame ending in CR is complete only once the next byte (or
EOF, in ``flush``) shows that the CR is not half of a CRLF.

Invariants:
* Split invariance: all ``feed()`` results plus ``flush()``, concatenated,
  depend only on the concatenated input, never on where it was cut.
* ``feed()`` returns complete frames only and holds back at most the one
  incomplete trailing frame, except that nothing (not even blank lines) is
  returned before the first event is complete: that is the proxy's commit
  point.  Passthrough then returns its input as is.
* Only a frame whose data is JSON whose ``choices[].delta`` needs a change is
  re-serialised; any other frame (comments, ``[DONE]``, usage, errors,
  ``"reasoning`` inside a string, invalid JSON) keeps its original bytes.  A
  rewritten frame keeps its other lines verbatim; its data lines become one
  ``data: <json>`` line ended like the first.  Values survive, within orjson's
  round trip (integers beyond 64 bits become floats, duplicate keys collapse).
* Fast path: with nothing held back, an LF-only chunk that ends on a frame
  boundary and lacks ``b'"reasoning'`` is returned as the same object after a
  few C-level scans: no JSON parse, no per-frame loop.
* Never raises on upstream bytes: a frame with the needle whose data cannot be
  parsed (or re-serialised) passes unchanged and counts in ``bad_frames``.
  Keys spelt with JSON escapes (``"\\u0072easoning"``) are not recognised.
"""

from __future__ import annotations

import re
from typing import Any, Final

import orjson

__all__ = ["EMITS", "SSERelay", "add_request_reasoning", "needs_request_rewrite", "rewrite_message_body"]

EMITS: Final = ("both", "reasoning", "reasoning_content", "passthrough")
_BOTH: Final = 0  # modes are indexes into EMITS
_REASONING: Final = 1
_REASONING_CONTENT: Final = 2
_PASSTHROUGH: Final = 3
_NORMAL: Final = 0  # relay states: a rewrite mode / passthrough before / after the first event
_PASS_WAIT: Final = 1
_PASS_OPEN: Final = 2

_NEEDLE: Final = b'"reasoning'
_LF: Final = 10
_CR: Final = 13
_LINE_RE: Final = re.compile(rb"([^\r\n]*)(\r\n|\n|\r)")
_EVENT_RE: Final = re.compile(rb"\n\n(?!\n)")  # in LF-only text: one match per frame end
# Note: on CPython 3.11, bytes.rfind() of the needle runs ~2x faster on JSON
# text than find() or `in`, so membership tests use rfind.


def _mode_of(emit: str) -> int:
    try:
        return EMITS.index(emit)
    except ValueError:
        raise ValueError(f"emit must be one of {EMITS}, got {emit!r}") from None


# --------------------------------------------------------------------------
# field rewrite


def _alias(d: dict[str, Any], mode: int) -> bool:
    """Apply the rewrite rule to a delta/message dict in place; True if changed."""
    if "reasoning" in d:
        if "reasoning_content" in d:  # both keys
            if mode == _BOTH:
                return False
            del d["reasoning_content" if mode == _REASONING else "reasoning"]
            return True
        if mode == _REASONING:
            return False
        have, other = "reasoning", "reasoning_content"
    elif "reasoning_content" in d:
        if mode == _REASONING_CONTENT:
            return False
        have, other = "reasoning_content", "reasoning"
    else:
        return False
    if len(d) == 1 or next(reversed(d)) == have:  # the key is last: no reordering
        d[other] = d[have] if mode == _BOTH else d.pop(have)
        return True
    items = list(d.items())  # rebuild, keeping the key order
    d.clear()
    for k, v in items:
        if k == have:
            if mode == _BOTH:
                d[k] = v
            d[other] = v
        else:
            d[k] = v
    return True


def _rewrite_json(payload: bytes, field: str, mode: int) -> bytes | None:
    """payload with the rule applied to each choices[i][field]; None if unchanged.

    Raises ValueError when payload is not JSON or cannot be re-serialised.
    """
    obj = orjson.loads(payload)
    try:
        choices = obj["choices"]
    except (KeyError, TypeError, IndexError):
        return None
    changed = False
    if type(choices) is list:
        for choice in choices:
            try:
                sub = choice[field]
            except (KeyError, TypeError, IndexError):
                continue
            if type(sub) is dict and _alias(sub, mode):
                changed = True
    if not changed:
        return None
    try:
        return orjson.dumps(obj)
    except TypeError as exc:  # orjson.JSONEncodeError, e.g. nesting too deep
        raise ValueError(str(exc)) from None


# --------------------------------------------------------------------------
# framing helpers


def _blank_end(buf: bytes | bytearray, p: int, eof: bool) -> int:
    """End of the blank line starting at p (buf[p] is CR or LF); -1 if undecided."""
    if buf[p] == _LF:
        return p + 1
    if p + 1 < len(buf):
        return p + 2 if buf[p + 1] == _LF else p + 1
    return p + 1 if eof else -1


def _frame_start(buf: bytes | bytearray, lo: int, hi: int, scan_from: int, eof: bool) -> int:
    """Start of the frame holding hi: the end of the last decided blank line in
    buf[lo:hi], else lo (lo is a frame start).

    A blank line not at lo starts right after one of LF LF, LF CR, CR CR, and
    each such pair marks one; pairs before scan_from are known not to matter.
    """
    while True:
        q = max(buf.rfind(b"\n\n", scan_from, hi), buf.rfind(b"\n\r", scan_from, hi),
                buf.rfind(b"\r\r", scan_from, hi))
        if q < 0:
            break
        end = _blank_end(buf, q + 1, eof)
        if end >= 0:
            return end
        hi = q + 1  # a trailing undecided CR: look for an earlier blank line
    if lo < hi and (buf[lo] == _LF or buf[lo] == _CR):
        return max(_blank_end(buf, lo, eof), lo)
    return lo


def _frame_end(buf: bytes, pos: int) -> int:
    """End of the frame holding pos; buf ends on a decided frame boundary."""
    q = n = len(buf)
    for pair in (b"\n\n", b"\n\r", b"\r\r"):
        j = buf.find(pair, pos, q + 1)
        if 0 <= j < q:
            q = j
    return _blank_end(buf, q + 1, True) if q < n else n


def _count_events(region: bytes) -> int:
    """Number of non-empty frames in region (which holds complete frames only)."""
    if _CR in region:
        region = region.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    events = len(_EVENT_RE.findall(region))
    return events - 1 if region[:2] == b"\n\n" else events  # leading blank lines


def _data_value(content: bytes) -> bytes | None:
    """The value of a `data` field line, None for any other line."""
    if not content.startswith(b"data") or (len(content) > 4 and content[4] != 58):  # b":"
        return None
    value = content[5:]
    return value[1:] if value[:1] == b" " else value


# --------------------------------------------------------------------------
# the relay


class SSERelay:
    """Feed it upstream bytes as they arrive; it returns the bytes to write to the client."""

    __slots__ = ("_fast", "_held", "_mode", "_state", "bad_frames", "events", "rewritten")

    events: int
    bad_frames: int
    rewritten: int

    def __init__(self, emit: str) -> None:
        self._mode = _mode_of(emit)
        self._state = _PASS_WAIT if self._mode == _PASSTHROUGH else _NORMAL
        self._fast = self._state == _NORMAL  # a rewrite mode and nothing held back
        self._held = bytearray()
        self.events = 0  # complete non-empty frames (only >= 1 is tracked in passthrough)
        self.bad_frames = 0  # frames with the needle whose data could not be parsed
        self.rewritten = 0  # frames re-serialised

    def feed(self, data: bytes) -> bytes:
        """Bytes to send on now: complete frames only (possibly b"")."""
        if not self._fast:
            return data if self._state == _PASS_OPEN else self._feed_slow(data)
        # Hot path, C-level scans only (10 is LF, 13 is CR, literals beat globals).
        n = len(data) - 2
        if data.find(10) == n and n > 0 and data[-1] == 10 and 13 not in data:
            # The typical token: exactly one single-line LF frame.
            self.events += 1
            if data.rfind(b'"reasoning') < 0 or not data.startswith(b"data:"):
                return data
            new = self._new_json(data[6:n] if data[5] == 32 else data[5:n])
            return data if new is None else b"data: " + new + b"\n\n"
        if n > 0 and data[-1] == 10 and data[-2] == 10 and data[0] != 10 and 13 not in data:
            # LF only, whole frames.
            self.events += len(_EVENT_RE.findall(data))
            if data.rfind(b'"reasoning') < 0:
                return data
            return self._rewrite_region(data, True)
        return self._feed_slow(data)

    def flush(self) -> bytes:
        """At upstream EOF: the held-back bytes.

        A held frame that EOF completes (it ends in a CR blank line) is treated
        like any complete frame; a truly incomplete frame is returned unchanged.
        """
        if not self._held:
            return b""
        buf = bytes(self._held)
        self._held.clear()
        if self._state != _NORMAL:
            return buf
        self._fast = True
        end = _frame_start(buf, 0, len(buf), 0, True)
        region = buf[:end]
        self.events += _count_events(region) if end else 0
        if region.rfind(_NEEDLE) >= 0:
            region = self._rewrite_region(region, False)
        return region + buf[end:]

    def _feed_slow(self, data: bytes) -> bytes:
        held = self._held
        if held:
            scan_from = len(held) - 2 if len(held) > 2 else 0
            held += data
            out = self._process(held, scan_from)
        elif not data:
            return b""
        else:
            out = self._process(data, 0)
        self._fast = self._state == _NORMAL and not held
        return out

    def _process(self, buf: bytes | bytearray, scan_from: int) -> bytes:
        """General path; buf is either the held bytearray or fresh data."""
        held = self._held
        end = _frame_start(buf, 0, len(buf), scan_from, False)
        region = buf[:end] if isinstance(buf, bytes) else bytes(buf[:end])
        events = _count_events(region) if end else 0
        if not events and not self.events:  # nothing before the first event (the commit point)
            if buf is not held:
                held += buf
            return b""
        self.events += events
        if self._state == _PASS_WAIT:
            self._state = _PASS_OPEN
            if buf is not held:
                return buf if isinstance(buf, bytes) else bytes(buf)
            out = bytes(held)
            held.clear()
            return out
        if buf is held:
            del held[:end]
        elif end < len(buf):
            held += buf[end:]
        return self._rewrite_region(region, False) if region.rfind(_NEEDLE) >= 0 else region

    def _rewrite_region(self, region: bytes, lf_only: bool) -> bytes:
        """Rewrite the frames of region (complete frames only) that need it."""
        pieces: list[bytes] = []
        done = 0
        pos = region.find(_NEEDLE)
        while pos >= 0:
            k = region.find(10, done) if lf_only else -1
            if k > pos and region[k + 1] == 10:
                # LF only, and the needle is in the one-line frame starting at done.
                end = k + 2
                if region.startswith(b"data:", done):
                    new = self._new_json(region[done + 6 if region[done + 5] == 32 else done + 5 : k])
                    if new is not None:
                        # Concatenate at once: keeping orjson's output buffers alive
                        # until the join measured ~30% slower (malloc heap churn).
                        pieces.append(b"data: " + new + b"\n\n")
                        done = end
            else:
                if lf_only:  # memchr shortcuts; region[done - 1] is an LF here
                    j = region.rfind(10, done, pos)
                    start = done if j < 0 else j + 1 if region[j - 1] == 10 else _frame_start(
                        region, done, pos, done, True)
                    k = region.find(10, pos)
                    end = k + 2 if region[k + 1] == 10 else _frame_end(region, pos)
                else:
                    start = _frame_start(region, done, pos, done, True)
                    end = _frame_end(region, pos)
                new = self._rewrite_frame(region[start:end], lf_only)
                if new is not None:
                    if start > done:
                        pieces.append(region[done:start])
                    pieces.append(new)
                    done = end
            pos = region.find(_NEEDLE, end)
        if not pieces:
            return region
        if done < len(region):
            pieces.append(region[done:])
        return b"".join(pieces)

    def _rewrite_frame(self, frame: bytes, lf_only: bool) -> bytes | None:
        """The rewritten frame (which holds the needle), or None to keep its bytes."""
        n = len(frame)
        if frame.find(10) == n - 2 and frame[n - 1] == 10 and (lf_only or 13 not in frame):
            # One line plus the blank line, LF endings.
            if not frame.startswith(b"data:"):
                return None
            new = self._new_json(frame[6 : n - 2] if frame[5] == 32 else frame[5 : n - 2])
            return None if new is None else b"data: " + new + b"\n\n"
        lines: list[tuple[bytes, bytes]] = _LINE_RE.findall(frame)
        values = [v for v in (_data_value(c) for c, _ in lines) if v is not None]
        payload = b"\n".join(values)
        if payload.find(_NEEDLE) < 0:
            return None
        new = self._new_json(payload)
        if new is None:
            return None
        out: list[bytes] = []
        first = True
        for content, term in lines:
            if _data_value(content) is None:
                out += (content, term)
            elif first:
                out += (b"data: ", new, term)
                first = False
        return b"".join(out)

    def _new_json(self, payload: bytes) -> bytes | None:
        """Rewritten JSON for a data payload holding the needle, None if unchanged."""
        try:
            new = _rewrite_json(payload, "delta", self._mode)
        except ValueError:  # incl. orjson.JSONDecodeError
            self.bad_frames += 1
            return None
        if new is not None:
            self.rewritten += 1
        return new


# --------------------------------------------------------------------------
# non-streamed responses and requests


def rewrite_message_body(body: bytes, emit: str) -> bytes:
    """Apply the rule to choices[].message of a non-streamed response body.

    Returns the same object ``body`` when nothing changes (passthrough, no
    reasoning key, not valid JSON, ...).
    """
    mode = _mode_of(emit)
    if mode == _PASSTHROUGH or body.rfind(_NEEDLE) < 0:
        return body
    try:
        new = _rewrite_json(body, "message", mode)
    except ValueError:
        return body
    return body if new is None else new


def add_request_reasoning(payload: dict[str, Any]) -> bool:
    """Copy assistant messages' "reasoning_content" string to "reasoning".

    Only where "reasoning" is absent; mutates payload in place and returns True
    if anything changed.  Tolerates malformed "messages".
    """
    messages = payload.get("messages") if isinstance(payload, dict) else None
    if not isinstance(messages, list):
        return False
    changed = False
    for msg in messages:
        if isinstance(msg, dict) and msg.get("role") == "assistant" and "reasoning" not in msg:
            text = msg.get("reasoning_content")
            if isinstance(text, str):
                msg["reasoning"] = text
                changed = True
    return changed


def needs_request_rewrite(body: bytes) -> bool:
    """Cheap pre-check: False when the request body cannot need add_request_reasoning."""
    return b'"reasoning_content"' in body
