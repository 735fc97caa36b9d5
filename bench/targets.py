"""What bench/compare.py and bench/wrk_bench.py measure: the variants (direct, nginx, teraproxy,
teraproxy rewrite), the `teraproxy sim` upstreams behind them, nginx (found or installed, its config
rendered from bench/nginx.conf) and the teraproxy configs, started for one upstream speed (phase).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import orjson

from bench.procs import Procs, child_env, free_port, wait_http

REPO = Path(__file__).resolve().parent.parent
MODEL = "Qwen/Qwen3-8B"
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
# sim --itl and --tokens per phase: "fast" for S1/S2, "slow" (paced tokens) for S3
PHASES = {"fast": {"itl": 0, "tokens": 256}, "slow": {"itl": 20, "tokens": 128}}


@dataclass
class Target:
    variant: str
    url: str  # base, .../v1
    proxy: subprocess.Popen[bytes] | None
    upstream: subprocess.Popen[bytes]
    cacert: str | None = None  # an https url: the CA to verify it against (bench/tls_bench.py)


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
        raise RuntimeError("bench/nginx.conf has a placeholder bench/targets.py does not fill")
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

Sims = dict[str, tuple[int, subprocess.Popen[bytes]]]


def _start_sims(procs: Procs, phase: str, env: dict[str, str]) -> Sims:
    """The plain sim and the one that streams reasoning_content, both ready."""
    ph = PHASES[phase]
    sims: Sims = {}
    for name, field in (("plain", "none"), ("rc", "reasoning_content")):
        port = free_port()
        p = procs.start(
            f"{phase}-sim-{name}",
            [
                sys.executable,
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
    return sims


def _start_nginx(procs: Procs, run_dir: Path, phase: str, nginx: str, upstream: int, access_log: bool,
                 ) -> tuple[int, subprocess.Popen[bytes]]:
    ndir = run_dir / f"{phase}-nginx"
    ndir.mkdir()
    ndir.chmod(0o755)  # workers run as an unprivileged user when started by root
    port = free_port()
    conf = render_nginx_conf(ndir, port, upstream, access_log)
    argv = [nginx, "-p", f"{ndir}/", "-c", str(conf), "-e", f"{ndir}/error.log", "-g", "daemon off;"]
    t = subprocess.run([*argv[:-2], "-t"], capture_output=True, text=True, timeout=30)
    if t.returncode != 0:
        raise RuntimeError(f"nginx -t failed:\n{t.stderr}")
    return port, procs.start(f"{phase}-nginx", argv, cpu=1)


def start_phase(procs: Procs, run_dir: Path, phase: str, nginx: str | None, access_log: bool) -> dict[str, Target]:
    """Sims, nginx and both teraproxies for one upstream speed; returns the targets."""
    env = child_env()
    sims = _start_sims(procs, phase, env)
    targets = {
        "direct": Target("direct", f"http://127.0.0.1:{sims['plain'][0]}/v1", None, sims["plain"][1]),
        "direct_rc": Target("direct_rc", f"http://127.0.0.1:{sims['rc'][0]}/v1", None, sims["rc"][1]),
    }
    proxies: list[tuple[str, int, subprocess.Popen[bytes], str]] = []
    if nginx:
        port, p = _start_nginx(procs, run_dir, phase, nginx, sims["plain"][0], access_log)
        proxies.append(("nginx", port, p, "nginx"))
    for name, emit, upstream in (("teraproxy", "passthrough", "plain"), ("teraproxy_rw", "both", "rc")):
        port = free_port()
        conf = teraproxy_conf(run_dir, f"{phase}-{name}", port, sims[upstream][0], emit, access_log)
        argv = [sys.executable, "-m", "teraproxy", "serve", "--config", str(conf)]
        proxies.append((name, port, procs.start(f"{phase}-{name}", argv, cpu=1, env=env), f"{phase}-{name}"))
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
