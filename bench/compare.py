#!/usr/bin/env python3
"""teraproxy vs nginx vs direct, on one 2-core machine.

    python bench/compare.py [--quick] [--rounds N] [--scenarios S1,S2,S3] [--out DIR]

Starts `teraproxy sim` upstreams, nginx (bench/nginx.conf) and two teraproxy
processes, each from a generated config in a temporary run directory, and
measures the same scenarios five ways, in interleaved rounds:

  direct        the load generator talks to the sim (no reasoning fields)
  nginx         through nginx, to that sim
  teraproxy     through teraproxy, reasoning emit passthrough, to that sim
  direct_rc     to a second sim that streams `reasoning_content` (baseline
                of the next variant)
  teraproxy_rw  through teraproxy with reasoning emit both: every reasoning
                frame of that sim is rewritten

The proxies run on CPU 1, the sims and the in-process load generator
(bench/loadgen.py) on CPU 0.  Proxy CPU time (utime+stime of the process and
its children, /proc/PID/stat) is sampled at the boundaries of each
measurement window; peak RSS is VmHWM from /proc/PID/status, reset before each
measurement (/proc/PID/clear_refs) where the kernel allows.  Each figure is
the median over the rounds; "added" figures are, per round, the variant's
figure minus its direct baseline's, then the median.

Scenarios (default / --quick):
  S1        non-streamed chat, 64 tokens, concurrency 64 / 8
  S2        streamed chat, 256 tokens, no delay between tokens, concurrency 32 / 8
  S3@256    streamed chat, 128 tokens 20 ms apart, concurrency 256 / -
  S3@1024   same, concurrency 1024 / -
  S3@16     (--quick only) 32 tokens 20 ms apart, concurrency 16

Writes compare-<time>.json (every measurement and the medians), .md (the
table) and .png (needs matplotlib) under bench/results/ or --out.

This file is the command line and the run loop; the parts live in
bench/procs.py (processes, pinning, /proc readers), bench/targets.py (sims,
nginx, teraproxy configs), bench/measure.py (scenarios, one measurement) and
bench/report.py (medians, table, chart).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.measure import Scenario, measure, scenarios_for, select  # noqa: E402
from bench.procs import Procs, raise_nofile  # noqa: E402
from bench.report import aggregate, fmt, markdown_table, write_chart  # noqa: E402
from bench.targets import LABEL, PHASES, VARIANTS, ensure_nginx, nginx_version, start_phase  # noqa: E402
from teraproxy import build  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Benchmark teraproxy against nginx and direct access (2 cores).")
    ap.add_argument("--quick", action="store_true", help="~1 s per scenario, small concurrency, one round (smoke test)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 3; 1 with --quick)")
    ap.add_argument("--scenarios", default="S1,S2,S3", help="comma list of S1,S2,S3 (or S3@256, S3@1024)")
    ap.add_argument("--out", help="output directory (default bench/results/)")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get install nginx when it is missing")
    ap.add_argument(
        "--access-log",
        choices=("on", "off"),
        default="on",
        help="access logs of both proxies (nginx: a file in the run dir; teraproxy: its log)",
    )
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    ap.add_argument("--keep-run-dir", action="store_true", help="keep configs and logs of the run")
    a = ap.parse_args(argv)
    if a.rounds is None:
        a.rounds = 1 if a.quick else 3
    if not 1 <= a.rounds <= 20:
        ap.error("--rounds must be 1..20")
    return a


def _on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _progress(rnd: int, rounds: int, sc: Scenario, v: str, m: dict[str, Any], took: float) -> None:
    print(
        f"   round {rnd + 1}/{rounds} {sc.name:<8} {v:<13} "
        f"req/s {fmt(m['requests_per_s']):>8} frames/s {fmt(m['frames_per_s']):>8} "
        f"p50 {fmt(m['latency_p50_ms']):>7} ms ttft99 {fmt(m['ttft_p99_ms']):>7} "
        f"itl99 {fmt(m['itl_p99_ms']):>6} err {m['errors']} "
        f"cpu {fmt(m.get('proxy_cpu_pct'))}% ({took:.1f}s)",
        file=sys.stderr,
        flush=True,
    )


def run_phases(a: argparse.Namespace, scs: list[Scenario], procs: Procs, nginx: str | None,
               measurements: list[dict[str, Any]]) -> None:
    """Each phase's processes, then its scenarios in interleaved rounds (the variant order rotates)."""
    timeout = 30.0 if a.quick else 120.0
    for phase in ("fast", "slow"):
        phase_scs = [sc for sc in scs if sc.phase == phase]
        if not phase_scs:
            continue
        print(f"== phase {phase}: sim --itl {PHASES[phase]['itl']}: starting processes", file=sys.stderr, flush=True)
        targets = start_phase(procs, procs.run_dir, phase, nginx, a.access_log == "on")
        variants = [v for v in VARIANTS if v in targets]
        for rnd in range(a.rounds):
            order = variants[rnd % len(variants) :] + variants[: rnd % len(variants)]
            for sc in phase_scs:
                for v in order:
                    t0 = time.monotonic()
                    m = measure(targets[v], sc, rnd, timeout)
                    measurements.append(m)
                    _progress(rnd, a.rounds, sc, v, m, time.monotonic() - t0)
        for name, p in list(procs.procs):
            if p.poll() is not None:
                raise RuntimeError(f"{name} died during the run:\n{procs.log_tail(name)}")
        procs.stop_all()


def write_results(out_dir: Path, meta: dict[str, Any], scs: list[Scenario], measurements: list[dict[str, Any]],
                  have_nginx: bool) -> None:
    """compare-<time>.json, .md and .png under out_dir; prints the table and the paths."""
    medians = aggregate(measurements, [sc.name for sc in scs])
    table = markdown_table(medians, scs, meta["rounds"], have_nginx)
    stamp = meta["time"]
    doc = {
        "meta": meta,
        "scenarios": [asdict(sc) for sc in scs],
        "phases": PHASES,
        "variants": {v: LABEL[v] for v in VARIANTS},
        "medians": medians,
        "measurements": measurements,
    }
    json_path = out_dir / f"compare-{stamp}.json"
    json_path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    (out_dir / f"compare-{stamp}.md").write_text(table + "\n")
    png = out_dir / f"compare-{stamp}.png"
    chart = write_chart(png, medians, measurements, scs) if measurements else False
    print(table)
    print()
    print(f"raw results: {json_path}")
    if chart:
        print(f"chart:       {png}")
    print(f"took {meta['elapsed_s']:.0f}s")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    scs = select(scenarios_for(a.quick), a.scenarios)
    out_dir = Path(a.out) if a.out else REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    nofile = raise_nofile()
    pin = not a.no_pin and (os.cpu_count() or 1) >= 2
    if pin:
        os.sched_setaffinity(0, {0})  # the in-process load generator shares core 0 with the sims
    nginx = ensure_nginx(install=not a.no_install)

    run_dir = Path(tempfile.mkdtemp(prefix="teraproxy-compare-"))
    procs = Procs(run_dir, pin)
    measurements: list[dict[str, Any]] = []
    started = time.monotonic()
    failed: str | None = None
    try:
        run_phases(a, scs, procs, nginx, measurements)
    except (RuntimeError, OSError) as e:
        failed = str(e)
        print(f"compare: {e}", file=sys.stderr)
    finally:
        procs.stop_all()
        if a.keep_run_dir or failed:
            print(f"run dir kept: {run_dir}", file=sys.stderr)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)

    meta = {
        "time": time.strftime("%Y%m%d-%H%M%S"),
        "elapsed_s": time.monotonic() - started,
        "quick": a.quick,
        "rounds": a.rounds,
        "pinned": pin,
        "cpus": os.cpu_count(),
        "nofile": nofile,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "nginx": nginx_version(nginx) if nginx else None,
        "teraproxy_build": build(),  # compiled (mypyc) or interpreted
        "access_log": a.access_log == "on",
        "failed": failed,
    }
    write_results(out_dir, meta, scs, measurements, nginx is not None)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
