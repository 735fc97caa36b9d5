"""The load generator's SSE accounting (bench/loadgen.py): split reads into frames, tell token frames
from the rest without decoding JSON, time the gaps between tokens."""

from __future__ import annotations

import re
from collections.abc import Iterable

_TOKEN_KEYS = (
    (b'"content":"', 1),
    (b'"reasoning_content":"', 2),
    (b'"reasoning":"', 2),
    (b'"text":"', 1),
    (b'"arguments":"', 1),
)
# Fallback for servers that serialise JSON with spaces (json.dumps default).
_SPACED_TOKEN_RE = re.compile(rb'"(content|reasoning_content|reasoning|text|arguments)"\s*:\s*"(?!")')

CONTENT = 1
REASONING = 2


def classify_frame(frame: bytes) -> int:
    """0 if the SSE frame carries no token text, CONTENT or REASONING.

    Cheap substring search, no JSON decoding: a key followed by a non-empty
    string value.  ``"content":""`` (vLLM's first, role-only frame) and
    ``"content":null`` are not tokens.
    """
    for key, kind in _TOKEN_KEYS:
        i = frame.find(key)
        if i >= 0:
            c = frame[i + len(key) : i + len(key) + 1]
            if c and c != b'"':
                return kind
    if b'": ' in frame:
        m = _SPACED_TOKEN_RE.search(frame)
        if m:
            return REASONING if m.group(1).startswith(b"reasoning") else CONTENT
    return 0


def is_done_frame(frame: bytes) -> bool:
    """True for the ``data: [DONE]`` sentinel (tolerates missing space/whitespace)."""
    if frame == b"data: [DONE]":
        return True
    if len(frame) < 24 and frame.startswith(b"data:"):
        return frame[5:].strip() == b"[DONE]"
    return False


class StreamParser:
    """Incremental SSE accounting: feed(timestamp, bytes) per read, then finish().

    frames            data frames received, [DONE] excluded
    tokens            frames carrying content or reasoning text
    reasoning_tokens  the subset carrying reasoning text
    done              saw ``data: [DONE]``
    first_token       timestamp of the read that completed the first token frame
    gaps              list of gaps between consecutive token frames (seconds)
    error_frame       first frame carrying an error object (bytes, truncated)
    partial           the stream ended in the middle of a frame
    """

    __slots__ = (
        "buf",
        "done",
        "error_frame",
        "first_token",
        "frames",
        "frames_after_done",
        "gaps",
        "last_token",
        "partial",
        "reasoning_tokens",
        "start",
        "tokens",
    )

    def __init__(self, start: float = 0.0) -> None:
        self.start = start
        self.buf = b""
        self.frames = 0
        self.tokens = 0
        self.reasoning_tokens = 0
        self.done = False
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.gaps: list[float] = []
        self.error_frame: bytes | None = None
        self.frames_after_done = 0
        self.partial = False

    def feed(self, t: float, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
        if b"\r" in data:  # CRLF-framed SSE (e.g. sse-starlette)
            if data.endswith(b"\r"):
                self.buf = data
                return
            data = data.replace(b"\r\n", b"\n")
        if b"\n\n" not in data:
            self.buf = data
            return
        parts = data.split(b"\n\n")
        self.buf = parts.pop()
        for frame in parts:
            if not frame.startswith(b"data:"):
                # comment (": ping"), "event:"/"id:" lines, stray blank lines
                i = frame.find(b"\ndata:")
                if i < 0:
                    continue
                frame = frame[i + 1 :]
            if self.done:
                self.frames_after_done += 1
                continue
            if is_done_frame(frame):
                self.done = True
                continue
            self.frames += 1
            kind = classify_frame(frame)
            if kind:
                self.tokens += 1
                if kind == REASONING:
                    self.reasoning_tokens += 1
                if self.last_token is None:
                    self.first_token = t
                else:
                    self.gaps.append(t - self.last_token)
                self.last_token = t
            elif self.error_frame is None and b'"error"' in frame:
                self.error_frame = frame[:300]

    def finish(self) -> None:
        """Account for bytes left after the last blank line (end of stream)."""
        rest = self.buf.strip()
        self.buf = b""
        if not rest:
            return
        if not self.done and is_done_frame(rest):
            self.done = True  # "data: [DONE]" without the final blank line
        else:
            self.partial = True

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start


def analyze_reads(start: float, reads: Iterable[tuple[float, bytes]]) -> StreamParser:
    """Run a recorded list of (timestamp, bytes) reads through StreamParser."""
    p = StreamParser(start)
    for t, data in reads:
        p.feed(t, data)
    p.finish()
    return p


def stream_error_kind(p: StreamParser) -> str | None:
    """Error kind for a stream that completed at the HTTP level."""
    if p.error_frame is not None:
        return "stream_error"
    if not p.done:
        return "truncated"
    return None
