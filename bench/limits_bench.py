#!/usr/bin/env python3
"""What per-key limits cost: proxy CPU per non-streamed request, unlimited vs limited key.

    python bench/limits_bench.py [--rounds N] [--duration S] [--concurrency C] [--out DIR]

One `teraproxy sim` (CPU 0, no delays) and three teraproxy processes (CPU 1), all from generated
configs, with the same key and the same traffic (S1 of compare.py: non-streamed chat, 64 tokens):

  unlimited     the key has no limits (usage is still metered from the body)
  memory        requests_per_minute (high enough never to refuse), backend memory
  redis         the same limit, backend redis (a redis-server started here, on CPU 0): one
                Lua round trip per request
  memory_all    requests_per_minute, tokens_per_minute and max_in_flight, backend memory
  redis_all     the same, backend redis: two round trips (admission; charge and release after
                the answer)

The load generator (bench/loadgen.py, in this process) runs on CPU 0. Proxy CPU is utime+stime of
the proxy process between the measurement window's boundaries, divided by the requests completed
in it; rounds are interleaved and the figure is the median. Writes limits-<time>.json and .md under
bench/results/ or --out. Needs `redis-server` (apt-get install -y redis-server).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import loadgen  # noqa: E402
from bench.lgclient import Options  # noqa: E402
from bench.procs import Procs, child_env, cpu_seconds, free_port, process_tree, wait_http  # noqa: E402
from bench.targets import MODEL  # noqa: E402
from teraproxy.auth import hash_key  # noqa: E402

KEY = "sk-bench"
VARIANTS = ("unlimited", "memory", "redis", "memory_all", "redis_all")
_BIG = 100_000_000  # limits high enough never to refuse: the cost measured is the checking


def proxy_conf(run_dir: Path, name: str, port: int, upstream: int, redis_port: int) -> Path:
    key = f"    - {{name: bench, sha256: {hash_key(KEY)}"
    if name != "unlimited":
        key += f", requests_per_minute: {_BIG}"
    if name.endswith("_all"):
        key += f", tokens_per_minute: {_BIG}, max_in_flight: {_BIG}"
    key += "}\n"
    ratelimit = f"ratelimit: {{backend: redis, redis_url: 'redis://127.0.0.1:{redis_port}/0'}}\n" \
        if name.startswith("redis") else ""
    text = (f"listen: 127.0.0.1:{port}\nauth:\n  keys:\n{key}{ratelimit}"
            "log: {level: warning, access_log: false}\nreasoning: {emit: passthrough}\n"
            f"models:\n  - id: {MODEL}\n    replicas:\n      - url: http://127.0.0.1:{upstream}\n")
    path = run_dir / f"{name}.yaml"
    path.write_text(text)
    return path


def probe(url: str) -> dict[str, str]:
    """One request with the key; its headers (the limited variants must show x-ratelimit-*)."""
    body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    deadline = time.monotonic() + 20
    while True:
        req = urllib.request.Request(url + "/chat/completions", data=body, headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                r.read()
                return {k.lower(): v for k, v in r.headers.items()}
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def redis_dbsize(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"*1\r\n$6\r\nDBSIZE\r\n")
        return int(s.recv(64)[1:].strip())


async def _added_cpu(redis_url: str, n: int = 6400) -> dict[str, float]:
    """CPU per request of the limiter work alone (admit, headers, finish), in this process, 64 at a time."""
    from teraproxy.ratelimit import KeyLimits, MemoryLimiter
    from teraproxy.ratelimit_redis import RedisLimiter

    rpm = KeyLimits(requests_per_minute=_BIG)
    every = KeyLimits(requests_per_minute=_BIG, tokens_per_minute=_BIG, max_in_flight=_BIG)
    out: dict[str, float] = {}

    async def one(lim: Any, k: KeyLimits) -> None:
        d = await lim.admit("bench", k)
        d.headers()
        lim.finish("bench", d, 76)

    async def nothing() -> None:
        return None

    async def run(lim: Any, k: KeyLimits | None) -> float:
        t0 = time.process_time()
        for _ in range(n // 64):
            await asyncio.gather(*(one(lim, k) if k else nothing() for _ in range(64)))
        if hasattr(lim, "drain"):  # background charges count too
            await lim.drain(5.0)
        return (time.process_time() - t0) / n * 1e6

    base = await run(None, None)
    for name, k in (("memory", rpm), ("memory_all", every)):
        out[name] = await run(MemoryLimiter({"bench": k}), k) - base
    for name, k in (("redis", rpm), ("redis_all", every)):
        lim = RedisLimiter(redis_url, {"bench": k}, timeout=1.0)
        await run(lim, k)  # connect, load the scripts
        out[name] = await run(lim, k) - base
        await lim.close()
    return out


def measure(url: str, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    pids = process_tree(pid)
    marks: dict[str, float] = {}

    def on_window(what: str) -> None:
        marks[what] = cpu_seconds(pids)

    opts = Options(url=url, model=MODEL, key=KEY, concurrency=args.concurrency, duration=args.duration,
                           stream=False, max_tokens=64, warmup=1.0, quiet=True, on_window=on_window)
    res = loadgen.run_sync(opts)
    s = res.summary()
    done = s["window_completed"]
    return {"requests_per_s": s["requests_per_s"], "errors": s["errors_total"], "completed": done,
            "cpu_us_per_request": (marks["end"] - marks["start"]) / done * 1e6 if done else None}


def start_targets(procs: Procs, run_dir: Path, redis_exe: str) -> tuple[dict[str, tuple[str, int]], int]:
    """Redis, the sim and one teraproxy per variant, each checked; {variant: (url, pid)} and the Redis port."""
    env = child_env()
    py = sys.executable
    redis_port, sim_port = free_port(), free_port()
    procs.start("redis", [redis_exe, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no"], cpu=0)
    sim = procs.start("sim", [py, "-m", "teraproxy", "sim", "--port", str(sim_port), "--model", MODEL,
                              "--reasoning-field", "none", "--ttft", "0", "--itl", "0", "--tokens", "64"],
                      cpu=0, env=env)
    wait_http(f"http://127.0.0.1:{sim_port}/health", sim, "sim")
    targets: dict[str, tuple[str, int]] = {}
    for name in VARIANTS:
        port = free_port()
        conf = proxy_conf(run_dir, name, port, sim_port, redis_port)
        p = procs.start(name, [py, "-m", "teraproxy", "serve", "--config", str(conf)], cpu=1, env=env)
        url = f"http://127.0.0.1:{port}/v1"
        try:
            headers = probe(url)
        except OSError as e:
            raise RuntimeError(f"{name}: {e}\n{procs.log_tail(name)}") from None
        limited = "x-ratelimit-limit-requests" in headers
        if limited != (name != "unlimited"):
            raise RuntimeError(f"{name}: x-ratelimit headers {'present' if limited else 'missing'}")
        targets[name] = (url, p.pid)
    if redis_dbsize(redis_port) < 1:
        raise RuntimeError("the redis variant left no state in Redis")
    return targets, redis_port


def report(rows: list[dict[str, Any]], added: dict[str, float]) -> tuple[str, dict[str, Any]]:
    """The markdown table and the JSON document of the rounds."""
    per = {v: [r["cpu_us_per_request"] for r in rows if r["variant"] == v and r["cpu_us_per_request"]]
           for v in VARIANTS}
    med = {v: statistics.median(x) for v, x in per.items()}
    low = {v: min(x) for v, x in per.items()}  # on a shared machine, noise only ever adds CPU
    label = {"unlimited": "no limits", "memory": "requests_per_minute, memory",
             "redis": "requests_per_minute, redis", "memory_all": "rpm + tpm + max_in_flight, memory",
             "redis_all": "rpm + tpm + max_in_flight, redis"}
    goal = {"memory": "≤ +10%", "redis": "≤ +60%", "memory_all": "≤ +10%", "redis_all": "≤ +60%"}
    lines = ["| key | proxy CPU per request, median (min) | vs no limits, median (min) | goal |",
             "| --- | --- | --- | --- |"]
    for v in VARIANTS:
        rel = "" if v == "unlimited" else (f"{(med[v] / med['unlimited'] - 1) * 100:+.1f}% "
                                           f"({(low[v] / low['unlimited'] - 1) * 100:+.1f}%)")
        lines.append(f"| {label[v]} | {med[v]:.1f} µs ({low[v]:.1f}) | {rel} | {goal.get(v, '')} |")
    lines.append("")
    lines.append("The limiter's own work per request, measured in-process (admit, headers, finish; 64 at a time): "
                 + ", ".join(f"{label[k]} {v:.1f} µs" for k, v in added.items()) + ".")
    return "\n".join(lines), {"rows": rows, "median": med, "min": low, "limiter_alone_us": added}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    redis_exe = shutil.which("redis-server")
    if redis_exe is None:
        print("redis-server is not installed (apt-get install -y redis-server)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="teraproxy-limits-") as tmp:
        run_dir = Path(tmp)
        procs = Procs(run_dir, pin=True)
        try:
            targets, redis_port = start_targets(procs, run_dir, redis_exe)
            import uvloop

            added = uvloop.run(_added_cpu(f"redis://127.0.0.1:{redis_port}/0"))
            print("limiter work alone, CPU per request:", ", ".join(f"{k} {v:.1f} µs" for k, v in added.items()))
            rows: list[dict[str, Any]] = []
            for rnd in range(args.rounds):
                for name in VARIANTS:
                    url, pid = targets[name]
                    m = measure(url, pid, args)
                    m.update(variant=name, round=rnd)
                    rows.append(m)
                    print(f"round {rnd + 1} {name:10s} {m['requests_per_s']:8.0f} req/s  "
                          f"{m['cpu_us_per_request'] or 0:7.1f} us/request  errors {m['errors']}", flush=True)
        finally:
            procs.stop_all()
    table, doc = report(rows, added)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"limits-{stamp}.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    (args.out / f"limits-{stamp}.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
