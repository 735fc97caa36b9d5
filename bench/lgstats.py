"""The load generator's figures (bench/loadgen.py): percentiles, one Record per request, and the
Results of a run with its summary."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


def percentile(values: Sequence[float], p: float, *, presorted: bool = False) -> float | None:
    """Percentile with linear interpolation between closest ranks.

    Same as numpy's default ("linear") method: rank = p/100 * (n-1).
    Returns None for an empty sequence.
    """
    if not 0 <= p <= 100:
        raise ValueError(f"percentile out of range: {p}")
    n = len(values)
    if n == 0:
        return None
    s = values if presorted else sorted(values)
    if n == 1:
        return float(s[0])
    rank = (p / 100.0) * (n - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, n - 1)
    frac = rank - lo
    return float(s[lo] + (s[hi] - s[lo]) * frac)


def percentiles(values: Iterable[float], ps: Sequence[float] = (50, 90, 99)) -> dict[str, float | None]:
    """{"p50": .., "p90": .., "p99": ..} (None when there are no values)."""
    s = sorted(values)
    return {f"p{p:g}": percentile(s, p, presorted=True) for p in ps}


class Record:
    """Figures of one request (times in seconds, perf_counter clock)."""

    __slots__ = (
        "detail",
        "done",
        "end",
        "error",
        "frames",
        "gaps",
        "in_window",
        "reasoning_tokens",
        "start",
        "status",
        "tokens",
        "ttft",
    )

    def __init__(self, start: float) -> None:
        self.start = start
        self.end: float | None = None
        self.status: int | None = None
        self.error: str | None = None
        self.ttft: float | None = None
        self.frames = 0
        self.tokens = 0
        self.reasoning_tokens = 0
        self.done: bool | None = None
        self.gaps: list[float] = []
        self.in_window = False
        self.detail: str | None = None

    @property
    def latency(self) -> float | None:
        return None if self.end is None else self.end - self.start

    def to_dict(self, t0: float = 0.0) -> dict[str, Any]:
        return {
            "start": self.start - t0,
            "latency": self.latency,
            "status": self.status,
            "error": self.error,
            "ttft": self.ttft,
            "frames": self.frames,
            "tokens": self.tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "done": self.done,
            "in_window": self.in_window,
            "gaps": self.gaps,
        }


@dataclass
class Results:
    options: dict[str, Any]
    records: list[Record]
    t0: float
    window_start: float
    window_end: float
    window_completed: int  # requests completed OK inside the window
    window_frames: int  # data frames received inside the window
    window_tokens: int
    elapsed: float  # whole run, warm-up and drain included
    url: str = ""

    @property
    def window_s(self) -> float:
        return max(self.window_end - self.window_start, 0.0)

    def window_records(self) -> list[Record]:
        return [r for r in self.records if r.in_window]

    def errors(self) -> dict[str, int]:
        """Errors by kind over the whole run (warm-up included)."""
        out: dict[str, int] = {}
        for r in self.records:
            if r.error:
                out[r.error] = out.get(r.error, 0) + 1
        return out

    def error_samples(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for r in self.records:
            if r.error and r.error not in out and r.detail:
                out[r.error] = r.detail
        return out

    def summary(self) -> dict[str, Any]:
        """Every figure of the run as a flat-ish dict (seconds for times)."""
        win = self.window_records()
        ok = [r for r in win if not r.error and r.end is not None]
        w = self.window_s
        gaps: list[float] = []
        for r in ok:
            gaps.extend(r.gaps)
        errors = self.errors()
        return {
            "requests_total": len(self.records),
            "requests_window": len(win),
            "requests_ok_window": len(ok),
            "errors_total": sum(errors.values()),
            "errors": errors,
            "window_s": w,
            "elapsed_s": self.elapsed,
            "requests_per_s": self.window_completed / w if w > 0 else None,
            "frames_per_s": self.window_frames / w if w > 0 else None,
            "tokens_per_s": self.window_tokens / w if w > 0 else None,
            "window_completed": self.window_completed,
            "window_frames": self.window_frames,
            "window_tokens": self.window_tokens,
            "frames": sum(r.frames for r in ok),
            "tokens": sum(r.tokens for r in ok),
            "reasoning_tokens": sum(r.reasoning_tokens for r in ok),
            "not_done": sum(1 for r in ok if r.done is False),
            "latency": percentiles(r.end - r.start for r in ok),  # type: ignore[operator]
            "ttft": percentiles(r.ttft for r in ok if r.ttft is not None),
            "itl": percentiles(gaps),
            "itl_count": len(gaps),
        }

