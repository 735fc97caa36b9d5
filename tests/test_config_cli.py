"""Config validation and the command line: one line per problem naming the key, exit code 2."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from teraproxy.config import ConfigError, parse_config, parse_duration, parse_size
from teraproxy.errors import ProxyError, all_error_classes
from tests.conftest import MODEL, ROOT, free_port, run_cli, write_config

GOOD: dict[str, Any] = {"listen": "127.0.0.1:8080", "auth": "off",
                        "models": [{"id": MODEL, "replicas": [{"url": "http://127.0.0.1:8001"}]}]}


def problems(raw: Any) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        parse_config(raw)
    return ei.value.problems


def test_minimal_config_and_defaults() -> None:
    c = parse_config(GOOD)
    assert c.listen.port == 8080 and not c.auth.enabled and c.admin_listen is None
    assert c.models[0].replicas[0].url == "http://127.0.0.1:8001" and c.models[0].reasoning == "both"
    assert c.timeouts.keepalive == 30 and c.limits.max_body == 8 * 1024 * 1024


def test_auth_must_be_written_down() -> None:
    raw = {k: v for k, v in GOOD.items() if k != "auth"}
    assert problems(raw) == ["auth: missing: write `auth: off` for open access, or list keys"]
    assert not parse_config({**GOOD, "auth": False}).auth.enabled  # YAML's bare `off`
    assert not parse_config({**GOOD, "auth": "off"}).auth.enabled


@pytest.mark.parametrize("over, expected", [
    ({"models": [{"id": "a", "replicas": [{"url": "http://x:1"}]},
                 {"id": "b", "replicas": [{"url": "ftp://nope"}]}]},
     "models[1].replicas[0].url: not an http(s) URL"),
    ({"listen": "8080"}, "listen: must be host:port"),
    ({"lisen": "x"}, "lisen: unknown key"),
    ({"timeouts": {"connect": "5 parsecs"}}, "timeouts.connect: not a duration"),
    ({"timeouts": {"idel": 3}}, "timeouts.idel: unknown key"),
    ({"limits": {"max_body": "lots"}}, "limits.max_body: not a size"),
    ({"auth": {"keys": [{"name": "a", "sha256": "abc"}]}}, "auth.keys[0].sha256: must be the 64-digit hex"),
    ({"auth": {"keys": []}}, "auth.keys: must be a non-empty list"),
    ({"models": []}, "models: must be a non-empty list"),
    ({"models": [{"id": "a", "replicas": [{"url": "http://x:1", "weight": 0}]}]},
     "models[0].replicas[0].weight: must be greater than zero"),
    ({"models": [{"id": "a", "replicas": [{"url": "http://x:1/v1"}]}]},
     "models[0].replicas[0].url: must be scheme://host:port only"),
    ({"models": [{"id": "a", "reasoning": "loud", "replicas": [{"url": "http://x:1"}]}]},
     "models[0].reasoning: must be one of"),
    ({"models": [{"id": "a", "replicas": [{"url": "http://x:1"}]}, {"id": "a", "replicas": [{"url": "http://y:1"}]}]},
     "models[1].id: duplicate model id"),
    ({"health": {"fall": 0}}, "health.fall: must be an integer >= 1"),
    ({"models": [{"id": "a", "replicas": [{"url": "http://x:1", "api_key": "k\r\nX-Evil: 1"}]}]},
     "models[0].replicas[0].api_key: must be a non-empty string of printable ASCII"),
    ({"retry": {"budget": 2}}, "retry.budget: must be a number between 0 and 1"),
    ({"admin_listen": "127.0.0.1:8080"}, "admin_listen: must differ from listen"),
])
def test_each_problem_names_its_key(over: dict[str, Any], expected: str) -> None:
    found = problems({**GOOD, **over})
    assert any(p.startswith(expected) for p in found), found


def test_all_problems_reported_at_once() -> None:
    found = problems({"listen": "x", "auth": {"keys": [{"sha256": "zz"}]}, "models": [{"replicas": []}], "foo": 1})
    assert len(found) >= 4
    assert {p.split(":")[0] for p in found} >= {"listen", "foo", "auth.keys[0].name", "models[0].id"}


def test_durations_and_sizes() -> None:
    assert parse_duration("250ms") == 0.25 and parse_duration("5s") == 5 and parse_duration("2m") == 120
    assert parse_duration(3) == 3.0 and parse_duration("1.5") == 1.5
    assert parse_size("8MiB") == 8 * 1024**2 and parse_size(100) == 100 and parse_size("1kb") == 1000
    for bad in ("5 parsecs", "-1s", True):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_every_error_class_has_status_and_openai_type() -> None:
    classes = all_error_classes()
    assert len(classes) >= 12
    statuses = {}
    for cls in classes:
        assert 400 <= cls.status < 600 and cls.type and cls.code, cls
        e = cls("boom")
        import orjson

        doc = orjson.loads(e.body())
        assert doc == {"error": {"message": "boom", "type": cls.type, "param": None, "code": cls.code}}
        statuses.setdefault(cls.code, cls.status)
        assert statuses[cls.code] == cls.status  # one code, one status
    assert issubclass(classes[0], Exception) and classes[0] is ProxyError


# -- command line (real subprocesses) ----------------------------------------------------------
def test_check_ok_and_bad(tmp_path: Path) -> None:
    ok = run_cli("check", "--config", str(write_config(tmp_path / "ok.yaml", GOOD)))
    assert ok.returncode == 0 and ok.stdout.startswith("ok:")
    bad_raw = {**GOOD, "timeouts": {"connect": "soon"}, "models": [{"id": "a", "replicas": [{"url": "nope"}]}]}
    bad = run_cli("check", "--config", str(write_config(tmp_path / "bad.yaml", bad_raw)))
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert sorted(lines) == ["teraproxy: models[0].replicas[0].url: not an http(s) URL",
                             "teraproxy: timeouts.connect: not a duration (use seconds or e.g. 250ms, 5s, 2m): 'soon'"]
    assert "Traceback" not in bad.stderr



def test_version_names_the_build() -> None:
    from teraproxy import __version__, build

    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout == f"teraproxy {__version__} ({build()})\n"
    assert build() in ("compiled", "interpreted")  # this checkout: not partly compiled, nothing stale

def test_bad_inputs_exit_2_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("listen: [unclosed\n")
    for args in (["serve", "--config", str(tmp_path / "missing.yaml")],
                 ["serve", "--config", str(tmp_path / "broken.yaml")],
                 ["check", "--config", str(tmp_path / "broken.yaml")],
                 ["serve"]):
        r = run_cli(*args, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


def test_serve_from_env_and_port_in_use(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "c.yaml", {**GOOD, "listen": f"127.0.0.1:{port}", "health": {"enabled": False}})
    env = {"PATH": "/usr/bin:/bin", "TERAPROXY_CONFIG": str(cfg)}
    p = subprocess.Popen([sys.executable, "-m", "teraproxy", "serve"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs.append(p)
    _wait_http(f"http://127.0.0.1:{port}/v1/models")
    second = run_cli("serve", env=env)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"teraproxy: listen: cannot listen on 127.0.0.1:{port}: address already in use"]
    p.terminate()
    assert p.wait(10) == 0  # SIGTERM is a clean shutdown


def test_sim_cli_and_key_command(procs: list[subprocess.Popen[bytes]]) -> None:
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "teraproxy", "sim", "--port", str(port), "--model", "x/y",
                          "--tokens", "3"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs.append(p)
    _wait_http(f"http://127.0.0.1:{port}/health")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models") as resp:
        assert b'"id":"x/y"' in resp.read()
    k = run_cli("key", "--name", "ops")
    token = k.stdout.split(": ", 1)[1].splitlines()[0]
    assert token.startswith("sk-tera-")
    h = run_cli("key", "--hash", token)
    assert h.stdout.strip() in k.stdout


def _wait_http(url: str, timeout: float = 15) -> None:
    t0 = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if time.monotonic() - t0 > timeout:
                raise
            time.sleep(0.05)


def test_modules_import_alone() -> None:
    mods = [p.stem for p in (ROOT / "teraproxy").glob("*.py") if p.stem != "__main__"]
    assert len(mods) >= 12
    for m in mods:
        r = subprocess.run([sys.executable, "-c", f"import teraproxy.{m}"], capture_output=True, text=True,
                           cwd=ROOT, timeout=30)
        assert r.returncode == 0, (m, r.stderr)
    r = subprocess.run([sys.executable, "-c", "import sys, teraproxy.sse; "
                        "assert not any(k.startswith(('aiohttp', 'asyncio')) for k in sys.modules), 'io in sse'"],
                       capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert r.returncode == 0, r.stderr


def test_every_shipped_config_checks() -> None:
    """README promises `teraproxy check --config conf/teraproxy.yaml` passes: on a bare environment too."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    files = sorted((ROOT / "conf").glob("*.y*ml"))
    assert len(files) >= 2
    for path in files:
        r = run_cli("check", "--config", str(path), env=env)
        assert r.returncode == 0 and r.stdout.startswith("ok:"), (path.name, r.stderr)
        assert "Traceback" not in r.stderr


def test_unset_api_key_env_warns_in_check_and_stops_serve(tmp_path: Path) -> None:
    import os

    raw = {**GOOD, "listen": f"127.0.0.1:{free_port()}",
           "models": [{"id": MODEL, "replicas": [{"url": "http://127.0.0.1:8001", "api_key_env": "TP_TEST_UNSET"}]}]}
    cfg = str(write_config(tmp_path / "c.yaml", raw))
    env = {k: v for k, v in os.environ.items() if k != "TP_TEST_UNSET"}
    check = run_cli("check", "--config", cfg, env=env)
    assert check.returncode == 0 and check.stdout.startswith("ok:")
    assert check.stderr.strip().splitlines() == [
        "teraproxy: warning: models[0].replicas[0].api_key_env: environment variable 'TP_TEST_UNSET' is not set "
        "(serve will refuse to start without it)"]
    serve = run_cli("serve", "--config", cfg, env=env)
    assert serve.returncode == 2
    assert serve.stderr.strip().splitlines() == [
        "teraproxy: models[0].replicas[0].api_key_env: environment variable 'TP_TEST_UNSET' is not set"]
    ok = run_cli("check", "--config", cfg, env={**env, "TP_TEST_UNSET": "sk-replica"})
    assert ok.returncode == 0 and ok.stderr == ""


@pytest.mark.parametrize("replica, key_path", [
    ({"api_key": "ключ-реплики"}, "models[0].replicas[0].api_key"),
    ({"api_key": "caf\u00e9"}, "models[0].replicas[0].api_key"),  # Latin-1, but aiohttp would send UTF-8
    ({"api_key": "sk-ok\n"}, "models[0].replicas[0].api_key"),
    ({"api_key_env": "TP_TEST_KEY"}, "models[0].replicas[0].api_key_env"),
])
def test_replica_key_not_header_safe_exits_2(tmp_path: Path, replica: dict[str, str], key_path: str) -> None:
    """A key that cannot go into an Authorization header is a config error, for check and serve alike."""
    import os

    raw = {**GOOD, "listen": f"127.0.0.1:{free_port()}",
           "models": [{"id": MODEL, "replicas": [{"url": "http://127.0.0.1:8001", **replica}]}]}
    cfg = str(write_config(tmp_path / "c.yaml", raw))
    env = {**os.environ, "TP_TEST_KEY": "ключ"}
    for cmd in ("check", "serve"):
        r = run_cli(cmd, "--config", cfg, env=env, timeout=15)
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"teraproxy: {key_path}: "), (cmd, r.stderr)
        assert "printable ASCII" in lines[0] and "ключ" not in lines[0] and "Traceback" not in r.stderr


def test_refuses_pure_python_http_parser(tmp_path: Path) -> None:
    import os

    cfg = write_config(tmp_path / "c.yaml", {**GOOD, "listen": f"127.0.0.1:{free_port()}"})
    r = run_cli("serve", "--config", str(cfg), env={**os.environ, "AIOHTTP_NO_EXTENSIONS": "1"})
    assert r.returncode == 2 and "pure-Python HTTP parser" in r.stderr and "Traceback" not in r.stderr


def _free_demo_port() -> int:
    """A port p with the demo's ports all free now: p, its admin port p + 1 and its replicas' p + 11
    and p + 12 (free_port alone may give one whose neighbour is some connection's ephemeral port)."""
    for _ in range(100):
        port = free_port()
        if all(_bindable(port + k) for k in (1, 11, 12)):
            return port
    raise AssertionError("no free port p with p + 1, p + 11 and p + 12 free on 127.0.0.1")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_demo_answers_its_own_curl_line_and_the_sdk(procs: list[subprocess.Popen[bytes]]) -> None:
    import shutil

    from openai import OpenAI

    port = _free_demo_port()
    p = subprocess.Popen([sys.executable, "-m", "teraproxy", "demo", "--port", str(port)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs.append(p)
    assert p.stdout is not None
    lines: list[str] = []
    t0 = time.monotonic()
    while not any(line.lstrip().startswith("curl -sN") for line in lines):
        line = p.stdout.readline().decode()
        assert line or p.poll() is None, p.stderr.read() if p.stderr else ""
        lines.append(line)
        assert time.monotonic() - t0 < 20
    curl = next(line.strip() for line in lines if line.lstrip().startswith("curl -sN"))
    _wait_http(f"http://127.0.0.1:{port}/v1/models")
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="demo", max_retries=3)
    try:
        answer = client.chat.completions.create(model="Qwen/Qwen3-8B", messages=[{"role": "user", "content": "Hi"}])
    finally:
        client.close()
    assert answer.choices[0].message.content
    if shutil.which("curl"):
        out = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=20)
        assert out.returncode == 0 and out.stdout.rstrip().endswith("data: [DONE]"), out
