#!/usr/bin/env python3
"""Closed-loop load generator for OpenAI-compatible endpoints.

Point it at teraproxy, nginx, vLLM itself or anything else that speaks
``/v1/chat/completions`` or ``/v1/completions``::

    python bench/loadgen.py --url http://127.0.0.1:8080/v1 --model Qwen/Qwen3-8B \\
        --concurrency 64 --duration 10 --stream --max-tokens 256

``--concurrency`` workers each send one request after another (closed loop)
until ``--duration`` seconds have passed or ``--requests`` requests have been
sent, whichever comes first; at least one of the two is required.

Measurement window: requests started during the first ``--warmup`` seconds
still run but are left out of the latency figures, and throughput
(requests/s, frames/s, tokens/s) is the number of requests completed and
frames received between the end of the warm-up and the deadline (or the end
of the last request), divided by that time.  Requests still running at the
deadline are allowed to finish (up to ``--timeout``); only those started in
the window count in the latency figures.

Per request it records the HTTP status, an error kind, the time to the first
token (first SSE frame carrying content or reasoning text; for a non-streamed
request, the full latency), every gap between two token frames, the number of
data frames, token frames (content / reasoning), whether the stream ended
with ``data: [DONE]`` and the total latency.

SSE is parsed cheaply since the load generator usually shares a core with the
upstream: reads are split on ``\\n\\n``, frames are never JSON-decoded; a frame
is a token if it has a non-empty ``"content":"``, ``"text":"``,
``"reasoning":"``, ``"reasoning_content":"`` or ``"arguments":"`` string.
Frames that arrive in one read get the same timestamp (a gap of 0).

``async def run(opts) -> Results`` is the programmatic entry point
(bench/compare.py uses it in-process).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import resource
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

DEFAULT_PROMPT = (
    "You are a helpful assistant. Explain in a few short paragraphs why the sky is blue and why sunsets are red."
)

ERROR_KINDS = (
    "connect",  # could not connect
    "timeout",  # per-request timeout hit
    "http_status",  # status other than 200
    "truncated",  # stream ended (cleanly) without data: [DONE]
    "disconnected",  # connection lost / malformed body mid-response
    "stream_error",  # an error object inside the stream
    "bad_body",  # non-streamed body is not a completion
    "cancelled",  # still running when the run was torn down
    "other",
)

# --------------------------------------------------------------------------
# Pure statistics helpers (unit-tested in tests/test_loadgen.py)
# --------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float, *, presorted: bool = False) -> float | None:
    """Percentile with linear interpolation between closest ranks.

    Same as numpy's default ("linear") method: rank = p/100 * (n-1).
    Returns None for an empty sequence.
    """
    if not 0 <= p <= 100:
        raise ValueError(f"percentile out of range: {p}")
    n = len(values)
    if n == 0:
        return None
    s = values if presorted else sorted(values)
    if n == 1:
        return float(s[0])
    rank = (p / 100.0) * (n - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, n - 1)
    frac = rank - lo
    return float(s[lo] + (s[hi] - s[lo]) * frac)


def percentiles(values: Iterable[float], ps: Sequence[float] = (50, 90, 99)) -> dict[str, float | None]:
    """{"p50": .., "p90": .., "p99": ..} (None when there are no values)."""
    s = sorted(values)
    return {f"p{p:g}": percentile(s, p, presorted=True) for p in ps}


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


# --------------------------------------------------------------------------
# Records and results
# --------------------------------------------------------------------------


class Record:
    """Figures of one request (times in seconds, perf_counter clock)."""

    __slots__ = (
        "detail",
        "done",
        "end",
        "error",
        "frames",
        "gaps",
        "in_window",
        "reasoning_tokens",
        "start",
        "status",
        "tokens",
        "ttft",
    )

    def __init__(self, start: float) -> None:
        self.start = start
        self.end: float | None = None
        self.status: int | None = None
        self.error: str | None = None
        self.ttft: float | None = None
        self.frames = 0
        self.tokens = 0
        self.reasoning_tokens = 0
        self.done: bool | None = None
        self.gaps: list[float] = []
        self.in_window = False
        self.detail: str | None = None

    @property
    def latency(self) -> float | None:
        return None if self.end is None else self.end - self.start

    def to_dict(self, t0: float = 0.0) -> dict[str, Any]:
        return {
            "start": self.start - t0,
            "latency": self.latency,
            "status": self.status,
            "error": self.error,
            "ttft": self.ttft,
            "frames": self.frames,
            "tokens": self.tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "done": self.done,
            "in_window": self.in_window,
            "gaps": self.gaps,
        }


@dataclass
class Options:
    url: str = "http://127.0.0.1:8080/v1"
    model: str | None = None
    key: str | None = None
    concurrency: int = 8
    duration: float | None = None
    requests: int | None = None
    stream: bool = False
    max_tokens: int = 128
    prompt: str = DEFAULT_PROMPT
    endpoint: str = "chat"
    warmup: float = 0.0
    ramp: float = 0.0
    timeout: float = 300.0
    include_usage: bool = False
    ignore_eos: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    quiet: bool = False
    progress_interval: float = 1.0
    # Called (synchronously) with "start" / "end" at the measurement window
    # boundaries; compare.py samples proxy CPU time there.
    on_window: Callable[[str], None] | None = None

    def validate(self) -> None:
        if self.concurrency < 1:
            raise ValueError("--concurrency must be >= 1")
        if self.duration is None and self.requests is None:
            raise ValueError("refusing to run unbounded: give --duration and/or --requests")
        if self.duration is not None and not self.duration > 0:
            raise ValueError("--duration must be > 0")
        if self.requests is not None and self.requests < 1:
            raise ValueError("--requests must be >= 1")
        if self.endpoint not in ("chat", "completions"):
            raise ValueError("--endpoint must be chat or completions")
        if not self.timeout > 0 or math.isinf(self.timeout):
            raise ValueError("--timeout must be a positive number of seconds")
        if self.warmup < 0 or self.ramp < 0:
            raise ValueError("--warmup/--ramp must be >= 0")

    def public(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("on_window", "key", "prompt")}
        d["prompt_chars"] = len(self.prompt)
        d["key"] = bool(self.key)
        return d


@dataclass
class Results:
    options: dict[str, Any]
    records: list[Record]
    t0: float
    window_start: float
    window_end: float
    window_completed: int  # requests completed OK inside the window
    window_frames: int  # data frames received inside the window
    window_tokens: int
    elapsed: float  # whole run, warm-up and drain included
    url: str = ""

    @property
    def window_s(self) -> float:
        return max(self.window_end - self.window_start, 0.0)

    def window_records(self) -> list[Record]:
        return [r for r in self.records if r.in_window]

    def errors(self) -> dict[str, int]:
        """Errors by kind over the whole run (warm-up included)."""
        out: dict[str, int] = {}
        for r in self.records:
            if r.error:
                out[r.error] = out.get(r.error, 0) + 1
        return out

    def error_samples(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for r in self.records:
            if r.error and r.error not in out and r.detail:
                out[r.error] = r.detail
        return out

    def summary(self) -> dict[str, Any]:
        """Every figure of the run as a flat-ish dict (seconds for times)."""
        win = self.window_records()
        ok = [r for r in win if not r.error and r.end is not None]
        w = self.window_s
        gaps: list[float] = []
        for r in ok:
            gaps.extend(r.gaps)
        errors = self.errors()
        return {
            "requests_total": len(self.records),
            "requests_window": len(win),
            "requests_ok_window": len(ok),
            "errors_total": sum(errors.values()),
            "errors": errors,
            "window_s": w,
            "elapsed_s": self.elapsed,
            "requests_per_s": self.window_completed / w if w > 0 else None,
            "frames_per_s": self.window_frames / w if w > 0 else None,
            "tokens_per_s": self.window_tokens / w if w > 0 else None,
            "window_completed": self.window_completed,
            "window_frames": self.window_frames,
            "window_tokens": self.window_tokens,
            "frames": sum(r.frames for r in ok),
            "tokens": sum(r.tokens for r in ok),
            "reasoning_tokens": sum(r.reasoning_tokens for r in ok),
            "not_done": sum(1 for r in ok if r.done is False),
            "latency": percentiles(r.end - r.start for r in ok),  # type: ignore[operator]
            "ttft": percentiles(r.ttft for r in ok if r.ttft is not None),
            "itl": percentiles(gaps),
            "itl_count": len(gaps),
        }


# --------------------------------------------------------------------------
# The load generator
# --------------------------------------------------------------------------


class _Counters:
    __slots__ = ("completed", "errors", "frames", "inflight", "tokens")

    def __init__(self) -> None:
        self.completed = 0
        self.frames = 0
        self.tokens = 0
        self.errors = 0
        self.inflight = 0


def endpoint_url(base: str, endpoint: str) -> str:
    base = base.rstrip("/")
    if base.endswith("/chat/completions") or base.endswith("/completions"):
        return base
    return base + ("/chat/completions" if endpoint == "chat" else "/completions")


def request_body(opts: Options, model: str) -> bytes:
    body: dict[str, Any] = {"model": model, "max_tokens": opts.max_tokens}
    if opts.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": opts.prompt}]
    else:
        body["prompt"] = opts.prompt
    if opts.stream:
        body["stream"] = True
        if opts.include_usage:
            body["stream_options"] = {"include_usage": True}
    if opts.ignore_eos:
        body["ignore_eos"] = True
    body.update(opts.extra)
    return orjson.dumps(body)


def _headers(opts: Options) -> dict[str, str]:
    h = {"Content-Type": "application/json"}
    if opts.key:
        h["Authorization"] = f"Bearer {opts.key}"
    return h


async def _discover_model(session: aiohttp.ClientSession, opts: Options) -> str:
    base = opts.url.rstrip("/")
    for suffix in ("/chat/completions", "/completions"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    async with session.get(base + "/models", headers=_headers(opts)) as resp:
        resp.raise_for_status()
        data = orjson.loads(await resp.read())
    models = data.get("data") or []
    if not models:
        raise RuntimeError(f"{base}/models lists no model; pass --model")
    return str(models[0]["id"])


async def _one_request(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    stream: bool,
    counters: _Counters,
    sink: Callable[[Record], None],
) -> None:
    clock = time.perf_counter
    rec = Record(clock())
    sink(rec)
    counters.inflight += 1
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            rec.status = resp.status
            if resp.status != 200:
                text = await resp.read()
                rec.end = clock()
                rec.error = "http_status"
                rec.detail = f"{resp.status} {text[:200]!r}"
            elif stream:
                p = StreamParser(rec.start)
                content = resp.content
                while True:
                    data = await content.readany()
                    if not data:
                        break
                    f0, k0 = p.frames, p.tokens
                    p.feed(clock(), data)
                    counters.frames += p.frames - f0
                    counters.tokens += p.tokens - k0
                p.finish()
                rec.end = clock()
                rec.frames = p.frames
                rec.tokens = p.tokens
                rec.reasoning_tokens = p.reasoning_tokens
                rec.done = p.done
                rec.gaps = p.gaps
                rec.ttft = p.ttft
                rec.error = stream_error_kind(p)
                if rec.error == "stream_error":
                    rec.detail = repr(p.error_frame)
                elif rec.error == "truncated":
                    rec.detail = f"no [DONE] after {p.frames} frames"
            else:
                data = await resp.read()
                rec.end = clock()
                rec.ttft = rec.end - rec.start
                try:
                    doc = orjson.loads(data)
                    if not doc.get("choices"):
                        raise ValueError("no choices")
                    usage = doc.get("usage") or {}
                    rec.tokens = int(usage.get("completion_tokens") or 0)
                    counters.tokens += rec.tokens
                except (ValueError, TypeError, AttributeError):
                    rec.error = "bad_body"
                    rec.detail = repr(data[:200])
    except asyncio.CancelledError:
        rec.error, rec.detail = "cancelled", "still running when the run ended"
        rec.end = clock()
        counters.inflight -= 1
        counters.errors += 1
        raise
    except aiohttp.ClientConnectorError as e:
        rec.error, rec.detail = "connect", str(e)
    except (TimeoutError, aiohttp.ServerTimeoutError) as e:
        rec.error, rec.detail = "timeout", repr(e)
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
        rec.error, rec.detail = "disconnected", repr(e)
    except Exception as e:
        rec.error, rec.detail = "other", repr(e)
    if rec.end is None:
        rec.end = clock()
    counters.inflight -= 1
    if rec.error:
        counters.errors += 1
    else:
        counters.completed += 1


def _raise_nofile(n: int) -> None:
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = n if hard == resource.RLIM_INFINITY else min(n, hard)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        pass


async def run(opts: Options) -> Results:
    """Run the load described by opts and return every figure."""
    opts.validate()
    _raise_nofile(max(4096, opts.concurrency * 2 + 256))
    url = endpoint_url(opts.url, opts.endpoint)
    headers = _headers(opts)
    counters = _Counters()
    records: list[Record] = []
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=opts.timeout, sock_connect=min(opts.timeout, 30.0))
    clock = time.perf_counter
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        model = opts.model or await _discover_model(session, opts)
        body = request_body(opts, model)

        t0 = clock()
        window_start = t0 + opts.warmup
        deadline = window_start + opts.duration if opts.duration is not None else math.inf
        state = {"issued": 0, "stop": False}
        limit = opts.requests

        def sink(rec: Record) -> None:
            rec.in_window = window_start <= rec.start < deadline
            records.append(rec)

        async def worker(i: int) -> None:
            if opts.ramp and opts.concurrency > 1:
                await asyncio.sleep(opts.ramp * i / opts.concurrency)
            while not state["stop"]:
                if limit is not None:
                    if state["issued"] >= limit:
                        return
                    state["issued"] += 1
                await _one_request(session, url, body, headers, opts.stream, counters, sink)

        tasks = [asyncio.ensure_future(worker(i)) for i in range(opts.concurrency)]
        all_done = asyncio.gather(*tasks)
        snap_start: tuple[int, int, int] | None = None
        snap_end: tuple[int, int, int] | None = None
        w_start_t = w_end_t = None

        def snap() -> tuple[int, int, int]:
            return (counters.completed, counters.frames, counters.tokens)

        def window_event(what: str) -> None:
            if opts.on_window is not None:
                opts.on_window(what)

        next_progress = t0 + opts.progress_interval
        last_p = (t0, 0, 0)
        try:
            if opts.warmup <= 0:
                window_event("start")
                snap_start, w_start_t = snap(), clock()
            while True:
                now = clock()
                targets = [next_progress]
                if snap_start is None:
                    targets.append(window_start)
                if snap_end is None and deadline != math.inf:
                    targets.append(deadline)
                wait = max(min(targets) - now, 0.0)
                done, _ = await asyncio.wait({all_done}, timeout=wait)
                now = clock()
                finished = bool(done)
                if snap_start is None and (now >= window_start or finished):
                    window_event("start")
                    snap_start, w_start_t = snap(), now
                if snap_end is None and (now >= deadline or finished):
                    window_event("end")
                    snap_end, w_end_t = snap(), now
                    state["stop"] = True
                if now >= next_progress:
                    if not opts.quiet:
                        dt = now - last_p[0]
                        print(
                            f"[{now - t0:6.1f}s] done {counters.completed:>7}"
                            f" ({(counters.completed - last_p[1]) / dt:8.1f}/s)"
                            f" frames {counters.frames:>9} ({(counters.frames - last_p[2]) / dt:9.1f}/s)"
                            f" in-flight {counters.inflight:>5} errors {counters.errors}"
                            + ("" if snap_end is None else " (draining)"),
                            file=sys.stderr,
                            flush=True,
                        )
                    last_p = (now, counters.completed, counters.frames)
                    next_progress = now + opts.progress_interval
                if finished:
                    break
                if snap_end is not None and now > w_end_t + opts.timeout + 5:  # type: ignore[operator]
                    break  # safety net: per-request timeouts should have fired
        finally:
            state["stop"] = True
            for t in tasks:
                if not t.done():
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            exc = all_done.exception() if all_done.done() and not all_done.cancelled() else None
        t_end = clock()
        if exc is not None and not isinstance(exc, asyncio.CancelledError):
            raise exc  # a bug in a worker, not a request failure
        assert snap_start is not None and snap_end is not None and w_start_t is not None and w_end_t is not None
        return Results(
            options=opts.public() | {"model": model},
            records=records,
            t0=t0,
            window_start=w_start_t,
            window_end=w_end_t,
            window_completed=snap_end[0] - snap_start[0],
            window_frames=snap_end[1] - snap_start[1],
            window_tokens=snap_end[2] - snap_start[2],
            elapsed=t_end - t0,
            url=url,
        )


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.2f}"


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


def format_summary(res: Results) -> str:
    s = res.summary()
    o = res.options
    lines = [
        f"target      {res.url}  model={o.get('model')}  "
        f"{'stream' if o.get('stream') else 'non-stream'}  concurrency={o.get('concurrency')}  "
        f"max_tokens={o.get('max_tokens')}",
        f"window      {s['window_s']:.2f}s (run {s['elapsed_s']:.2f}s, warm-up {o.get('warmup')}s)",
        f"requests    {s['requests_ok_window']} ok in window, {s['requests_total']} sent in all",
        f"requests/s  {_rate(s['requests_per_s'])}",
        f"tokens/s    {_rate(s['tokens_per_s'])}   (frames/s {_rate(s['frames_per_s'])})",
        f"tokens      {s['tokens']} ({s['reasoning_tokens']} reasoning) in {s['frames']} data frames; "
        f"{s['not_done']} streams without [DONE]",
        "",
        f"{'ms':<14}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for name, key in (("latency", "latency"), ("TTFT", "ttft"), ("inter-token", "itl")):
        d = s[key]
        lines.append(f"{name:<14}{_ms(d['p50']):>10}{_ms(d['p90']):>10}{_ms(d['p99']):>10}")
    lines.append("")
    if s["errors"]:
        samples = res.error_samples()
        lines.append(f"errors      {s['errors_total']} (whole run)")
        for kind, n in sorted(s["errors"].items(), key=lambda kv: -kv[1]):
            sample = samples.get(kind, "")
            lines.append(f"  {kind:<14}{n:>8}  {sample[:100]}")
    else:
        lines.append("errors      0")
    return "\n".join(lines)


def write_json(res: Results, path: str) -> None:
    doc = {
        "url": res.url,
        "options": res.options,
        "summary": res.summary(),
        "requests": [r.to_dict(res.t0) for r in res.records],
    }
    with open(path, "wb") as f:
        f.write(orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY))


def write_plot(res: Results, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError(f"--plot needs matplotlib ({e}); pip install matplotlib") from e
    ok = [r for r in res.window_records() if not r.error]
    series = {
        "latency (ms)": sorted(r.latency * 1000 for r in ok if r.latency is not None),
        "TTFT (ms)": sorted(r.ttft * 1000 for r in ok if r.ttft is not None),
        "inter-token gap (ms)": sorted(g * 1000 for r in ok for g in r.gaps),
    }
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (name, vals) in zip(list(axes.flat)[:3], series.items(), strict=True):
        if vals:
            n = len(vals)
            ax.plot(vals, [(i + 1) / n for i in range(n)])
            hi = percentile(vals, 99.5, presorted=True) or 0.0
            if hi > vals[0]:
                ax.set_xlim(vals[0] - (hi - vals[0]) * 0.05, hi * 1.1)
        ax.set_xlabel(name)
        ax.set_ylabel("fraction")
        ax.set_title(f"CDF of {name}")
        ax.grid(alpha=0.3)
    ax = axes.flat[3]
    ends = sorted(r.end - res.t0 for r in res.records if r.end is not None and not r.error)
    if ends:
        width = max(0.1, ends[-1] / 40)
        nb = max(1, math.ceil(ends[-1] / width))
        ax.hist(ends, bins=nb, range=(0, nb * width), weights=[1 / width] * len(ends))
    ax.axvline(res.window_start - res.t0, color="green", ls="--", label="window")
    ax.axvline(res.window_end - res.t0, color="green", ls="--")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("requests completed per second")
    ax.set_title("throughput")
    ax.legend()
    fig.suptitle(f"{res.url} c={res.options.get('concurrency')} stream={res.options.get('stream')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Options, argparse.Namespace]:
    ap = argparse.ArgumentParser(
        description="Closed-loop load generator for OpenAI-compatible endpoints.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8080/v1")
    ap.add_argument("--model", help="model id (default: first of GET /models)")
    ap.add_argument("--key", help="API key, sent as Authorization: Bearer KEY")
    ap.add_argument("--concurrency", "-c", type=int, default=8, help="parallel requests (closed loop)")
    ap.add_argument("--duration", "-d", type=float, help="seconds to send requests for (after warm-up)")
    ap.add_argument("--requests", "-n", type=int, help="total requests to send")
    ap.add_argument("--stream", action="store_true", help="stream responses (SSE)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-file", help="text file whose content is the prompt")
    ap.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    ap.add_argument("--warmup", type=float, default=0.0, help="seconds at the start left out of the figures")
    ap.add_argument("--ramp", type=float, default=0.0, help="spread worker starts over this many seconds")
    ap.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, seconds")
    ap.add_argument("--include-usage", action="store_true", help="ask for stream_options.include_usage")
    ap.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (vLLM) to always get max-tokens")
    ap.add_argument("--extra", help="JSON object merged into every request body")
    ap.add_argument("--json", metavar="OUT", help="write per-request figures as JSON")
    ap.add_argument("--plot", metavar="OUT.png", help="write a PNG chart (needs matplotlib)")
    ap.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    a = ap.parse_args(argv)
    prompt = DEFAULT_PROMPT
    if a.prompt_file:
        with open(a.prompt_file, encoding="utf-8") as f:
            prompt = f.read()
    extra: dict[str, Any] = {}
    if a.extra:
        extra = orjson.loads(a.extra)
        if not isinstance(extra, dict):
            ap.error("--extra must be a JSON object")
    opts = Options(
        url=a.url,
        model=a.model,
        key=a.key,
        concurrency=a.concurrency,
        duration=a.duration,
        requests=a.requests,
        stream=a.stream,
        max_tokens=a.max_tokens,
        prompt=prompt,
        endpoint=a.endpoint,
        warmup=a.warmup,
        ramp=a.ramp,
        timeout=a.timeout,
        include_usage=a.include_usage,
        ignore_eos=a.ignore_eos,
        extra=extra,
        quiet=a.quiet,
    )
    try:
        opts.validate()
    except ValueError as e:
        ap.error(str(e))
    return opts, a


def run_sync(opts: Options) -> Results:
    """run(opts) on a fresh event loop (uvloop when installed)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run(opts))
    return uvloop.run(run(opts))


def main(argv: Sequence[str] | None = None) -> int:
    opts, a = parse_args(argv)
    if a.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("loadgen: --plot needs matplotlib: pip install matplotlib", file=sys.stderr)
            return 2
    try:
        res = run_sync(opts)
    except KeyboardInterrupt:
        return 130
    except (aiohttp.ClientError, RuntimeError, OSError) as e:
        print(f"loadgen: {e}", file=sys.stderr)
        return 1
    print(format_summary(res))
    if a.json:
        write_json(res, a.json)
    if a.plot:
        write_plot(res, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
