#!/usr/bin/env python3
"""Closed-loop load generator for OpenAI-compatible endpoints.

Point it at teraproxy, nginx, vLLM itself or anything else that speaks
``/v1/chat/completions`` or ``/v1/completions``::

    python bench/loadgen.py --url http://127.0.0.1:8080/v1 --model Qwen/Qwen3-8B \\
        --concurrency 64 --duration 10 --stream --max-tokens 256

``--concurrency`` workers each send one request after another (closed loop)
until ``--duration`` seconds have passed or ``--requests`` requests have been
sent, whichever comes first; at least one of the two is required.
``--max-tokens-range LO:HI`` gives each request a max_tokens drawn uniformly
from LO..HI (``--seed``, so a run's draws repeat): outputs of varied length,
as real traffic has, instead of every request asking for ``--max-tokens``.

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
(bench/compare.py uses it in-process).  The parts live in bench/lgclient.py
(Options, one request), bench/lgframes.py (SSE accounting), bench/lgstats.py
(percentiles, Record, Results) and bench/lgreport.py (summary, JSON, chart).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.lgclient import (  # noqa: E402
    DEFAULT_PROMPT,
    Counters,
    Options,
    discover_model,
    endpoint_url,
    one_request,
    request_body,
    request_headers,
)
from bench.lgreport import format_summary, write_json, write_plot  # noqa: E402
from bench.lgstats import Record, Results  # noqa: E402
from bench.procs import raise_nofile  # noqa: E402

Snap = tuple[int, int, int]  # requests completed, frames, tokens


class _Window:
    """The measurement window of a run: its start and end snapshots of the counters, progress lines."""

    def __init__(self, opts: Options, counters: Counters, t0: float) -> None:
        self.opts = opts
        self.counters = counters
        self.t0 = t0
        self.start = t0 + opts.warmup
        self.deadline = self.start + opts.duration if opts.duration is not None else math.inf
        self.snap_start: Snap | None = None
        self.snap_end: Snap | None = None
        self.start_t: float | None = None
        self.end_t: float | None = None
        self.next_progress = t0 + opts.progress_interval
        self.last_p = (t0, 0, 0)

    def _snap(self) -> Snap:
        return (self.counters.completed, self.counters.frames, self.counters.tokens)

    def _event(self, what: str) -> None:
        if self.opts.on_window is not None:
            self.opts.on_window(what)

    def open(self, now: float | None) -> None:
        """now: the loop's clock reading, or None to read the clock after the on_window callback."""
        self._event("start")
        self.snap_start, self.start_t = self._snap(), time.perf_counter() if now is None else now

    def close(self, now: float) -> None:
        self._event("end")
        self.snap_end, self.end_t = self._snap(), now

    def progress(self, now: float) -> None:
        c = self.counters
        if not self.opts.quiet:
            dt = now - self.last_p[0]
            print(
                f"[{now - self.t0:6.1f}s] done {c.completed:>7}"
                f" ({(c.completed - self.last_p[1]) / dt:8.1f}/s)"
                f" frames {c.frames:>9} ({(c.frames - self.last_p[2]) / dt:9.1f}/s)"
                f" in-flight {c.inflight:>5} errors {c.errors}"
                + ("" if self.snap_end is None else " (draining)"),
                file=sys.stderr,
                flush=True,
            )
        self.last_p = (now, c.completed, c.frames)
        self.next_progress = now + self.opts.progress_interval


async def _watch(w: _Window, all_done: asyncio.Future[Any], state: dict[str, Any]) -> None:
    """Until every worker is done: open and close the window on time, print progress."""
    clock = time.perf_counter
    if w.opts.warmup <= 0:
        w.open(None)
    while True:
        now = clock()
        targets = [w.next_progress]
        if w.snap_start is None:
            targets.append(w.start)
        if w.snap_end is None and w.deadline != math.inf:
            targets.append(w.deadline)
        wait = max(min(targets) - now, 0.0)
        done, _ = await asyncio.wait({all_done}, timeout=wait)
        now = clock()
        finished = bool(done)
        if w.snap_start is None and (now >= w.start or finished):
            w.open(now)
        if w.snap_end is None and (now >= w.deadline or finished):
            w.close(now)
            state["stop"] = True
        if now >= w.next_progress:
            w.progress(now)
        if finished:
            break
        if w.end_t is not None and now > w.end_t + w.opts.timeout + 5:
            break  # safety net: per-request timeouts should have fired


def _body_source(opts: Options, model: str) -> Callable[[], bytes]:
    """The next request's body: always the same, or with --max-tokens-range one with a max_tokens drawn
    from random.Random(opts.seed) (each length's body built once)."""
    if opts.max_tokens_range is None:
        body = request_body(opts, model)
        return lambda: body
    lo, hi = opts.max_tokens_range
    draw = random.Random(opts.seed).randint
    bodies: dict[int, bytes] = {}

    def next_body() -> bytes:
        n = draw(lo, hi)
        b = bodies.get(n)
        if b is None:
            b = bodies[n] = request_body(opts, model, n)
        return b

    return next_body


async def run(opts: Options) -> Results:
    """Run the load described by opts and return every figure."""
    opts.validate()
    raise_nofile(max(4096, opts.concurrency * 2 + 256))
    url = endpoint_url(opts.url, opts.endpoint)
    headers = request_headers(opts)
    counters = Counters()
    records: list[Record] = []
    tls: ssl.SSLContext | bool = ssl.create_default_context(cafile=opts.cacert) if opts.cacert else True
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ssl=tls)
    timeout = aiohttp.ClientTimeout(total=opts.timeout, sock_connect=min(opts.timeout, 30.0))
    clock = time.perf_counter
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        model = opts.model or await discover_model(session, opts)
        next_body = _body_source(opts, model)
        w = _Window(opts, counters, clock())
        state = {"issued": 0, "stop": False}
        limit = opts.requests

        def sink(rec: Record) -> None:
            rec.in_window = w.start <= rec.start < w.deadline
            records.append(rec)

        async def worker(i: int) -> None:
            if opts.ramp and opts.concurrency > 1:
                await asyncio.sleep(opts.ramp * i / opts.concurrency)
            while not state["stop"]:
                if limit is not None:
                    if state["issued"] >= limit:
                        return
                    state["issued"] += 1
                await one_request(session, url, next_body(), headers, opts.stream, counters, sink)

        tasks = [asyncio.ensure_future(worker(i)) for i in range(opts.concurrency)]
        all_done = asyncio.gather(*tasks)
        try:
            await _watch(w, all_done, state)
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
        assert w.snap_start is not None and w.snap_end is not None and w.start_t is not None and w.end_t is not None
        return Results(
            options=opts.public() | {"model": model},
            records=records,
            t0=w.t0,
            window_start=w.start_t,
            window_end=w.end_t,
            window_completed=w.snap_end[0] - w.snap_start[0],
            window_frames=w.snap_end[1] - w.snap_start[1],
            window_tokens=w.snap_end[2] - w.snap_start[2],
            elapsed=t_end - w.t0,
            url=url,
        )


def _token_range(v: str) -> tuple[int, int]:
    lo, sep, hi = v.partition(":")
    try:
        if sep:
            return int(lo), int(hi)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected LO:HI (two integers), got {v!r}")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Closed-loop load generator for OpenAI-compatible endpoints.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8080/v1")
    ap.add_argument("--model", help="model id (default: first of GET /models)")
    ap.add_argument("--key", help="API key, sent as Authorization: Bearer KEY")
    ap.add_argument("--cacert", help="PEM file of the CA to verify an https URL against (default: system store)")
    ap.add_argument("--concurrency", "-c", type=int, default=8, help="parallel requests (closed loop)")
    ap.add_argument("--duration", "-d", type=float, help="seconds to send requests for (after warm-up)")
    ap.add_argument("--requests", "-n", type=int, help="total requests to send")
    ap.add_argument("--stream", action="store_true", help="stream responses (SSE)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-tokens-range", metavar="LO:HI", type=_token_range,
                    help="each request's max_tokens drawn uniformly from LO..HI (instead of --max-tokens)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the --max-tokens-range draws")
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
    return ap


def parse_args(argv: Sequence[str] | None = None) -> tuple[Options, argparse.Namespace]:
    ap = _parser()
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
        max_tokens_range=a.max_tokens_range,
        seed=a.seed,
        prompt=prompt,
        endpoint=a.endpoint,
        warmup=a.warmup,
        ramp=a.ramp,
        timeout=a.timeout,
        include_usage=a.include_usage,
        ignore_eos=a.ignore_eos,
        extra=extra,
        quiet=a.quiet,
        cacert=a.cacert,
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
