#!/usr/bin/env python3
"""Non-streamed chat through nginx and teraproxy with wrk as the client: a second judge beside
bench/compare.py's Python load generator (wrk costs far less CPU per request, so the upstream and
the client share core 0 with room to spare).

    python bench/wrk_bench.py [--duration 5] [--connections 64] [--rounds 1] [--variants nginx,teraproxy,teraproxy_rw]

Processes come from bench/compare.py's machinery (same sims, nginx.conf, teraproxy configs and
pinning: proxies on CPU 1, sims and wrk on CPU 0). wrk posts one fixed chat body (a Lua script sets
method, body and headers); the figure is the proxy's CPU time (utime+stime, /proc) over wrk's run
divided by the requests wrk completed, beside wrk's requests/s and any non-2xx answers. Variants run
interleaved, one after another per round; the median over rounds is printed as a Markdown table.
Needs wrk (``apt-get install -y wrk``; installed when missing unless --no-install).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.procs import Procs, cpu_seconds, process_tree, raise_nofile  # noqa: E402
from bench.targets import LABEL, MODEL, Target, ensure_nginx, start_phase  # noqa: E402
from teraproxy import build  # noqa: E402

VARIANTS = ("direct", "nginx", "teraproxy", "direct_rc", "teraproxy_rw")
_LUA = """wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
"""
_REQS = re.compile(r"(\d+) requests in ([\d.]+)(m?s)")
_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_SOCKERR = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def lua_script(path: Path, max_tokens: int) -> Path:
    body = orjson.dumps({"model": MODEL, "max_tokens": max_tokens,
                         "messages": [{"role": "user", "content": "Why is the sky blue?"}]}).decode()
    path.write_text(_LUA.format(body="'" + body.replace("\\", "\\\\").replace("'", "\\'") + "'"))
    return path


def parse_wrk(out: str) -> tuple[int, int]:
    """(requests completed, failed: non-2xx plus socket errors) from wrk's report."""
    m = _REQS.search(out)
    if m is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    bad = int(m2.group(1)) if (m2 := _NON2XX.search(out)) else 0
    if (m3 := _SOCKERR.search(out)) is not None:
        bad += sum(int(x) for x in m3.groups())
    return int(m.group(1)), bad


def run_wrk(wrk: str, url: str, script: Path, connections: int, duration: float, pin: bool) -> str:
    argv = [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "-s", str(script), "--timeout", "10s",
            url + "/chat/completions"]
    if pin:
        argv = ["taskset", "-c", "0", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=True).stdout


def measure(wrk: str, target: Target, script: Path, a: argparse.Namespace, pin: bool) -> dict[str, float]:
    pids = process_tree(target.proxy.pid) if target.proxy else []
    run_wrk(wrk, target.url, script, a.connections, 1, pin)  # warm-up: connections, pools, caches
    c0, t0 = cpu_seconds(pids), time.perf_counter()
    out = run_wrk(wrk, target.url, script, a.connections, a.duration, pin)
    cpu, wall = cpu_seconds(pids) - c0, time.perf_counter() - t0
    n, bad = parse_wrk(out)
    return {"requests": n, "errors": bad, "requests_per_s": n / wall,
            "proxy_cpu_us_per_request": cpu / n * 1e6 if pids and n else float("nan")}


def table(rows: dict[str, list[dict[str, float]]]) -> str:
    med = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in rows.items()}
    base = med.get("nginx", {}).get("proxy_cpu_us_per_request")
    lines = ["| variant | requests/s | errors | proxy CPU µs / request | × nginx |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for v, m in med.items():
        us = m["proxy_cpu_us_per_request"]
        ratio = f"{us / base:.2f}×" if base and us == us else "–"
        lines.append(f"| {LABEL[v]} | {m['requests_per_s']:.0f} | {m['errors']:.0f} | "
                     f"{'–' if us != us else f'{us:.0f}'} | {ratio} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Non-streamed chat through nginx and teraproxy, wrk as the client.")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds of wrk per variant and round")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--variants", default="direct,nginx,teraproxy,teraproxy_rw")
    ap.add_argument("--access-log", choices=("on", "off"), default="on")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get install wrk/nginx when missing")
    ap.add_argument("--no-pin", action="store_true")
    return ap.parse_args(argv)


def ensure_wrk(install: bool) -> str | None:
    found = shutil.which("wrk")
    if found or not install or os.geteuid() != 0:
        return found
    subprocess.run(["apt-get", "install", "-y", "wrk"], capture_output=True, timeout=600)
    return shutil.which("wrk")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    wrk = ensure_wrk(not a.no_install)
    if wrk is None:
        print("wrk_bench: wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
        return 2
    variants = [v for v in a.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        print(f"wrk_bench: unknown variant(s) {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    nginx = ensure_nginx(install=not a.no_install) if "nginx" in variants else None
    pin = not a.no_pin and (os.cpu_count() or 1) >= 2
    raise_nofile()
    run_dir = Path(tempfile.mkdtemp(prefix="teraproxy-wrk-"))
    procs = Procs(run_dir, pin)
    rows: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    try:
        targets = start_phase(procs, run_dir, "fast", nginx, a.access_log == "on")
        script = lua_script(run_dir / "chat.lua", a.max_tokens)
        for rnd in range(a.rounds):
            order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
            for v in order:
                if v not in targets:
                    continue
                m = measure(wrk, targets[v], script, a, pin)
                rows[v].append(m)
                print(f"   round {rnd + 1}/{a.rounds} {v:<13} req/s {m['requests_per_s']:8.0f} "
                      f"errors {m['errors']:.0f} proxy µs/req {m['proxy_cpu_us_per_request']:7.1f}",
                      file=sys.stderr, flush=True)
    finally:
        procs.stop_all()
        shutil.rmtree(run_dir, ignore_errors=True)
    print(f"teraproxy {build()}")
    print(table({v: r for v, r in rows.items() if r}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
