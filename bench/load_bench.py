#!/usr/bin/env python3
"""Load-aware routing and the fair admission queue, measured (issue 13's three scenarios).

    python bench/load_bench.py [--scenarios routing,fairness,cpu] [--duration S] [--solo-requests N] [--out DIR]

Starts `teraproxy sim` replicas (with --max-num-seqs and --speed) and `teraproxy serve` processes from
generated configs in a temporary directory, drives them with bench/loadgen.py in-process, and prints
one markdown table per scenario (also written as JSON under bench/results/ or --out):

  routing   two replicas, one twice as slow (--speed 0.5), each --max-num-seqs 8; two teraproxy
            instances sharing them, each under its own closed-loop load. Variants: least in flight
            (load.enabled false) vs load-aware (load reports every load.interval).
  fairness  one replica, --max-num-seqs 8; key "flood" keeps 96 requests open (a load generator
            process of its own), key "solo" sends one streamed request a second (from this one, on
            a fixed schedule); the replica's slot utilisation while solo runs (sim busy_slot_s)
            shows the flood's share.
            Variants: no max_in_flight (vLLM queues everything FIFO) vs max_in_flight 8 (the
            proxy's fair queue), every flood request max_tokens 32; the fair queue again with the
            flood's max_tokens drawn from 8..56 (same mean; real outputs vary, and equal ones finish
            in cohorts of 8); plus solo alone (its unloaded TTFT). --solo-requests (default 30) per
            variant, so its p99 is not just the largest of a handful.
  cpu       proxy CPU per non-streamed request (proxy pinned to CPU 1): today's path (load reports
            off, no max_in_flight) vs load reports on + max_in_flight high enough never to queue.

Run it on a quiet machine (`python bench/load_bench.py`); one round each.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import loadgen  # noqa: E402
from bench.lgclient import Options  # noqa: E402
from bench.lgstats import percentiles  # noqa: E402
from bench.procs import Procs, cpu_seconds, free_port, process_tree, wait_http  # noqa: E402
from bench.targets import MODEL, probe_chat  # noqa: E402

PY = sys.executable


def sim(procs: Procs, name: str, *args: str, cpu: int = 0) -> str:
    port = free_port()
    p = procs.start(name, [PY, "-m", "teraproxy", "sim", "--port", str(port), "--model", MODEL, *args], cpu)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", p, name)
    return url


def proxy(procs: Procs, run: Path, name: str, replicas: list[dict[str, Any]], cpu: int = 1,
          **over: Any) -> tuple[str, Any]:
    port, admin = free_port(), free_port()
    cfg: dict[str, Any] = {"listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin}", "auth": "off",
                           "log": {"level": "warning", "access_log": False}, "health": {"enabled": False},
                           "models": [{"id": MODEL, "replicas": replicas}]}
    cfg.update(over)
    path = run / f"{name}.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    p = procs.start(name, [PY, "-m", "teraproxy", "serve", "--config", str(path)], cpu)
    base = f"http://127.0.0.1:{port}/v1"
    wait_http(f"http://127.0.0.1:{admin}/healthz", p, name)
    if "auth" not in over:
        probe_chat(base, name)
    return base, p


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 1)


# -- scenario 1: load-aware routing -----------------------------------------------------------------
async def _routing_round(bases: list[str], concurrency: int, duration: float) -> dict[str, Any]:
    opts = [Options(url=b, model=MODEL, concurrency=concurrency, duration=duration, stream=True,
                            max_tokens=32, warmup=2.0, ramp=1.0, quiet=True, timeout=60) for b in bases]
    results = await asyncio.gather(*(loadgen.run(o) for o in opts))
    ttft: list[float] = []
    done = 0
    window = 0.0
    errors = 0
    for res in results:
        for r in res.window_records():
            if not r.error and r.ttft is not None:
                ttft.append(r.ttft)
        s = res.summary()
        done += s["window_completed"]
        window = max(window, s["window_s"])
        errors += s["errors_total"]
    p = percentiles(ttft)
    return {"ttft_p50_ms": _ms(p["p50"]), "ttft_p90_ms": _ms(p["p90"]), "ttft_p99_ms": _ms(p["p99"]),
            "requests_per_s": round(done / window, 1) if window else None, "requests": len(ttft), "errors": errors}


def routing(procs: Procs, run: Path, duration: float) -> list[dict[str, Any]]:
    common = ("--max-num-seqs", "8", "--ttft", "40", "--itl", "8", "--tokens", "32")
    fast = sim(procs, "sim-fast", *common)
    slow = sim(procs, "sim-slow", *common, "--speed", "0.5")
    reps = [{"url": fast}, {"url": slow}]
    out = []
    for variant, load in (("least in flight", {"enabled": False}), ("load-aware (1s reports)", {}),
                          ("load-aware (250ms reports)", {"interval": "250ms"})):
        a, pa = proxy(procs, run, "proxy-a", reps, load=load)
        b, pb = proxy(procs, run, "proxy-b", reps, load=load)
        time.sleep(1.5)  # first reports in
        row = asyncio.run(_routing_round([a, b], 14, duration))
        out.append({"variant": variant, **row})
        procs.stop(pa)
        procs.stop(pb)
    return out


# -- scenario 2: fairness under saturation ---------------------------------------------------------
async def _solo(base: str, key: str, n: int, every: float) -> list[float]:
    """n streamed requests, one started every `every` seconds on a fixed schedule (not after the previous
    one ends: under FIFO each takes ~2 s, and 30 one after another would outlast the flood); TTFTs in
    send order."""
    body = orjson.dumps({"model": MODEL, "stream": True, "max_tokens": 8,
                         "messages": [{"role": "user", "content": "hi"}]})
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as s:

        async def one() -> float | None:
            t0 = time.perf_counter()
            async with s.post(base + "/chat/completions", data=body, headers=headers) as resp:
                first = None
                async for chunk in resp.content.iter_any():
                    if first is None and b'"content":"' in chunk:
                        first = time.perf_counter() - t0
                return first if resp.status == 200 else None

        start = time.perf_counter()
        tasks = []
        for i in range(n):
            await asyncio.sleep(max(0.0, start + i * every - time.perf_counter()))
            tasks.append(asyncio.ensure_future(one()))
        got = await asyncio.gather(*tasks)
    return [t for t in got if t is not None]


async def _fair_round(base: str, sim_url: str, flood: int, lengths: str, n: int, out: Path,
                      seqs: int = 8) -> dict[str, Any]:
    """The flood runs in a load generator process of its own (bench/loadgen.py), as a batch job's
    client would: sharing this event loop with the flood's streams delayed the solo key's own reads.
    lengths: the flood's max_tokens, "32" (every request) or "LO:HI" (each drawn from LO..HI, seeded)."""
    proc = None
    if flood:
        size = ("--max-tokens-range", lengths) if ":" in lengths else ("--max-tokens", lengths)
        proc = await asyncio.create_subprocess_exec(
            PY, str(REPO / "bench" / "loadgen.py"), "--url", base, "--model", MODEL, "--key", "sk-flood",
            "--concurrency", str(flood), "--duration", str(n + 3.0), "--stream", *size,
            "--warmup", "1", "--ramp", "0.5", "--timeout", "120", "--quiet", "--json", str(out),
            stdout=asyncio.subprocess.DEVNULL)
        await asyncio.sleep(2.0)  # the flood is established
    async with aiohttp.ClientSession() as s:
        async with s.get(sim_url + "/_sim/stats") as r:
            st0, t0 = await r.json(), time.monotonic()
        solo = await _solo(base, "sk-solo", n, 1.0)
        async with s.get(sim_url + "/_sim/stats") as r:
            st1, t1 = await r.json(), time.monotonic()
    row: dict[str, Any] = {}
    if proc is not None:
        await proc.wait()
        summary = orjson.loads(await asyncio.to_thread(out.read_bytes))["summary"]
        row["flood_requests_per_s"] = round(summary["requests_per_s"], 1) if summary["requests_per_s"] else None
        row["flood_ttft_p50_ms"] = _ms(summary["ttft"]["p50"])
        # the replica's slots in use while solo ran (1.0: never one idle between a request and the next)
        row["sim_slot_utilisation"] = round((st1["busy_slot_s"] - st0["busy_slot_s"]) / (seqs * (t1 - t0)), 3)
    p = percentiles(solo)
    return {"solo_ttft_p50_ms": _ms(p["p50"]), "solo_ttft_p99_ms": _ms(p["p99"]), "solo_requests": len(solo), **row}


def fairness(procs: Procs, run: Path, duration: float, solo_requests: int = 30, seqs: int = 8) -> list[dict[str, Any]]:
    """Each variant lasts solo_requests seconds (solo sends one a second); duration is not used. The
    sim's --tokens 64 is above every max_tokens sent, so each request gets exactly its max_tokens.
    ``seqs``: the sim's --max-num-seqs and the proxy's max_in_flight; the flood keeps 12 per slot open.
    A queued request waits for the next slot to free, so the gap between completions (a request's
    service time / seqs) is what the quiet key's wait is made of."""
    url = sim(procs, "sim-fair", "--max-num-seqs", str(seqs), "--ttft", "20", "--itl", "5", "--tokens", "64")
    import hashlib

    keys = {"keys": [{"name": "flood", "sha256": hashlib.sha256(b"sk-flood").hexdigest()},
                     {"name": "solo", "sha256": hashlib.sha256(b"sk-solo").hexdigest()}]}
    capped = {"url": url, "max_in_flight": seqs}
    flood = 12 * seqs
    out = []
    for variant, rep, n, lengths in (
            (f"solo alone (unloaded), {seqs} slots", {"url": url}, 0, "32"),
            (f"flood, no max_in_flight (vLLM queues FIFO), {seqs} slots", {"url": url}, flood, "32"),
            (f"flood, max_in_flight {seqs} (fair queue)", capped, flood, "32"),
            # same mean length (32), so the same load; lengths that differ keep the slots from
            # finishing in cohorts (equal deterministic requests stay phase-locked)
            (f"flood with varied lengths, max_in_flight {seqs}", capped, flood, "8:56")):
        base, p = proxy(procs, run, "proxy-fair", [rep], auth=keys)
        row = asyncio.run(_fair_round(base, url, n, lengths, solo_requests, run / "flood.json", seqs))
        out.append({"variant": variant, "flood_streams": n or None, "flood_max_tokens": lengths if n else None,
                    **row})
        procs.stop(p)
    return out


# -- scenario 3: hot-path cost --------------------------------------------------------------------
def cpu(procs: Procs, run: Path, duration: float) -> list[dict[str, Any]]:
    url = sim(procs, "sim-cpu", "--tokens", "16")
    out = []
    for variant, rep, load in (("today's path (no load reports, no cap)", {"url": url}, {"enabled": False}),
                               ("load reports + max_in_flight 100000 (queue never used)",
                                {"url": url, "max_in_flight": 100000}, {}),
                               ("today's path again", {"url": url}, {"enabled": False}),
                               ("load reports + max_in_flight again", {"url": url, "max_in_flight": 100000}, {})):
        base, p = proxy(procs, run, "proxy-cpu", [rep], load=load)
        pids = process_tree(p.pid)
        marks: dict[str, float] = {}

        def mark(what: str, marks: dict[str, float] = marks, pids: list[int] = pids) -> None:
            marks[what] = cpu_seconds(pids)

        opts = Options(url=base, model=MODEL, concurrency=32, duration=duration, max_tokens=16,
                               warmup=1.0, quiet=True, on_window=mark)
        s = loadgen.run_sync(opts).summary()
        used = marks["end"] - marks["start"]
        out.append({"variant": variant, "requests_per_s": round(s["requests_per_s"] or 0, 1),
                    "proxy_cpu_us_per_request": round(used / s["window_completed"] * 1e6, 1)
                    if s["window_completed"] else None})
        procs.stop(p)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    cols = list(dict.fromkeys(c for r in rows for c in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenarios", default="routing,fairness,cpu")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of load per variant")
    ap.add_argument("--solo-requests", type=int, default=30,
                    help="fairness: the solo key's requests per variant (one a second; sets its length)")
    ap.add_argument("--fair-seqs", type=int, default=8,
                    help="fairness: the replica's --max-num-seqs (and max_in_flight); the flood is 12 per slot")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args(argv)
    if args.solo_requests < 1:
        ap.error("--solo-requests must be >= 1")
    fns: dict[str, Callable[[Procs, Path, float], list[dict[str, Any]]]] = {
        "routing": routing, "cpu": cpu,
        "fairness": functools.partial(fairness, solo_requests=args.solo_requests, seqs=args.fair_seqs)}
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="teraproxy-load-") as tmp:
        procs = Procs(Path(tmp), pin=True)
        try:
            for name in args.scenarios.split(","):
                rows = fns[name](procs, Path(tmp), args.duration)
                report[name] = rows
                print(f"\n### {name}\n\n{table(rows)}\n", flush=True)
        finally:
            procs.stop_all()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"load-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
