"""Sans-io SSE framing for OpenAI chat completion streams, with the reasoning fields' rule applied.

Job: replicas stream chat completions as SSE, one ``data: {json}`` frame per
token.  :class:`SSERelay` sits between upstream and client (feed it upstream
bytes, write what it returns) and applies the rule of :mod:`teraproxy.reasoning`
(``emit``: both names, one of them, or passthrough) to each frame's
``choices[].delta``; it also gives a replica's in-stream error event a string
code.

Framing, as browsers parse SSE: lines end in LF, CRLF or CR (CR LF is always one
CRLF); a frame is everything up to and including its first blank line (so a
blank line right after a frame is an *empty* frame); an *event with data* is a
frame with a ``data`` field line (a comment such as ``: data: ping`` is not
one).  A frame ending in CR is complete only once the next byte (or EOF, in
``flush``) shows that the CR is not half of a CRLF.  Every mode frames:
passthrough differs from the rewrite modes only in leaving complete frames as
they are.

Invariants:
* Split invariance: all ``feed()`` results plus ``flush()``, concatenated,
  depend only on the concatenated input, never on where it was cut.
* ``feed()`` returns complete frames only and holds back at most the one
  incomplete trailing frame, except that nothing is returned before the first
  event with data is complete: that is the proxy's commit point (``started``).
  ``flush()`` drops an incomplete last frame (``truncated``); a client would
  not dispatch it either, and it must not have an error event glued to it.
* Bounded memory: a frame longer than ``max_event`` (before the start: all
  bytes held until the first event with data) sets ``oversize``; what was held
  is let go and nothing more is returned.
* ``done`` is judged from the frames that went out, not from the last reads:
  a ``data: [DONE]`` split over any number of reads counts once complete.
* Only a frame whose data is JSON whose ``choices[].delta`` needs a change is
  re-serialised; any other frame (comments, ``[DONE]``, usage, errors,
  ``"reasoning`` inside a string, invalid JSON) keeps its original bytes.  A
  rewritten frame keeps its other lines verbatim; its data lines become one
  ``data: <json>`` line ended like the first (a line ended by a lone CR that
  comes to stand before the blank line's LF gets CRLF: the two stay two line
  ends and the frame stays complete).  Values survive, within orjson's
  round trip (integers beyond 64 bits become floats, duplicate keys collapse).
* A rewritten frame's bytes are orjson.dumps of the rewritten object, however
  they were made: after the first rewritten chunk of a stream, chunks of the
  same shape (the same bytes around the reasoning value, proven once by
  ``learn``) are spliced around their value instead of parsed, when the value
  is orjson's own bytes for a string (vLLM's are); any other goes by the parse.
* Fast path: once started with nothing held back, a chunk that ends on a frame
  boundary is returned as the same object after a few C-level scans, no
  per-frame work: passthrough needs only ``endswith(b"\n\n")``; the rewrite
  modes take LF-only chunks and look for ``b'"reasoning'`` (no JSON parse
  without it).
* A replica's own in-stream error event (vLLM, engine died:
  ``data: {"error": {..., "code": 500}}``) gets a string ``code`` in every
  mode, like every error the proxy answers: a line that is exactly
  ``data: {"error"...`` is re-serialised with ``str(code)``. Found without a
  parse: one byte test on a lone frame (``data: {"e``), one needle scan per
  chunk of several frames (and per passthrough chunk): ``b'\ndata: {"error"'``
  and the first line where LF ends every line, else ``b'{"error"'``.
* Never raises on upstream bytes: a frame with the needle whose data cannot be
  parsed (or re-serialised) passes unchanged and counts in ``bad_frames``.
  Keys spelt with JSON escapes (``"\\u0072easoning"``) are not recognised.
"""

from __future__ import annotations

import re
from typing import Final

import orjson

from teraproxy.reasoning import NEEDLE, PASSTHROUGH, Shape, canonical_string, learn, mode_of, rewrite_json

__all__ = ["MAX_EVENT", "SSERelay"]

MAX_EVENT: Final = 1024 * 1024  # default bound on one SSE frame (config: limits.max_event)

_ERROR: Final = b'{"error"'  # an error event's JSON starts with it
_ERROR_LINE: Final = b'data: {"error"'
_ERROR_AFTER_LF: Final = b'\ndata: {"error"'  # such a line after the first, where no CR ends lines
_LF: Final = 10
_CR: Final = 13
_LINE_RE: Final = re.compile(rb"([^\r\n]*)(\r\n|\n|\r)")
_EOL_RE: Final = re.compile(rb"[\r\n]")
# Note: on CPython 3.11, bytes.rfind() of the needle runs ~2x faster on JSON
# text than find() or `in`, so membership tests use rfind; and `bytes in bytes`
# first tries the needle as an int, paying for a TypeError (~2k instructions).
# A single byte is searched as an int (`13 in data`, `find(10)`): memchr, ~30x
# faster than a two-byte search. Compiled, ``data.rfind(x)`` looks the method up on bytes'
# type at every call (~100 instructions); the per-read paths call these, looked up once.
_find: Final = bytes.find
_rfind: Final = bytes.rfind



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
    Without a CR (memchr), LF LF is the only pair: the two CR scans (each a full
    search of the range, ~0.3 ns a byte) are skipped.
    """
    if buf.find(13, scan_from, hi) < 0:
        q = buf.rfind(b"\n\n", scan_from, hi)
        if q >= 0:
            return q + 2
    else:
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


def _oversize_at(region: bytes, limit: int) -> int:
    """Start of the first frame longer than limit in region (complete frames only), else -1."""
    pos = 0
    while pos < len(region):
        end = _frame_end(region, pos)
        if end - pos > limit:
            return pos
        pos = end
    return -1


def _has_data(buf: bytes | bytearray, lo: int, hi: int) -> bool:
    """Whether the lines of buf[lo:hi] (lo at a line start) include a ``data`` field line.

    A comment that mentions data (``: data: ping``) is not one."""
    p = buf.find(b"data", lo, hi)
    while p >= 0:
        if (p == lo or buf[p - 1] == _LF or buf[p - 1] == _CR) and (p + 4 >= hi or buf[p + 4] in b":\r\n"):
            return True
        p = buf.find(b"data", p + 4, hi)
    return False


def _last_data(frames: bytes) -> bytes | None:
    """The data of the last frame with data in frames (a trailing unterminated one included)."""
    last: bytes | None = None
    cur: list[bytes] | None = None
    for content, _ in _LINE_RE.findall(frames + b"\n"):  # the LF ends an unterminated last line
        if not content:
            if cur is not None:
                last, cur = b"\n".join(cur), None
            continue
        value = _data_value(content)
        if value is not None:
            if cur is None:
                cur = [value]
            else:
                cur.append(value)
    return b"\n".join(cur) if cur is not None else last


def _last_data_is_done(region: bytes) -> bool:
    """Whether the last event with data in region (complete frames) is ``[DONE]``."""
    if region.endswith(b"\n\ndata: [DONE]\n\n") or region == b"data: [DONE]\n\n":
        return True
    hi = len(region)
    while (p := region.rfind(b"[DONE]", 0, hi)) >= 0:
        start = _frame_start(region, 0, p, 0, True)
        last = _last_data(region[start:])
        if last is not None:
            return last == b"[DONE]"
        hi = start  # the [DONE] was in a comment: look further back
    return False


def _data_value(content: bytes) -> bytes | None:
    """The value of a `data` field line, None for any other line."""
    if not content.startswith(b"data") or (len(content) > 4 and content[4] != 58):  # b":"
        return None
    value = content[5:]
    return value[1:] if value[:1] == b" " else value


# --------------------------------------------------------------------------
# the relay


class SSERelay:
    """Feed it upstream bytes as they arrive; it returns the bytes to write to the client.

    What it saw, for the proxy to act on: ``started`` (the first complete event
    with data has been returned: the commit point), ``oversize`` (a frame grew
    past ``max_event``: the stream is unusable and nothing more is returned),
    ``truncated`` (``flush`` dropped an incomplete frame) and ``done`` (the last
    event with data that went out was ``data: [DONE]``).
    """

    __slots__ = ("_fast", "_held", "_mode", "_pass", "_scanned", "_shape", "_tail", "bad_frames", "max_event",
                 "oversize", "rewritten", "started", "truncated")

    bad_frames: int
    rewritten: int

    def __init__(self, emit: str, max_event: int = MAX_EVENT) -> None:
        self._mode = mode_of(emit)
        self._pass = self._mode == PASSTHROUGH
        self._fast = False  # started and nothing held back: the fast paths apply
        self._held = bytearray()  # before the start: all bytes so far; after: the one incomplete frame
        self._scanned = 0  # before the start: _held[:_scanned] are complete frames without data
        self._tail = b""  # the last returned region that holds an event with data
        self._shape: Shape | None = None  # the stream's reasoning chunk: from the last parsed one that had one
        self.max_event = max_event
        self.started = False
        self.oversize = False
        self.truncated = False
        self.bad_frames = 0  # frames with the needle whose data could not be parsed
        self.rewritten = 0  # frames re-serialised

    @property
    def done(self) -> bool:
        """The last event with data that went out was ``[DONE]`` (however it was split)."""
        return _last_data_is_done(self._tail)

    def feed(self, data: bytes) -> bytes:
        """Bytes to send on now: complete frames only (possibly b"")."""
        if not self._fast:
            return self._feed_slow(data)
        # Hot paths, C-level scans only (10 is LF, 13 is CR; literals beat globals).
        if self._pass:
            # (compiled, endswith/startswith are a memcmp; a slice would be a new object)
            if data.endswith(b"\n\n") and len(data) <= self.max_event:  # ends on a frame boundary
                if data.startswith(b"data:"):
                    self._tail = data
                else:
                    self._note(data)
                return _errors_fixed(data)
            return self._feed_slow(data)
        n = len(data) - 2
        if n >= self.max_event:
            return self._feed_slow(data)
        if _find(data, 10) == n and n > 6 and data[-1] == 10 and 13 not in data:
            # The typical token: exactly one single-line LF frame (of 9 bytes or more).
            if not data.startswith(b"data:"):
                self._note(data)
                return data
            self._tail = data
            if _rfind(data, NEEDLE) < 0:
                return data if data[8] != 101 else _fix_errors(data)  # 101: the e of data: {"error"
            new = self._new_json(data[6:n] if data[5] == 32 else data[5:n])
            if new is None:
                return data if data[8] != 101 else _fix_errors(data)
            return b"data: " + new + b"\n\n"
        if n > 0 and data[-1] == 10 and data[-2] == 10 and data[0] != 10 and 13 not in data:
            # LF only, whole frames.
            if data.startswith(b"data:"):
                self._tail = data
            else:
                self._note(data)
            last = _rfind(data, NEEDLE)
            if last < 0:
                return _lf_errors_fixed(data)
            return _errors_fixed(self._rewrite_region(data, True, last))
        return self._feed_slow(data)

    def flush(self) -> bytes:
        """At upstream EOF: the complete frames still held back.

        A held frame that EOF completes (it ends in a CR blank line) is treated
        like any complete frame; a truly incomplete frame is dropped (a client
        would not dispatch it either) and sets ``truncated`` -- unless its data
        is ``[DONE]``, which is completed with the blank line it lacks.
        """
        held = self._held
        if not held or self.oversize:
            return b""
        buf = bytes(held)
        self._held = bytearray()
        end = max(_frame_start(buf, 0, len(buf), 0, True), self._scanned)
        tail = buf[end:]
        if tail:
            if _last_data(tail) == b"[DONE]":  # lenient: a [DONE] without its blank line still ends
                term = tail[len(tail.rstrip(b"\r\n")):]  # "", LF, CR or CRLF (two would be a blank line)
                buf += term or b"\n\n"
                end = len(buf)
            else:
                self.truncated = True
        return self._emit(buf[:end])

    def _note(self, region: bytes) -> None:
        """Remember region for ``done`` if it holds an event with data."""
        if _has_data(region, 0, len(region)):
            self._tail = region

    def _feed_slow(self, data: bytes) -> bytes:
        if self.oversize or not data:
            return b""
        held = self._held
        if held:
            scan_from = len(held) - 2 if len(held) > 2 else 0
            held += data
            buf: bytes | bytearray = held
        else:
            buf, scan_from = data, 0
        end = max(_frame_start(buf, 0, len(buf), scan_from, False), self._scanned)
        if not self.started:
            if not _has_data(buf, self._scanned, end):
                # nothing goes out before the first event with data (the commit point); what is
                # held until then counts against max_event like one event
                if len(buf) > self.max_event:
                    self._overflow()
                elif buf is not held:
                    held += buf
                    self._scanned = end
                else:
                    self._scanned = end
                return b""
            self._scanned = 0  # _emit starts the stream
        if isinstance(buf, bytes):
            region = buf if end == len(buf) else buf[:end]  # (compiled, even a whole slice copies)
        else:
            region = bytes(buf[:end])
        if buf is held:
            del held[:end]
        elif end < len(buf):
            held += buf[end:]
        if len(held) > self.max_event:
            self._overflow()
        self._fast = not held and not self.oversize
        return self._emit(region)

    def _emit(self, region: bytes) -> bytes:
        """Complete frames on their way out: checked for size, transformed, remembered for ``done``."""
        if not region:
            return b""
        if len(region) > self.max_event:
            cut = _oversize_at(region, self.max_event)
            if cut >= 0:  # the frames before it still go out, once the stream has started
                self._overflow()
                if not self.started:
                    return b""
                region = region[:cut]
        if not self.started:
            if not _has_data(region, 0, len(region)):
                return b""
            self.started = True
        if self._mode != PASSTHROUGH and (last := region.rfind(NEEDLE)) >= 0:
            # the one-line LF fast lane needs no CR anywhere and no empty frame first (memchr, index)
            region = self._rewrite_region(region, region[0] != 10 and 13 not in region, last)
        region = _errors_fixed(region)
        self._note(region)
        return region

    def _overflow(self) -> None:
        self.oversize = True
        self._fast = False
        self._held = bytearray()  # give the memory back at once

    def _rewrite_region(self, region: bytes, lf_only: bool, last: int) -> bytes:
        """Rewrite the frames of region (complete frames only) that need it; ``last``: where the
        last needle is (the search for the next one stops there, not at the end of region)."""
        pieces: list[bytes] = []
        done = 0
        stop = last + len(NEEDLE)
        shape = None
        line = suffix = line_head = middle = tail = b""
        nl = ns = 0
        pos = region.find(NEEDLE, 0, stop)
        while pos >= 0:
            k = region.find(10, done) if lf_only else -1
            if shape is not self._shape:  # (learnt by _new_json)
                shape = self._shape
                if shape is not None:
                    line, suffix, line_head, tail = shape.line, shape.suffix, shape.line_head, shape.tail
                    middle, nl, ns = shape.middle, len(line), len(suffix)
            if k > pos and region[k + 1] == 10:
                # LF only, and the needle is in the one-line frame starting at done.
                end = k + 2
                # (compiled: startswith with an offset is a method call, ~650 instructions; these small
                # slices are compared, never sent)
                if shape is not None and region[done : done + nl] == line and region[k - ns : k] == suffix:
                    # a frame of the learnt shape (see _new_json): its value spliced in, if canonical
                    value = region[done + nl : k - ns]
                    if canonical_string(value):
                        pieces += (line_head, value, middle, value, tail) if middle else (line_head, value, tail)
                        self.rewritten += 1
                        done = end
                        pos = region.find(NEEDLE, end, stop)
                        continue
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
            pos = region.find(NEEDLE, end, stop)
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
        if payload.find(NEEDLE) < 0:
            return None
        new = self._new_json(payload)
        if new is None:
            return None
        out: list[bytes] = []
        first = True
        for content, term in lines:
            if _data_value(content) is None:
                if not content and term[0] == 10 and out and out[-1] == b"\r":
                    out[-1] = b"\r\n"  # the data lines between are gone: a lone CR would eat this LF
                out += (content, term)
            elif first:
                out += (b"data: ", new, term)
                first = False
        return b"".join(out)

    def _new_json(self, payload: bytes) -> bytes | None:
        """Rewritten JSON for a data payload holding the needle, None if unchanged."""
        shape = self._shape
        if shape is not None and payload.startswith(shape.lead) and payload.endswith(shape.suffix):
            # A chunk of the learnt shape: only its string value is new. Splicing that value in gives
            # the bytes orjson.dumps would give for the rewritten object, without a parse of the rest.
            value = payload[shape.at : len(payload) - len(shape.suffix)]
            if canonical_string(value):
                self.rewritten += 1
                return shape.splice(value)
        try:
            new = rewrite_json(payload, "delta", self._mode)
        except ValueError:  # incl. orjson.JSONDecodeError
            self.bad_frames += 1
            return None
        if new is not None:
            self.rewritten += 1
            self._shape = learn(payload, new, self._mode) or shape  # this chunk's shape, if it has one
        return new


def _errors_fixed(region: bytes) -> bytes:
    """region (complete frames) with its error events' codes made strings (_fix_errors), found by a
    needle scan: the one below where no CR ends a line (a memchr tells)."""
    if 13 in region:
        return region if _rfind(region, _ERROR) < 0 else _fix_errors(region)
    return _lf_errors_fixed(region)


def _lf_errors_fixed(region: bytes) -> bytes:
    """_errors_fixed of a region whose lines all end with LF: the LF before a line is part of the
    needle (rarer than its {: rfind's loop skips ahead more, ~0.13 against 0.20 ns a byte of
    vLLM-like frames), the first line is tested on its own."""
    if region.startswith(_ERROR_LINE) or _rfind(region, _ERROR_AFTER_LF) >= 0:
        return _fix_errors(region)
    return region


def _fix_errors(region: bytes) -> bytes:
    """region (complete frames) with each line that is exactly ``data: {"error"...`` and whose
    ``error.code`` is not a string re-serialised with a string code; every other byte kept."""
    pieces: list[bytes] = []
    done = 0
    pos = region.find(_ERROR)
    while pos >= 0:
        start = max(region.rfind(b"\n", 0, pos), region.rfind(b"\r", 0, pos)) + 1
        end = m.start() if (m := _EOL_RE.search(region, pos)) else len(region)
        fixed = _string_code(region[start + 6 : end]) if region.startswith(_ERROR_LINE, start) else None
        if fixed is not None:
            pieces += (region[done:start], b"data: ", fixed)
            done = end
        pos = region.find(_ERROR, end)
    if not pieces:
        return region
    pieces.append(region[done:])
    return b"".join(pieces)


def _string_code(value: bytes) -> bytes | None:
    """The error event with a string code, or None when it needs no change (or is not one)."""
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    err = doc.get("error") if type(doc) is dict else None
    if type(err) is not dict or type(err.get("code")) is str:
        return None
    code = err.get("code")
    err["code"] = str(code) if type(code) is int else "upstream_error"
    return orjson.dumps(doc)
