#!/usr/bin/env python3
"""TLS at the edge: nginx and teraproxy both terminating HTTPS, on compare.py's S1.

    python bench/tls_bench.py [--quick] [--rounds N] [--json OUT]

Makes a throw-away CA and a server certificate for 127.0.0.1 with the `openssl` CLI (ECDSA P-256)
in a temporary run directory, starts one `teraproxy sim` (no token delay), nginx (bench/nginx.conf
with `listen ... ssl`) and teraproxy (`tls: {cert, key}`) in front of it, and measures S1
(non-streamed chat, 64 tokens, c=64, keep-alive connections, so handshakes fall in the warm-up and
the figures are the per-request cost of TLS records plus proxying) three ways in interleaved rounds:
direct (plain HTTP to the sim), nginx TLS, teraproxy TLS. The load generator (bench/loadgen.py,
in process) trusts the CA. Pinning and CPU accounting are compare.py's: the proxies on CPU 1, the
sim and the load generator on CPU 0, proxy CPU from /proc at the window's edges. Prints a markdown
table of the medians: requests/s, proxy CPU µs per request, its ratio to nginx's, latency p50/p99
and errors.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
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

from bench.measure import Scenario, measure  # noqa: E402
from bench.procs import Procs, free_port, raise_nofile, wait_http  # noqa: E402
from bench.targets import MODEL, Target, find_nginx, render_nginx_conf, teraproxy_conf  # noqa: E402

VARIANTS = ("direct", "nginx_tls", "teraproxy_tls")
LABEL = {"direct": "direct (plain HTTP)", "nginx_tls": "nginx, TLS", "teraproxy_tls": "teraproxy, TLS"}


def make_certs(d: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost signed by it: (ca, cert, key)."""
    ca_key, ca, key, csr, cert = (d / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = d / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    for argv in (
        ["req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=tls_bench CA"],
        ["req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "2",
         "-extfile", ext],
    ):
        subprocess.run(["openssl", *map(str, argv)], check=True, capture_output=True, timeout=30)
    return ca, cert, key


def nginx_tls_conf(run_dir: Path, port: int, upstream: int, cert: Path, key: Path) -> Path:
    """compare.py's nginx config with its listener switched to TLS."""
    path = render_nginx_conf(run_dir, port, upstream, access_log=True)
    plain = f"listen 127.0.0.1:{port} backlog=4096;"
    text = path.read_text()
    if plain not in text:
        raise RuntimeError(f"bench/nginx.conf has no '{plain}' line to switch to TLS")
    path.write_text(text.replace(plain, f"listen 127.0.0.1:{port} ssl backlog=4096;\n"
                                        f"        ssl_certificate {cert};\n        ssl_certificate_key {key};\n"
                                        "        ssl_protocols TLSv1.2 TLSv1.3;"))
    return path


def wait_https(port: int, ctx: ssl.SSLContext, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> str:
    """Until one chat request through the port succeeds; returns the negotiated protocol and cipher."""
    base = f"https://127.0.0.1:{port}/v1"
    body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    deadline, last = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        req = urllib.request.Request(base + "/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
                if r.status == 200 and orjson.loads(r.read()).get("choices"):
                    with socket.create_connection(("127.0.0.1", port), 5) as raw, \
                            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as t:
                        return f"{t.version()} {(t.cipher() or ('?',))[0]}"
        except OSError as e:
            last = str(e)
        time.sleep(0.2)
    raise RuntimeError(f"{what} not serving at {base} after {timeout:.0f}s ({last})")


def start(procs: Procs, run_dir: Path, nginx: str,
          certs: tuple[Path, Path, Path]) -> tuple[dict[str, Target], dict[str, str]]:
    """The sim, nginx and teraproxy; returns the targets and each proxy's negotiated TLS."""
    ca, cert, key = certs
    env = dict(os.environ, PYTHONPATH=str(REPO))
    py = sys.executable
    sim_port = free_port()
    sim = procs.start("sim", [py, "-m", "teraproxy", "sim", "--host", "127.0.0.1", "--port", str(sim_port),
                              "--model", MODEL, "--ttft", "0", "--itl", "0", "--tokens", "256"], cpu=0, env=env)
    wait_http(f"http://127.0.0.1:{sim_port}/health", sim, "sim")
    targets = {"direct": Target("direct", f"http://127.0.0.1:{sim_port}/v1", None, sim)}
    ndir = run_dir / "nginx"
    ndir.mkdir()
    ndir.chmod(0o755)  # workers run as an unprivileged user when started by root
    nport, tport = free_port(), free_port()
    conf = nginx_tls_conf(ndir, nport, sim_port, cert, key)
    nproc = procs.start("nginx", [nginx, "-p", f"{ndir}/", "-c", str(conf), "-e", f"{ndir}/error.log",
                                  "-g", "daemon off;"], cpu=1)
    tconf = teraproxy_conf(run_dir, "teraproxy", tport, sim_port, "passthrough", access_log=True)
    with tconf.open("a") as f:
        f.write(f"tls: {{cert: {cert}, key: {key}}}\n")
    tproc = procs.start("teraproxy", [py, "-m", "teraproxy", "serve", "--config", str(tconf)], cpu=1, env=env)
    ctx = ssl.create_default_context(cafile=str(ca))
    tls: dict[str, str] = {}
    for name, port, proc in (("nginx_tls", nport, nproc), ("teraproxy_tls", tport, tproc)):
        base = f"https://127.0.0.1:{port}/v1"
        try:
            tls[name] = wait_https(port, ctx, proc, name)
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n{procs.log_tail(name.removesuffix('_tls'))}") from None
        targets[name] = Target(name, base, proc, sim, cacert=str(ca))
    return targets, tls


def medians(ms: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for v in VARIANTS:
        rows = [m for m in ms if m["variant"] == v]
        med: dict[str, Any] = {"errors": sum(m["errors"] for m in rows)}
        for k in ("requests_per_s", "proxy_cpu_us_per_request", "latency_p50_ms", "latency_p99_ms"):
            vals = [m[k] for m in rows if m.get(k) is not None]
            med[k] = statistics.median(vals) if vals else None
        out[v] = med
    return out


def table(med: dict[str, dict[str, Any]], sc: Scenario, rounds: int, tls: dict[str, str]) -> str:
    def f(v: float | None, nd: int = 0) -> str:
        return "—" if v is None else f"{v:,.{nd}f}"

    base = med["nginx_tls"]["proxy_cpu_us_per_request"]
    lines = [f"S1 with TLS: {sc.title}, median of {rounds} round(s); "
             + "; ".join(f"{LABEL[v]}: {tls[v]}" for v in tls),
             "",
             "| variant | requests/s | proxy CPU µs/request | ratio to nginx | latency p50 ms | latency p99 ms "
             "| errors |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for v in VARIANTS:
        m = med[v]
        cpu = m["proxy_cpu_us_per_request"]
        ratio = "—" if cpu is None or not base else f"{cpu / base:.2f}x"
        lines.append(f"| {LABEL[v]} | {f(m['requests_per_s'])} | {f(cpu)} | {ratio} | {f(m['latency_p50_ms'], 1)} "
                     f"| {f(m['latency_p99_ms'], 1)} | {m['errors']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="nginx vs teraproxy, both terminating TLS (S1)")
    ap.add_argument("--quick", action="store_true", help="about a second per variant, c=8, one round (smoke test)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 3; 1 with --quick)")
    ap.add_argument("--json", metavar="OUT", help="write every measurement and the medians as JSON")
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    a = ap.parse_args(argv)
    rounds = a.rounds or (1 if a.quick else 3)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    nginx = find_nginx()
    if nginx is None or shutil.which("openssl") is None:
        print("tls_bench: needs nginx and the openssl CLI", file=sys.stderr)
        return 2
    sc = (Scenario("S1", "non-streamed chat, 64 tokens, c=8", "fast", False, 8, 64, 1.0, 0.3) if a.quick else
          Scenario("S1", "non-streamed chat, 64 tokens, c=64", "fast", False, 64, 64, 4.0, 1.0))
    raise_nofile()
    pin = not a.no_pin and (os.cpu_count() or 1) >= 2
    if pin:
        os.sched_setaffinity(0, {0})  # the in-process load generator shares core 0 with the sim
    run_dir = Path(tempfile.mkdtemp(prefix="teraproxy-tls-bench-"))
    procs = Procs(run_dir, pin)
    ms: list[dict[str, Any]] = []
    try:
        targets, tls = start(procs, run_dir, nginx, make_certs(run_dir))
        for rnd in range(rounds):
            order = VARIANTS[rnd % 3:] + VARIANTS[:rnd % 3]
            for v in order:
                m = measure(targets[v], sc, rnd, 30.0 if a.quick else 120.0)
                ms.append(m)
                print(f"   round {rnd + 1}/{rounds} {v:<14} req/s {m['requests_per_s']:,.0f} "
                      f"err {m['errors']} cpu/req {m.get('proxy_cpu_us_per_request') or 0:,.0f} µs",
                      file=sys.stderr, flush=True)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        print(f"tls_bench: {e}\nrun dir kept: {run_dir}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
    shutil.rmtree(run_dir, ignore_errors=True)
    med = medians(ms)
    print(table(med, sc, rounds, tls))
    if a.json:
        Path(a.json).write_bytes(orjson.dumps({"medians": med, "measurements": ms, "tls": tls},
                                              option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
