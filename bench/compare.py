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
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import loadgen  # noqa: E402

MODEL = "Qwen/Qwen3-8B"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
VARIANTS = ("direct", "nginx", "teraproxy", "direct_rc", "teraproxy_rw")
PROXIES = ("nginx", "teraproxy", "teraproxy_rw")
BASELINE = {"nginx": "direct", "teraproxy": "direct", "teraproxy_rw": "direct_rc"}
LABEL = {
    "direct": "direct",
    "nginx": "nginx",
    "teraproxy": "teraproxy",
    "direct_rc": "direct (rc)",
    "teraproxy_rw": "teraproxy rewrite",
}


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


PHASES = {"fast": {"itl": 0, "tokens": 256}, "slow": {"itl": 20, "tokens": 128}}


# --------------------------------------------------------------------------
# /proc helpers
# --------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2 :].decode().split()  # fields from "state" (3rd) on


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (nginx master + workers)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        f = _stat_fields(int(d))
        if f:
            children.setdefault(int(f[1]), []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for p in pids:
        f = _stat_fields(p)
        if f:
            total += int(f[11]) + int(f[12])  # utime, stime
    return total / CLK_TCK


def peak_rss_mib(pids: list[int]) -> float | None:
    kib, seen = 0, False
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        kib += int(line.split()[1])
                        seen = True
        except OSError:
            pass
    return kib / 1024 if seen else None


def reset_peak_rss(pids: list[int]) -> bool:
    ok = True
    for p in pids:
        try:
            with open(f"/proc/{p}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            ok = False
    return ok


def self_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------

_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover
    _libc = None


def _child_setup() -> None:
    # Children die with compare.py even if it is killed with SIGKILL.
    if _libc is not None:
        _libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Procs:
    """Every process compare.py started; stop_all() ends them, by pid."""

    def __init__(self, run_dir: Path, pin: bool) -> None:
        self.run_dir = run_dir
        self.pin = pin and shutil.which("taskset") is not None
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], cpu: int, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        cmd = (["taskset", "-c", str(cpu)] if self.pin else []) + argv
        log = open(self.run_dir / f"{name}.log", "wb")
        try:
            p = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(self.run_dir),
                env=env,
                start_new_session=True,
                preexec_fn=_child_setup,
            )
        finally:
            log.close()
        self.procs.append((name, p))
        return p

    def log_tail(self, name: str, n: int = 15) -> str:
        try:
            lines = (self.run_dir / f"{name}.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self, p: subprocess.Popen[bytes]) -> None:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        # The process group is the child's own (start_new_session): its pid.
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass

    def stop_all(self) -> None:
        while self.procs:
            _, p = self.procs.pop()
            self.stop(p)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
                last = f"status {r.status}"
        except urllib.error.HTTPError as e:
            last = f"status {e.code}"
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready at {url} after {timeout:.0f}s ({last})")


def probe_chat(base: str, what: str, timeout: float = 15.0) -> None:
    """One real request through the path; proxies may need a health check first."""
    body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        req = urllib.request.Request(
            base + "/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200 and orjson.loads(r.read()).get("choices"):
                    return
        except urllib.error.HTTPError as e:
            last = f"status {e.code}: {e.read()[:200]!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.2)
    raise RuntimeError(f"{what}: chat request through {base} fails ({last})")


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (
            p
            for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
            if os.access(p, os.X_OK)
        ),
        None,
    )


def ensure_nginx(install: bool) -> str | None:
    path = find_nginx()
    if path:
        return path
    if not install:
        print("nginx not found: skipping the nginx variant (install: apt-get install -y nginx)", file=sys.stderr)
        return None
    if os.geteuid() != 0:
        print("nginx not found and not root: run `sudo apt-get install -y nginx`; skipping nginx", file=sys.stderr)
        return None
    print("nginx not found: apt-get install -y nginx ...", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmds in (
        [["apt-get", "install", "-y", "nginx"]],
        [["apt-get", "update"], ["apt-get", "install", "-y", "nginx"]],
    ):
        try:
            ok = all(
                subprocess.run(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600).returncode
                == 0
                for c in cmds
            )
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok and find_nginx():
            return find_nginx()
    print("apt-get install -y nginx failed; skipping the nginx variant", file=sys.stderr)
    return None


def nginx_version(path: str) -> str:
    try:
        r = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=10)
        return (r.stderr or r.stdout).strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def render_nginx_conf(run_dir: Path, listen: int, upstream: int, access_log: bool) -> Path:
    text = (REPO / "bench" / "nginx.conf").read_text()
    rd = str(run_dir).rstrip("/")
    text = (
        text.replace("{{LISTEN_PORT}}", str(listen))
        .replace("{{UPSTREAM_PORT}}", str(upstream))
        .replace("{{ACCESS_LOG}}", f"{rd}/access.log" if access_log else "off")
        .replace("{{RUN_DIR}}", rd)
    )
    if "{{" in text:
        raise RuntimeError("bench/nginx.conf has a placeholder compare.py does not fill")
    path = run_dir / "nginx.conf"
    path.write_text(text)
    return path


def teraproxy_conf(run_dir: Path, name: str, listen: int, upstream: int, emit: str, access_log: bool) -> Path:
    text = (
        f"listen: 127.0.0.1:{listen}\n"
        "auth: off\n"
        f"reasoning: {{emit: {emit}}}\n"
        # teraproxy writes its access log (JSON lines) at level info.
        f"log: {{level: {'info' if access_log else 'warning'}, access_log: {'true' if access_log else 'false'}}}\n"
        "models:\n"
        f"  - id: {MODEL}\n"
        "    replicas:\n"
        f"      - url: http://127.0.0.1:{upstream}\n"
    )
    path = run_dir / f"{name}.yaml"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------


@dataclass
class Target:
    variant: str
    url: str  # base, .../v1
    proxy: subprocess.Popen[bytes] | None
    upstream: subprocess.Popen[bytes]


def measure(target: Target, sc: Scenario, rnd: int, timeout: float) -> dict[str, Any]:
    proxy_pids = process_tree(target.proxy.pid) if target.proxy else []
    up_pids = process_tree(target.upstream.pid)
    rss_reset = reset_peak_rss(proxy_pids) if proxy_pids else False
    marks: dict[str, tuple[float, float, float, float]] = {}

    def on_window(what: str) -> None:
        marks[what] = (time.perf_counter(), cpu_seconds(proxy_pids), cpu_seconds(up_pids), self_cpu_seconds())

    opts = loadgen.Options(
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
    )
    res = loadgen.run_sync(opts)
    s = res.summary()
    (t0, p0, u0, l0), (t1, p1, u1, l1) = marks["start"], marks["end"]
    wall = max(t1 - t0, 1e-9)
    m: dict[str, Any] = {
        "scenario": sc.name,
        "variant": target.variant,
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
        "error_samples": res.error_samples(),
        "requests_ok_window": s["requests_ok_window"],
        "window_completed": s["window_completed"],
        "window_frames": s["window_frames"],
        "upstream_cpu_pct": (u1 - u0) / wall * 100,
        "loadgen_cpu_pct": (l1 - l0) / wall * 100,
    }
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


def _ms(v: float | None) -> float | None:
    return None if v is None else v * 1000


# --------------------------------------------------------------------------
# Aggregation and report
# --------------------------------------------------------------------------

# (key, label, kind) per scenario family; kind "abs" = median of the figure,
# "added" = median over rounds of (variant - its direct baseline).
FIGURES: dict[str, list[tuple[str, str, str]]] = {
    "S1": [
        ("requests_per_s", "requests/s", "abs"),
        ("latency_p50_ms", "latency p50 added (ms)", "added"),
        ("latency_p99_ms", "latency p99 added (ms)", "added"),
        ("proxy_cpu_us_per_request", "proxy CPU µs / request", "abs"),
        ("proxy_cpu_pct", "proxy CPU %", "abs"),
        ("proxy_peak_rss_mib", "proxy peak RSS (MiB)", "abs"),
        ("errors", "errors", "abs"),
    ],
    "S2": [
        ("frames_per_s", "frames/s", "abs"),
        ("proxy_cpu_s_per_100k_frames", "proxy CPU s / 100k frames", "abs"),
        ("proxy_cpu_pct", "proxy CPU %", "abs"),
        ("ttft_p50_ms", "TTFT p50 added (ms)", "added"),
        ("latency_p50_ms", "latency p50 added (ms)", "added"),
        ("proxy_peak_rss_mib", "proxy peak RSS (MiB)", "abs"),
        ("errors", "errors", "abs"),
    ],
    "S3": [
        ("ttft_p50_ms", "TTFT p50 added (ms)", "added"),
        ("ttft_p99_ms", "TTFT p99 added (ms)", "added"),
        ("itl_p50_ms", "inter-token p50 added (ms)", "added"),
        ("itl_p99_ms", "inter-token p99 added (ms)", "added"),
        ("errors", "errors", "abs"),
        ("proxy_cpu_pct", "proxy CPU %", "abs"),
        ("proxy_cpu_us_per_frame", "proxy CPU µs / frame", "abs"),
        ("proxy_peak_rss_mib", "proxy peak RSS (MiB)", "abs"),
        ("frames_per_s", "frames/s", "abs"),
    ],
}
CONTEXT_FIGURES = [("upstream_cpu_pct", "core 0: upstream CPU %"), ("loadgen_cpu_pct", "core 0: loadgen CPU %")]


def family(name: str) -> str:
    return name.split("@")[0]


def _median(vals: list[Any]) -> float | None:
    v = [x for x in vals if x is not None]
    return statistics.median(v) if v else None


def aggregate(measurements: list[dict[str, Any]], scenario_names: list[str]) -> dict[str, Any]:
    """{scenario: {variant: {key: median, key+"_added": median of per-round deltas}}}"""
    out: dict[str, Any] = {}
    for sc in scenario_names:
        by_v: dict[str, dict[int, dict[str, Any]]] = {}
        for m in measurements:
            if m["scenario"] == sc:
                by_v.setdefault(m["variant"], {})[m["round"]] = m
        keys = [k for k, _, _ in FIGURES[family(sc)]] + [k for k, _ in CONTEXT_FIGURES]
        keys += ["latency_p90_ms", "ttft_p90_ms", "itl_p90_ms", "tokens_per_s"]
        added = {k for k, _, kind in FIGURES[family(sc)] if kind == "added"} | {"latency_p50_ms", "latency_p99_ms"}
        res: dict[str, Any] = {}
        for v, rounds in by_v.items():
            d: dict[str, Any] = {"rounds": len(rounds)}
            for k in dict.fromkeys(keys):
                d[k] = _median([m.get(k) for m in rounds.values()])
            base = by_v.get(BASELINE.get(v, ""), {})
            for k in added:
                deltas = [
                    m[k] - base[r][k]
                    for r, m in rounds.items()
                    if r in base and m.get(k) is not None and base[r].get(k) is not None
                ]
                d[k + "_added"] = _median(deltas)
            res[v] = d
        out[sc] = res
    return out


def _fmt(v: float | None) -> str:
    if v is None:
        return "–"
    a = abs(v)
    if a >= 10000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _fmt_count(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:,.0f}" if float(v).is_integer() else f"{v:,.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "–"
    if b == 0:
        return "–" if a == 0 else "n/a"
    if b < 0 or a < 0:
        return "n/a"
    return f"{a / b:.2f}×"


def markdown_table(medians: dict[str, Any], scs: list[Scenario], rounds: int, have_nginx: bool) -> str:
    lines: list[str] = []
    head = "| figure | direct | nginx | teraproxy | teraproxy rewrite | teraproxy / nginx | rewrite / nginx |"
    for sc in scs:
        med = medians.get(sc.name, {})
        lines.append(f"### {sc.name}: {sc.title} (median of {rounds} round{'s' if rounds != 1 else ''})")
        lines.append("")
        lines.append(head)
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for key, label, kind in FIGURES[family(sc.name)]:
            k = key + "_added" if kind == "added" else key
            vals = {v: med.get(v, {}).get(k) for v in VARIANTS}
            fmt = _fmt_count if key == "errors" else _fmt
            if kind == "added":
                d = med.get("direct", {}).get(key)
                direct = f"({_fmt(d)})" if d is not None else "–"
            else:
                direct = "" if key.startswith("proxy_") else fmt(vals["direct"])
            n = vals["nginx"] if have_nginx else None
            tp, rw = vals["teraproxy"], vals["teraproxy_rw"]
            cells = [label, direct, fmt(n) if have_nginx else "n/a", fmt(tp), fmt(rw), _ratio(tp, n), _ratio(rw, n)]
            lines.append("| " + " | ".join(cells) + " |")
        for key, label in CONTEXT_FIGURES:
            vals = {v: med.get(v, {}).get(key) for v in VARIANTS}
            lines.append(
                f"| {label} | {_fmt(vals['direct'])} | {_fmt(vals['nginx'])} | {_fmt(vals['teraproxy'])} | "
                f"{_fmt(vals['teraproxy_rw'])} | | |"
            )
        lines.append("")
    lines.append(
        "Added figures: the variant minus its direct baseline in the same round (direct column: the baseline "
        "itself, in parentheses); teraproxy rewrite is compared with a direct run against the reasoning_content "
        "upstream. Ratios: teraproxy (or rewrite) / nginx; lower is better except requests/s and frames/s."
    )
    return "\n".join(lines)


def write_chart(path: Path, medians: dict[str, Any], measurements: list[dict[str, Any]], scs: list[Scenario]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart (pip install matplotlib)", file=sys.stderr)
        return False
    panels: list[tuple[str, str, str, str]] = []
    for sc in scs:
        fam = family(sc.name)
        picks = {
            "S1": [
                ("requests_per_s", "requests/s", "abs"),
                ("proxy_cpu_us_per_request", "proxy CPU µs/request", "abs"),
            ],
            "S2": [
                ("frames_per_s", "frames/s", "abs"),
                ("proxy_cpu_s_per_100k_frames", "proxy CPU s/100k frames", "abs"),
            ],
            "S3": [("itl_p99_ms", "inter-token p99 added (ms)", "added"), ("proxy_cpu_pct", "proxy CPU %", "abs")],
        }[fam]
        for key, label, kind in picks:
            panels.append((sc.name, key, label, kind))
    cols = 2
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(11, 3.2 * rows), squeeze=False)
    colors = {
        "direct": "#999999",
        "nginx": "#009639",
        "teraproxy": "#1f77b4",
        "direct_rc": "#cccccc",
        "teraproxy_rw": "#ff7f0e",
    }
    for ax, (scn, key, label, kind) in zip(list(axes.flat)[: len(panels)], panels, strict=True):
        med = medians.get(scn, {})
        names, keys, vals, errs_lo, errs_hi = [], [], [], [], []
        for v in VARIANTS:
            if v not in med:
                continue
            if kind == "added" and v not in BASELINE:
                continue
            if key.startswith("proxy_") and v not in PROXIES:
                continue
            val = med[v].get(key + "_added" if kind == "added" else key)
            if val is None:
                continue
            raw: list[float] = [
                m[key] for m in measurements if m["scenario"] == scn and m["variant"] == v and m.get(key) is not None
            ]
            names.append(LABEL[v])
            keys.append(v)
            vals.append(val)
            if kind == "abs" and raw:
                errs_lo.append(max(val - min(raw), 0))
                errs_hi.append(max(max(raw) - val, 0))
            else:
                errs_lo.append(0)
                errs_hi.append(0)
        ax.bar(names, vals, yerr=[errs_lo, errs_hi], capsize=4, color=[colors[k] for k in keys])
        ax.set_title(f"{scn}: {label}", fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle("teraproxy vs nginx (median of rounds; bars: min–max)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def raise_nofile(n: int = 65536) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n if hard == resource.RLIM_INFINITY else min(n, hard)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        return soft
    return want


def start_phase(procs: Procs, run_dir: Path, phase: str, nginx: str | None, access_log: bool) -> dict[str, Target]:
    """Sims, nginx and both teraproxies for one upstream speed; returns the targets."""
    ph = PHASES[phase]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("PYTHONSTARTUP", None)
    py = sys.executable
    sims: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
    for name, field in (("plain", "none"), ("rc", "reasoning_content")):
        port = free_port()
        p = procs.start(
            f"{phase}-sim-{name}",
            [
                py,
                "-m",
                "teraproxy",
                "sim",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--model",
                MODEL,
                "--reasoning-field",
                field,
                "--ttft",
                "0",
                "--itl",
                str(ph["itl"]),
                "--tokens",
                str(ph["tokens"]),
            ],
            cpu=0,
            env=env,
        )
        sims[name] = (port, p)
    for name, (port, p) in sims.items():
        try:
            wait_http(f"http://127.0.0.1:{port}/health", p, f"sim {name}")
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n{procs.log_tail(f'{phase}-sim-{name}')}") from None

    targets = {
        "direct": Target("direct", f"http://127.0.0.1:{sims['plain'][0]}/v1", None, sims["plain"][1]),
        "direct_rc": Target("direct_rc", f"http://127.0.0.1:{sims['rc'][0]}/v1", None, sims["rc"][1]),
    }
    proxies: list[tuple[str, int, subprocess.Popen[bytes], str]] = []
    if nginx:
        ndir = run_dir / f"{phase}-nginx"
        ndir.mkdir()
        ndir.chmod(0o755)  # workers run as an unprivileged user when started by root
        port = free_port()
        conf = render_nginx_conf(ndir, port, sims["plain"][0], access_log)
        argv = [nginx, "-p", f"{ndir}/", "-c", str(conf), "-e", f"{ndir}/error.log", "-g", "daemon off;"]
        t = subprocess.run([*argv[:-2], "-t"], capture_output=True, text=True, timeout=30)
        if t.returncode != 0:
            raise RuntimeError(f"nginx -t failed:\n{t.stderr}")
        proxies.append(("nginx", port, procs.start(f"{phase}-nginx", argv, cpu=1), "nginx"))
    for name, emit, upstream in (("teraproxy", "passthrough", "plain"), ("teraproxy_rw", "both", "rc")):
        port = free_port()
        conf = teraproxy_conf(run_dir, f"{phase}-{name}", port, sims[upstream][0], emit, access_log)
        p = procs.start(f"{phase}-{name}", [py, "-m", "teraproxy", "serve", "--config", str(conf)], cpu=1, env=env)
        proxies.append((name, port, p, f"{phase}-{name}"))
    for name, port, p, logname in proxies:
        base = f"http://127.0.0.1:{port}/v1"
        try:
            wait_http(base + "/models", p, name)
            probe_chat(base, name)
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n{procs.log_tail(logname)}") from None
        up_proc = sims["rc"][1] if name == "teraproxy_rw" else sims["plain"][1]
        targets[name] = Target(name, base, p, up_proc)
    return targets


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


def select(all_scs: list[Scenario], spec: str) -> list[Scenario]:
    want = [s.strip() for s in spec.split(",") if s.strip()]
    out = [sc for sc in all_scs if sc.name in want or family(sc.name) in want]
    unknown = [w for w in want if not any(sc.name == w or family(sc.name) == w for sc in all_scs)]
    if unknown or not out:
        raise SystemExit(f"unknown scenario(s) {unknown or want}; have: {', '.join(sc.name for sc in all_scs)}")
    return out


def _on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


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
    have_nginx = nginx is not None
    per_request_timeout = 30.0 if a.quick else 120.0
    access_log = a.access_log == "on"

    run_dir = Path(tempfile.mkdtemp(prefix="teraproxy-compare-"))
    procs = Procs(run_dir, pin)
    measurements: list[dict[str, Any]] = []
    started = time.monotonic()
    failed: str | None = None
    try:
        for phase in ("fast", "slow"):
            phase_scs = [sc for sc in scs if sc.phase == phase]
            if not phase_scs:
                continue
            print(
                f"== phase {phase}: sim --itl {PHASES[phase]['itl']}: starting processes", file=sys.stderr, flush=True
            )
            targets = start_phase(procs, run_dir, phase, nginx, access_log)
            variants = [v for v in VARIANTS if v in targets]
            for rnd in range(a.rounds):
                order = variants[rnd % len(variants) :] + variants[: rnd % len(variants)]
                for sc in phase_scs:
                    for v in order:
                        t0 = time.monotonic()
                        m = measure(targets[v], sc, rnd, per_request_timeout)
                        measurements.append(m)
                        print(
                            f"   round {rnd + 1}/{a.rounds} {sc.name:<8} {v:<13} "
                            f"req/s {_fmt(m['requests_per_s']):>8} frames/s {_fmt(m['frames_per_s']):>8} "
                            f"p50 {_fmt(m['latency_p50_ms']):>7} ms ttft99 {_fmt(m['ttft_p99_ms']):>7} "
                            f"itl99 {_fmt(m['itl_p99_ms']):>6} err {m['errors']} "
                            f"cpu {_fmt(m.get('proxy_cpu_pct'))}% ({time.monotonic() - t0:.1f}s)",
                            file=sys.stderr,
                            flush=True,
                        )
            for name, p in list(procs.procs):
                if p.poll() is not None:
                    raise RuntimeError(f"{name} died during the run:\n{procs.log_tail(name)}")
            procs.stop_all()
    except (RuntimeError, OSError) as e:
        failed = str(e)
        print(f"compare: {e}", file=sys.stderr)
    finally:
        procs.stop_all()
        if a.keep_run_dir or failed:
            print(f"run dir kept: {run_dir}", file=sys.stderr)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)

    done_names = [sc.name for sc in scs]
    medians = aggregate(measurements, done_names)
    table = markdown_table(medians, scs, a.rounds, have_nginx)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta = {
        "time": stamp,
        "elapsed_s": time.monotonic() - started,
        "quick": a.quick,
        "rounds": a.rounds,
        "pinned": pin,
        "cpus": os.cpu_count(),
        "nofile": nofile,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "nginx": nginx_version(nginx) if nginx else None,
        "access_log": access_log,
        "failed": failed,
    }
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
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
