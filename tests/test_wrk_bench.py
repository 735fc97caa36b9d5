"""bench/wrk_bench.py's reading of wrk's report and its Lua body (the script itself is a benchmark,
not a timed test)."""

from __future__ import annotations

from pathlib import Path

from bench import wrk_bench

_REPORT = """Running 4s test @ http://127.0.0.1:1/v1/chat/completions
  1 threads and 64 connections
  12790 requests in 4.00s, 12.84MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec:   3197.10
"""


def test_parse_wrk_counts_requests_and_failures() -> None:
    assert wrk_bench.parse_wrk(_REPORT) == (12790, 8)
    assert wrk_bench.parse_wrk("  10 requests in 1.00s, 1MB read\n") == (10, 0)


def test_lua_body_is_the_chat_request(tmp_path: Path) -> None:
    text = wrk_bench.lua_script(tmp_path / "c.lua", 64).read_text()
    assert 'wrk.method = "POST"' in text and '"max_tokens":64' in text and "Content-Type" in text
