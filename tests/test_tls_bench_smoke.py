"""bench/tls_bench.py --quick end to end: a CA and certificate are made, nginx and teraproxy serve
HTTPS with them, the load generator trusts that CA, every variant is measured without an error."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from .test_compare_smoke import _have_nginx, _leftover_children

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_tls_bench_quick(tmp_path: Path) -> None:
    if not _have_nginx() or shutil.which("openssl") is None:
        pytest.skip("needs nginx and the openssl CLI")
    out_json = tmp_path / "tls.json"
    p = subprocess.Popen([sys.executable, str(ROOT / "bench" / "tls_bench.py"), "--quick", "--json", str(out_json)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        out_b, err_b = p.communicate(timeout=75)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGTERM)  # it stops its own processes on SIGTERM
        p.communicate(timeout=20)
        pytest.fail("bench/tls_bench.py --quick took longer than 75 s")
    out, err = out_b.decode(), err_b.decode()
    assert p.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    assert _leftover_children(p.pid) == []
    assert "| variant | requests/s | proxy CPU µs/request | ratio to nginx |" in out
    for label in ("direct (plain HTTP)", "nginx, TLS", "teraproxy, TLS"):
        assert f"| {label} |" in out
    doc = orjson.loads(out_json.read_bytes())
    assert doc["tls"]["nginx_tls"].startswith("TLSv1.") and doc["tls"]["teraproxy_tls"].startswith("TLSv1.")
    for v in ("direct", "nginx_tls", "teraproxy_tls"):
        m = doc["medians"][v]
        assert m["errors"] == 0 and m["requests_per_s"] > 0, (v, doc["measurements"])
    for v in ("nginx_tls", "teraproxy_tls"):
        assert doc["medians"][v]["proxy_cpu_us_per_request"] > 0
