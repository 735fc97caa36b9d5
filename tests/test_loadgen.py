"""bench/loadgen.py: its statistics (pure functions) and end-to-end runs against `teraproxy sim`."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.conftest import stop_process

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import loadgen  # noqa: E402
from bench.lgclient import Options  # noqa: E402
from bench.lgframes import CONTENT, REASONING, analyze_reads, classify_frame, is_done_frame, stream_error_kind  # noqa: E402
from bench.lgreport import format_summary  # noqa: E402
from bench.lgstats import Results, percentile, percentiles  # noqa: E402

MODEL = "Qwen/Qwen3-8B"


# -- percentiles -------------------------------------------------------------------------------
def test_percentile_linear_interpolation_hand_computed() -> None:
    v = [1.0, 2.0, 3.0, 4.0]
    assert percentile(v, 0) == 1.0
    assert percentile(v, 100) == 4.0
    assert percentile(v, 50) == pytest.approx(2.5)  # rank 1.5
    assert percentile(v, 90) == pytest.approx(3.7)  # rank 2.7
    assert percentile(v, 99) == pytest.approx(3.97)  # rank 2.97
    assert percentile([15, 20, 35, 40, 50], 40) == pytest.approx(29.0)  # rank 1.6: 20 + 0.6 * 15
    assert percentile([50, 15, 40, 20, 35], 40) == pytest.approx(29.0)  # unsorted input
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(v, 101)


def test_percentiles_dict() -> None:
    d = percentiles(range(101))  # 0..100: pN == N
    assert d == {"p50": 50.0, "p90": 90.0, "p99": 99.0}
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}


# -- frames ------------------------------------------------------------------------------------
ROLE = b'data: {"id":"c1","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}'


def tok(text: str, key: str = "content") -> bytes:
    return b'data: {"id":"c1","choices":[{"index":0,"delta":{"' + key.encode() + b'":' + orjson.dumps(text) + b"}}]}"


def test_classify_frame() -> None:
    assert classify_frame(ROLE) == 0
    assert classify_frame(tok("Hi")) == CONTENT
    assert classify_frame(tok('"', "content")) == CONTENT  # escaped quote is text
    assert classify_frame(tok("hmm", "reasoning_content")) == REASONING
    assert classify_frame(tok("hmm", "reasoning")) == REASONING
    both = b'data: {"choices":[{"delta":{"reasoning":"x","reasoning_content":"x"}}]}'
    assert classify_frame(both) == REASONING
    assert classify_frame(b'data: {"choices":[{"delta":{"content":null},"finish_reason":"stop"}]}') == 0
    assert classify_frame(b'data: {"choices":[{"index":0,"text":" a","logprobs":null}]}') == CONTENT
    assert classify_frame(b'data: {"choices":[{"index":0,"text":"","finish_reason":"length"}]}') == 0
    assert classify_frame(b'data: {"choices":[],"usage":{"completion_tokens":3}}') == 0
    # json.dumps-style spacing
    assert classify_frame(b'data: {"choices": [{"delta": {"content": "x"}}]}') == CONTENT
    assert classify_frame(b'data: {"choices": [{"delta": {"content": ""}}]}') == 0


def test_done_detection() -> None:
    assert is_done_frame(b"data: [DONE]")
    assert is_done_frame(b"data:[DONE]")
    assert is_done_frame(b"data: [DONE] ")
    assert not is_done_frame(b"data: [DONE")
    assert not is_done_frame(tok("[DONE]"))


def test_ttft_and_gaps_from_reads_with_split_frames() -> None:
    start = 1.0
    reads = [
        (1.010, ROLE + b"\n\n"),  # role frame: not a token
        (1.020, tok("Hel")[:30]),  # first half of a frame
        (1.025, tok("Hel")[30:] + b"\n\n" + tok(" wor") + b"\n\n"),  # completes 2 tokens at 1.025
        (1.040, tok("hmm", "reasoning_content") + b"\n"),  # split between the two newlines
        (1.050, b"\n" + tok("!") + b"\n\ndata: [DO"),  # completes 2 more at 1.050; [DONE] split
        (1.060, b"NE]\n\n"),
    ]
    p = analyze_reads(start, reads)
    assert p.frames == 5
    assert p.tokens == 4
    assert p.reasoning_tokens == 1
    assert p.ttft == pytest.approx(0.025)
    assert p.gaps == pytest.approx([0.0, 0.025, 0.0])
    assert p.done and not p.partial
    assert stream_error_kind(p) is None


def test_every_byte_split_gives_the_same_counts() -> None:
    data = ROLE + b"\n\n" + b"".join(tok(f"t{i}") + b"\n\n" for i in range(5)) + b"data: [DONE]\n\n"
    p = analyze_reads(0.0, [(i * 0.001, data[i : i + 1]) for i in range(len(data))])
    assert (p.frames, p.tokens, p.done) == (6, 5, True)
    assert len(p.gaps) == 4 and all(g > 0 for g in p.gaps)


def test_stream_without_done_is_truncated() -> None:
    p = analyze_reads(0.0, [(0.1, ROLE + b"\n\n" + tok("a") + b"\n\n")])
    assert p.frames == 2 and p.tokens == 1 and not p.done
    assert stream_error_kind(p) == "truncated"
    # ends in the middle of a frame
    p = analyze_reads(0.0, [(0.1, tok("a") + b"\n\n" + tok("b")[:20])])
    assert p.partial and p.tokens == 1 and stream_error_kind(p) == "truncated"
    # [DONE] without the final blank line still counts as done
    p = analyze_reads(0.0, [(0.1, tok("a") + b"\n\ndata: [DONE]\n")])
    assert p.done and stream_error_kind(p) is None


def test_crlf_comments_and_error_frames() -> None:
    data = b": ping\r\n\r\n" + tok("a") + b"\r\n\r\n" + b"event: x\r\n" + tok("b") + b"\r\n\r\ndata: [DONE]\r\n\r\n"
    p = analyze_reads(0.0, [(0.1, data[:17]), (0.2, data[17:])])
    assert (p.frames, p.tokens, p.done) == (2, 2, True)
    err = b'data: {"object":"error","message":"boom","type":"InternalServerError","code":500}\n\n'
    p = analyze_reads(0.0, [(0.1, tok("a") + b"\n\n" + err + b"data: [DONE]\n\n")])
    assert stream_error_kind(p) == "stream_error"


def test_refuses_unbounded_runs() -> None:
    with pytest.raises(ValueError, match="unbounded"):
        Options(url="http://127.0.0.1:1/v1", model=MODEL).validate()
    with pytest.raises(SystemExit):
        loadgen.parse_args(["--url", "http://127.0.0.1:1/v1"])


# -- end to end against `teraproxy sim` ------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_sim(tmp: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    log = open(tmp / f"sim-{port}.log", "wb")
    try:
        p = subprocess.Popen(
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
                *args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    finally:
        log.close()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        if p.poll() is not None:
            raise RuntimeError(f"sim exited: {(tmp / f'sim-{port}.log').read_text()}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=1) as r:
                if r.status == 200:
                    return p, base + "/v1"
        except OSError:
            pass
        if time.monotonic() > deadline:
            p.kill()
            p.wait()
            raise RuntimeError("sim not ready after 20 s")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    if not (ROOT / "teraproxy" / "sim.py").exists():
        pytest.skip("teraproxy/sim.py does not exist yet")
    tmp = tmp_path_factory.mktemp("sims")
    started: list[subprocess.Popen[bytes]] = []
    urls: dict[str, str] = {}
    try:
        for name, args in {
            "plain": ("--reasoning-field", "none", "--itl", "1", "--tokens", "16"),
            "both": ("--reasoning-field", "both", "--itl", "0", "--tokens", "16"),
            "reset": ("--reasoning-field", "none", "--itl", "0", "--tokens", "16", "--reset-after", "3"),
        }.items():
            p, url = _start_sim(tmp, *args)
            started.append(p)
            urls[name] = url
        yield urls
    finally:
        for p in started:
            stop_process(p)


def _run(**kw: object) -> Results:
    opts = Options(**{"model": MODEL, "quiet": True, "timeout": 20, **kw})  # type: ignore[arg-type]
    return loadgen.run_sync(opts)


def test_e2e_stream_counts(sims: dict[str, str]) -> None:
    res = _run(url=sims["plain"], concurrency=4, requests=40, stream=True, max_tokens=8)
    assert len(res.records) == 40
    assert res.errors() == {}
    for r in res.records:
        assert r.status == 200 and r.error is None and r.done is True
        assert r.tokens == 8 and r.reasoning_tokens == 0
        assert r.frames == r.tokens + 1  # vLLM's role-only first frame carries no token
        assert len(r.gaps) == 7
        assert r.ttft is not None and r.latency is not None and 0 < r.ttft <= r.latency
    s = res.summary()
    assert s["requests_ok_window"] == 40 and s["window_completed"] == 40
    assert s["window_frames"] == 40 * 9 and s["window_tokens"] == 40 * 8
    assert s["itl_count"] == 40 * 7
    assert s["ttft"]["p50"] <= s["latency"]["p50"]
    assert s["itl"]["p50"] is not None and s["itl"]["p50"] > 0  # the sim waits 1 ms between tokens
    assert s["requests_per_s"] > 0 and s["tokens_per_s"] > 0


def test_e2e_usage_chunk_and_reasoning(sims: dict[str, str]) -> None:
    res = _run(url=sims["plain"], concurrency=2, requests=6, stream=True, max_tokens=8, include_usage=True)
    assert res.errors() == {}
    assert all(r.frames == r.tokens + 2 and r.tokens == 8 for r in res.records)  # + the usage chunk
    res = _run(url=sims["both"], concurrency=2, requests=6, stream=True, max_tokens=8)
    assert res.errors() == {}
    for r in res.records:
        # the sim thinks for a quarter of the answer; a frame with both fields is one token
        assert (r.frames, r.tokens, r.reasoning_tokens) == (9, 8, 2)


def test_e2e_non_stream_and_completions(sims: dict[str, str]) -> None:
    res = _run(url=sims["plain"], concurrency=8, requests=30, stream=False, max_tokens=5)
    assert len(res.records) == 30 and res.errors() == {}
    for r in res.records:
        assert r.tokens == 5 and r.frames == 0 and r.gaps == [] and r.done is None
        assert r.ttft == pytest.approx(r.latency)
    res = _run(url=sims["plain"], concurrency=3, requests=9, stream=True, max_tokens=4, endpoint="completions")
    assert res.errors() == {}
    assert all(r.frames == 4 and r.tokens == 4 and r.done for r in res.records)  # no role frame


def test_e2e_duration_bound(sims: dict[str, str]) -> None:
    t0 = time.monotonic()
    res = _run(url=sims["plain"], concurrency=3, duration=0.5, warmup=0.2, stream=True, max_tokens=4)
    took = time.monotonic() - t0
    assert took < 5
    s = res.summary()
    assert s["errors_total"] == 0
    assert 0 < s["requests_window"] < s["requests_total"]  # warm-up requests are left out
    assert s["window_s"] == pytest.approx(0.5, abs=0.15)
    # whichever bound comes first
    res = _run(url=sims["plain"], concurrency=2, duration=30, requests=5, max_tokens=2)
    assert len(res.records) == 5 and res.elapsed < 10


def test_e2e_error_kinds(sims: dict[str, str]) -> None:
    res = _run(url=sims["plain"], model="no/such-model", concurrency=2, requests=4)
    assert res.errors() == {"http_status": 4}
    assert all(r.status == 404 for r in res.records)
    res = _run(url=sims["reset"], concurrency=2, requests=4, stream=True, max_tokens=8)
    assert res.errors() == {"disconnected": 4}
    res = _run(url="http://127.0.0.1:" + str(_free_port()) + "/v1", concurrency=2, requests=3)
    assert res.errors() == {"connect": 3}
    assert "connect" in format_summary(res)


def test_cli_prints_table_and_writes_json(sims: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "raw.json"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "loadgen.py"),
            "--url",
            sims["plain"],
            "--model",
            MODEL,
            "-c",
            "2",
            "-n",
            "10",
            "--stream",
            "--max-tokens",
            "3",
            "--json",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    for word in ("requests/s", "tokens/s", "latency", "TTFT", "inter-token", "errors      0"):
        assert word in r.stdout
    doc = orjson.loads(out.read_bytes())
    assert len(doc["requests"]) == 10
    assert all(q["tokens"] == 3 and q["frames"] == 4 and q["done"] for q in doc["requests"])
    assert doc["summary"]["errors_total"] == 0


def test_max_tokens_range_option_parses_and_validates() -> None:
    opts, _ = loadgen.parse_args(["--url", "http://127.0.0.1:1/v1", "-n", "1", "--max-tokens-range", "8:56"])
    assert opts.max_tokens_range == (8, 56) and opts.seed == 0
    for bad in ("8", "a:b", "9:3", "0:4"):
        with pytest.raises(SystemExit):
            loadgen.parse_args(["--url", "http://127.0.0.1:1/v1", "-n", "1", "--max-tokens-range", bad])


def test_e2e_max_tokens_range_varies_lengths_repeatably(sims: dict[str, str]) -> None:
    # the sim (--tokens 16) stops at a request's max_tokens when that is lower: completion_tokens = the draw
    def lengths(seed: int) -> list[int]:
        res = _run(url=sims["plain"], concurrency=1, requests=30, max_tokens_range=(2, 12), seed=seed)
        assert [r.error for r in res.records] == [None] * 30
        return [r.tokens for r in sorted(res.records, key=lambda r: r.start)]

    a = lengths(1)
    assert all(2 <= n <= 12 for n in a) and len(set(a)) >= 5
    assert lengths(1) == a  # seeded: the same sequence again
    assert lengths(2) != a
    fixed = _run(url=sims["plain"], concurrency=2, requests=6, max_tokens=5)
    assert [r.tokens for r in fixed.records] == [5] * 6  # without a range: --max-tokens, as before
