#!/usr/bin/env python3
"""1 vs N teraproxy instances on one port (listen_reuse_port), one round each.

    python bench/instances_bench.py [--instances 1,2] [--duration 5]

Starts one `teraproxy sim` (no token delay, so the proxy is the bottleneck), then for each instance
count N starts N `teraproxy serve` processes sharing the API port (SO_REUSEPORT, each with its own
admin port) and runs bench/loadgen.py (a subprocess) non-streamed and streamed against the port.
Prints requests/s and frames/s, and the CPU seconds the proxies, the sim and the load generator used
in the run (utime+stime from /proc), because on a 2-core machine they all share the same cores: a
second instance can only help as far as the sim and the load generator leave a core for it.
A benchmark script, not a test.
"""

from __future__ import annotations

import argparse
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.procs import cpu_seconds, free_port  # noqa: E402
from bench.targets import MODEL  # noqa: E402


def cpu_s(pid: int) -> float:
    return cpu_seconds([pid])


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on {port}")


def loadgen(port: int, stream: bool, duration: float) -> tuple[subprocess.Popen[str], list[str]]:
    argv = [sys.executable, str(ROOT / "bench" / "loadgen.py"), "--url", f"http://127.0.0.1:{port}/v1",
            "--model", MODEL, "-c", "32" if stream else "64", "-d", str(duration), "--warmup", "1",
            "--max-tokens", "128" if stream else "64", "-q"] + (["--stream"] if stream else [])
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True), argv


def run(n: int, sim_port: int, duration: float, tmp: Path) -> list[str]:
    port = free_port()
    cfg = tmp / f"n{n}.yaml"
    cfg.write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{free_port()}", "auth": "off",
        "listen_reuse_port": True, "log": {"access_log": False, "level": "warning"},
        "health": {"enabled": False}, "models": [{"id": MODEL, "replicas": [{"url": f"http://127.0.0.1:{sim_port}"}]}]}))
    procs = [subprocess.Popen([sys.executable, "-m", "teraproxy", "serve", "--config", str(cfg),
                               "--admin-listen", f"127.0.0.1:{free_port()}"], cwd=ROOT) for _ in range(n)]
    out = []
    try:
        wait_port(port)
        time.sleep(0.5)
        for stream in (False, True):
            c0 = sum(cpu_s(p.pid) for p in procs)
            lg, _ = loadgen(port, stream, duration)
            text, _ = lg.communicate()
            c1 = sum(cpu_s(p.pid) for p in procs)
            rps = re.search(r"requests/s\s+([\d,.]+)", text)
            fps = re.search(r"frames/s ([\d,.]+)", text)
            out.append(f"| {n} | {'streamed' if stream else 'non-streamed'} | {rps.group(1) if rps else '-'} | "
                       f"{fps.group(1) if fps else '-'} | {c1 - c0:.2f} |")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(40)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", default="1,2")
    ap.add_argument("--duration", type=float, default=5.0)
    args = ap.parse_args()
    sim_port = free_port()
    sim = subprocess.Popen([sys.executable, "-m", "teraproxy", "sim", "--port", str(sim_port), "--tokens", "128"],
                           cwd=ROOT, stdout=subprocess.DEVNULL)
    rows = ["| instances | scenario | requests/s | frames/s | proxy CPU s (all instances) |",
            "| --- | --- | --- | --- | --- |"]
    t_sim0 = 0.0
    try:
        wait_port(sim_port)
        with tempfile.TemporaryDirectory() as tmp:
            for n in (int(x) for x in args.instances.split(",")):
                t_sim0 = cpu_s(sim.pid)
                rows += run(n, sim_port, args.duration, Path(tmp))
                rows.append(f"|  | (sim CPU s in this run: {cpu_s(sim.pid) - t_sim0:.2f}) | | | |")
    finally:
        sim.send_signal(signal.SIGTERM)
        sim.wait(10)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
