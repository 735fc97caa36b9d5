"""bench/compare.py --quick end to end: processes start, every scenario is measured, results are written."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent
QUICK_SCENARIOS = ("S1", "S2", "S3@16")

slow = pytest.mark.slow  # registered in pyproject.toml; `-m "not slow"` deselects it


def _have_nginx() -> bool:
    return shutil.which("nginx") is not None or os.access("/usr/sbin/nginx", os.X_OK)


def _leftover_children(pid: int) -> list[int]:
    """Processes still parented to pid (compare.py's children must all be gone)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_bytes()
            except OSError:
                continue
            if int(stat[stat.rindex(b")") + 2 :].split()[1]) == pid:
                out.append(int(d))
    return out


@slow
@pytest.mark.timeout(180)
def test_compare_quick(tmp_path: Path) -> None:
    if not (ROOT / "teraproxy" / "sim.py").exists():
        pytest.skip("teraproxy/sim.py does not exist yet")
    p = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "compare.py"), "--quick", "--no-install", "--out", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        out_b, err_b = p.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGTERM)  # compare.py stops its own processes on SIGTERM
        try:
            p.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
        pytest.fail("bench/compare.py --quick took longer than 150 s")
    out, err = out_b.decode(), err_b.decode()
    assert p.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    assert _leftover_children(p.pid) == []

    # the table
    assert "| figure | direct | nginx | teraproxy | teraproxy rewrite | teraproxy / nginx | rewrite / nginx |" in out
    for sc in QUICK_SCENARIOS:
        assert f"### {sc}:" in out
    for label in (
        "requests/s",
        "proxy CPU µs / request",
        "frames/s",
        "proxy CPU s / 100k frames",
        "inter-token p99 added (ms)",
        "proxy peak RSS (MiB)",
    ):
        assert label in out

    # the raw results
    files = list(tmp_path.glob("compare-*.json"))
    assert len(files) == 1
    doc = orjson.loads(files[0].read_bytes())
    assert doc["meta"]["failed"] is None
    med = doc["medians"]
    variants = ["direct", "teraproxy", "direct_rc", "teraproxy_rw"] + (["nginx"] if _have_nginx() else [])
    for sc in QUICK_SCENARIOS:
        for v in variants:
            m = med[sc][v]
            assert m["rounds"] == 1, (sc, v)
            assert m["errors"] == 0, (sc, v, doc["measurements"])
        for v in ("teraproxy", "teraproxy_rw") + (("nginx",) if _have_nginx() else ()):
            m = med[sc][v]
            assert m["proxy_cpu_pct"] is not None and m["proxy_cpu_pct"] > 0  # a second of load: never 0
            assert m["proxy_peak_rss_mib"] is not None and m["proxy_peak_rss_mib"] > 0
    assert med["S1"]["teraproxy"]["requests_per_s"] > 0
    assert med["S1"]["teraproxy"]["proxy_cpu_us_per_request"] is not None
    assert med["S2"]["teraproxy_rw"]["frames_per_s"] > 0
    assert med["S2"]["teraproxy_rw"]["proxy_cpu_s_per_100k_frames"] is not None
    assert med["S3@16"]["teraproxy"]["itl_p99_ms_added"] is not None
    assert med["S3@16"]["teraproxy_rw"]["ttft_p50_ms_added"] is not None
    if not _have_nginx():
        assert "nginx" not in med["S1"]
    assert len(doc["measurements"]) == len(QUICK_SCENARIOS) * len(variants)
    assert (tmp_path / files[0].name.replace(".json", ".md")).exists()
