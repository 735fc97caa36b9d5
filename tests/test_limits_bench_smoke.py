"""bench/limits_bench.py end to end, briefly: every variant starts, is checked to be limited (or not), is measured."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_limits_bench_runs(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "bench/limits_bench.py", "--rounds", "1", "--duration", "0.5",
                        "--concurrency", "4", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=110)
    assert r.returncode == 0, r.stdout + r.stderr
    (result,) = tmp_path.glob("limits-*.json")
    doc = orjson.loads(result.read_bytes())
    assert {row["variant"] for row in doc["rows"]} == {"unlimited", "memory", "redis", "memory_all", "redis_all"}
    assert all(row["errors"] == 0 and row["cpu_us_per_request"] > 0 for row in doc["rows"])
    (table,) = tmp_path.glob("limits-*.md")
    text = table.read_text()
    assert text.count("\n| ") == 6  # header's rule and five variants
    assert "limiter's own work per request" in text
