"""bench/compare.py's scenarios and its one measurement: a loadgen run against one target, with the
proxy's and the upstream's CPU time sampled at the window boundaries and the proxy's peak RSS."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from bench import loadgen
from bench.lgclient import Options
from bench.procs import cpu_seconds, peak_rss_mib, process_tree, reset_peak_rss, self_cpu_seconds
from bench.targets import MODEL, Target


@dataclass
class Scenario:
    name: str
    title: str
    phase: str  # "fast" (sim --itl 0) or "slow" (sim --itl 20)
    stream: bool
    concurrency: int
    max_tokens: int
    duration: float
    warmup: float
    ramp: float = 0.0


def scenarios_for(quick: bool) -> list[Scenario]:
    if quick:
        return [
            Scenario("S1", "non-streamed chat, c=8", "fast", False, 8, 64, 1.0, 0.3),
            Scenario("S2", "streamed chat, 256 tokens, no ITL, c=8", "fast", True, 8, 256, 1.0, 0.3),
            Scenario("S3@16", "streamed chat, 32 tokens, 20 ms ITL, c=16", "slow", True, 16, 32, 1.0, 0.7, 0.6),
        ]
    # S3: a stream lasts 128 x 20 ms = 2.6 s; workers start spread over that
    # time so requests do not all start in lock step, and the warm-up covers
    # the ramp plus one full stream.
    return [
        Scenario("S1", "non-streamed chat, 64 tokens, c=64", "fast", False, 64, 64, 4.0, 1.0),
        Scenario("S2", "streamed chat, 256 tokens, no ITL, c=32", "fast", True, 32, 256, 4.0, 1.0),
        Scenario("S3@256", "streamed chat, 128 tokens, 20 ms ITL, c=256", "slow", True, 256, 128, 5.0, 3.0, 2.6),
        Scenario("S3@1024", "streamed chat, 128 tokens, 20 ms ITL, c=1024", "slow", True, 1024, 128, 5.0, 3.0, 2.6),
    ]


def family(name: str) -> str:
    return name.split("@")[0]


def select(all_scs: list[Scenario], spec: str) -> list[Scenario]:
    want = [s.strip() for s in spec.split(",") if s.strip()]
    out = [sc for sc in all_scs if sc.name in want or family(sc.name) in want]
    unknown = [w for w in want if not any(sc.name == w or family(sc.name) == w for sc in all_scs)]
    if unknown or not out:
        raise SystemExit(f"unknown scenario(s) {unknown or want}; have: {', '.join(sc.name for sc in all_scs)}")
    return out


def measure(target: Target, sc: Scenario, rnd: int, timeout: float) -> dict[str, Any]:
    proxy_pids = process_tree(target.proxy.pid) if target.proxy else []
    up_pids = process_tree(target.upstream.pid)
    rss_reset = reset_peak_rss(proxy_pids) if proxy_pids else False
    marks: dict[str, tuple[float, float, float, float]] = {}

    def on_window(what: str) -> None:
        marks[what] = (time.perf_counter(), cpu_seconds(proxy_pids), cpu_seconds(up_pids), self_cpu_seconds())

    opts = Options(
        url=target.url,
        model=MODEL,
        concurrency=sc.concurrency,
        duration=sc.duration,
        stream=sc.stream,
        max_tokens=sc.max_tokens,
        warmup=sc.warmup,
        ramp=sc.ramp,
        timeout=timeout,
        quiet=True,
        on_window=on_window,
        cacert=target.cacert,
    )
    res = loadgen.run_sync(opts)
    s = res.summary()
    (t0, p0, u0, l0), (t1, p1, u1, l1) = marks["start"], marks["end"]
    wall = max(t1 - t0, 1e-9)
    m = _figures(s, res.error_samples(), sc, target.variant, rnd)
    m["upstream_cpu_pct"] = (u1 - u0) / wall * 100
    m["loadgen_cpu_pct"] = (l1 - l0) / wall * 100
    if target.proxy is not None:
        cpu = p1 - p0
        m["proxy_cpu_s"] = cpu
        m["proxy_cpu_pct"] = cpu / wall * 100
        m["proxy_cpu_us_per_request"] = cpu / s["window_completed"] * 1e6 if s["window_completed"] else None
        m["proxy_cpu_s_per_100k_frames"] = cpu / s["window_frames"] * 1e5 if s["window_frames"] else None
        m["proxy_cpu_us_per_frame"] = cpu / s["window_frames"] * 1e6 if s["window_frames"] else None
        m["proxy_peak_rss_mib"] = peak_rss_mib(proxy_pids)
        m["proxy_peak_rss_since_start"] = not rss_reset
    return m


def _figures(s: dict[str, Any], samples: dict[str, str], sc: Scenario, variant: str, rnd: int) -> dict[str, Any]:
    """The loadgen summary's figures as one flat row (milliseconds for times)."""
    return {
        "scenario": sc.name,
        "variant": variant,
        "round": rnd,
        "window_s": s["window_s"],
        "requests_per_s": s["requests_per_s"],
        "frames_per_s": s["frames_per_s"],
        "tokens_per_s": s["tokens_per_s"],
        "latency_p50_ms": _ms(s["latency"]["p50"]),
        "latency_p90_ms": _ms(s["latency"]["p90"]),
        "latency_p99_ms": _ms(s["latency"]["p99"]),
        "ttft_p50_ms": _ms(s["ttft"]["p50"]),
        "ttft_p90_ms": _ms(s["ttft"]["p90"]),
        "ttft_p99_ms": _ms(s["ttft"]["p99"]),
        "itl_p50_ms": _ms(s["itl"]["p50"]),
        "itl_p90_ms": _ms(s["itl"]["p90"]),
        "itl_p99_ms": _ms(s["itl"]["p99"]),
        "errors": s["errors_total"],
        "errors_by_kind": s["errors"],
        "error_samples": samples,
        "requests_ok_window": s["requests_ok_window"],
        "window_completed": s["window_completed"],
        "window_frames": s["window_frames"],
    }


def _ms(v: float | None) -> float | None:
    return None if v is None else v * 1000

