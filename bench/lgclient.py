"""The load generator's client (bench/loadgen.py): its Options, the request body, model discovery and
one request from send to the last byte, with the error kind it ended in."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from bench.lgframes import StreamParser, stream_error_kind
from bench.lgstats import Record

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
    # (LO, HI): each request draws its max_tokens uniformly from LO..HI (inclusive) instead of max_tokens,
    # from random.Random(seed), so a run's sequence of draws repeats
    max_tokens_range: tuple[int, int] | None = None
    seed: int = 0
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
    cacert: str | None = None  # PEM file of the CA(s) an https URL is verified against (else the system store)
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
        if self.max_tokens_range is not None and not 1 <= self.max_tokens_range[0] <= self.max_tokens_range[1]:
            raise ValueError("--max-tokens-range LO:HI needs 1 <= LO <= HI")

    def public(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("on_window", "key", "prompt")}
        d["prompt_chars"] = len(self.prompt)
        d["key"] = bool(self.key)
        return d


class Counters:
    """Running totals of a run, shared by every worker (progress lines and the window snapshots)."""

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


def request_body(opts: Options, model: str, max_tokens: int | None = None) -> bytes:
    """max_tokens: this request's, when not opts.max_tokens (a draw from opts.max_tokens_range)."""
    body: dict[str, Any] = {"model": model, "max_tokens": opts.max_tokens if max_tokens is None else max_tokens}
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


def request_headers(opts: Options) -> dict[str, str]:
    h = {"Content-Type": "application/json"}
    if opts.key:
        h["Authorization"] = f"Bearer {opts.key}"
    return h


async def discover_model(session: aiohttp.ClientSession, opts: Options) -> str:
    base = opts.url.rstrip("/")
    for suffix in ("/chat/completions", "/completions"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    async with session.get(base + "/models", headers=request_headers(opts)) as resp:
        resp.raise_for_status()
        data = orjson.loads(await resp.read())
    models = data.get("data") or []
    if not models:
        raise RuntimeError(f"{base}/models lists no model; pass --model")
    return str(models[0]["id"])


async def _read_stream(resp: aiohttp.ClientResponse, rec: Record, counters: Counters) -> None:
    clock = time.perf_counter
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


async def _read_body(resp: aiohttp.ClientResponse, rec: Record, counters: Counters) -> None:
    data = await resp.read()
    rec.end = time.perf_counter()
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


async def one_request(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    stream: bool,
    counters: Counters,
    sink: Callable[[Record], None],
) -> None:
    """One request; its Record goes to sink when it starts and is filled in as it runs."""
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
                await _read_stream(resp, rec, counters)
            else:
                await _read_body(resp, rec, counters)
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
