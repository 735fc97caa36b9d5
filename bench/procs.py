"""Process control for the benchmarks: start and stop pinned children, read their CPU time and RSS
from /proc, find free ports, wait for HTTP readiness, raise the open-file limit.

Used by bench/compare.py, wrk_bench.py, load_bench.py, limits_bench.py and the load generator.
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")

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
    # Children die with the benchmark even if it is killed with SIGKILL.
    if _libc is not None:
        _libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Procs:
    """Every process a benchmark started; stop_all() ends them, by pid."""

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


def child_env() -> dict[str, str]:
    """This environment with the repository first on PYTHONPATH, for `python -m teraproxy` children."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("PYTHONSTARTUP", None)
    return env


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
