"""bench/compare.py's report: the medians over rounds (and the per-round "added" deltas), the
markdown table and the PNG chart."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

from bench.measure import Scenario, family
from bench.targets import BASELINE, LABEL, PROXIES, VARIANTS

# (key, label, kind) per scenario family; kind "abs" = median of the figure,
# "added" = median over rounds of (variant - its direct baseline).
FIGURES: dict[str, list[tuple[str, str, str]]] = {
    "S1": [
        ("requests_per_s", "requests/s", "abs"),
        ("latency_p50_ms", "latency p50 added (ms)", "added"),
        ("latency_p99_ms", "latency p99 added (ms)", "added"),
        ("proxy_cpu_us_per_request", "proxy CPU µs / request", "abs"),
        ("proxy_cpu_pct", "proxy CPU %", "abs"),
        ("proxy_peak_rss_mib", "proxy peak RSS (MiB)", "abs"),
        ("errors", "errors", "abs"),
    ],
    "S2": [
        ("frames_per_s", "frames/s", "abs"),
        ("proxy_cpu_s_per_100k_frames", "proxy CPU s / 100k frames", "abs"),
        ("proxy_cpu_pct", "proxy CPU %", "abs"),
        ("ttft_p50_ms", "TTFT p50 added (ms)", "added"),
        ("latency_p50_ms", "latency p50 added (ms)", "added"),
        ("proxy_peak_rss_mib", "proxy peak RSS (MiB)", "abs"),
        ("errors", "errors", "abs"),
    ],
    "S3": [
        ("ttft_p50_ms", "TTFT p50 added (ms)", "added"),
        ("ttft_p99_ms", "TTFT p99 added (ms)", "added"),
        ("itl_p50_ms", "inter-token p50 added (ms)", "added"),
        ("itl_p99_ms", "inter-token p99 added (ms)", "added"),
        ("errors", "errors", "abs"),
        ("proxy_cpu_pct", "proxy CPU %", "abs"),
        ("proxy_cpu_us_per_frame", "proxy CPU µs / frame", "abs"),
        ("proxy_peak_rss_mib", "proxy peak RSS (MiB)", "abs"),
        ("frames_per_s", "frames/s", "abs"),
    ],
}
CONTEXT_FIGURES = [("upstream_cpu_pct", "core 0: upstream CPU %"), ("loadgen_cpu_pct", "core 0: loadgen CPU %")]


def _median(vals: list[Any]) -> float | None:
    v = [x for x in vals if x is not None]
    return statistics.median(v) if v else None


def aggregate(measurements: list[dict[str, Any]], scenario_names: list[str]) -> dict[str, Any]:
    """{scenario: {variant: {key: median, key+"_added": median of per-round deltas}}}"""
    out: dict[str, Any] = {}
    for sc in scenario_names:
        by_v: dict[str, dict[int, dict[str, Any]]] = {}
        for m in measurements:
            if m["scenario"] == sc:
                by_v.setdefault(m["variant"], {})[m["round"]] = m
        keys = [k for k, _, _ in FIGURES[family(sc)]] + [k for k, _ in CONTEXT_FIGURES]
        keys += ["latency_p90_ms", "ttft_p90_ms", "itl_p90_ms", "tokens_per_s"]
        added = {k for k, _, kind in FIGURES[family(sc)] if kind == "added"} | {"latency_p50_ms", "latency_p99_ms"}
        res: dict[str, Any] = {}
        for v, rounds in by_v.items():
            d: dict[str, Any] = {"rounds": len(rounds)}
            for k in dict.fromkeys(keys):
                d[k] = _median([m.get(k) for m in rounds.values()])
            base = by_v.get(BASELINE.get(v, ""), {})
            for k in added:
                deltas = [
                    m[k] - base[r][k]
                    for r, m in rounds.items()
                    if r in base and m.get(k) is not None and base[r].get(k) is not None
                ]
                d[k + "_added"] = _median(deltas)
            res[v] = d
        out[sc] = res
    return out


def fmt(v: float | None) -> str:
    if v is None:
        return "–"
    a = abs(v)
    if a >= 10000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def fmt_count(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:,.0f}" if float(v).is_integer() else f"{v:,.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "–"
    if b == 0:
        return "–" if a == 0 else "n/a"
    if b < 0 or a < 0:
        return "n/a"
    return f"{a / b:.2f}×"


def markdown_table(medians: dict[str, Any], scs: list[Scenario], rounds: int, have_nginx: bool) -> str:
    lines: list[str] = []
    head = "| figure | direct | nginx | teraproxy | teraproxy rewrite | teraproxy / nginx | rewrite / nginx |"
    for sc in scs:
        med = medians.get(sc.name, {})
        lines.append(f"### {sc.name}: {sc.title} (median of {rounds} round{'s' if rounds != 1 else ''})")
        lines.append("")
        lines.append(head)
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for key, label, kind in FIGURES[family(sc.name)]:
            k = key + "_added" if kind == "added" else key
            vals = {v: med.get(v, {}).get(k) for v in VARIANTS}
            cell = fmt_count if key == "errors" else fmt
            if kind == "added":
                d = med.get("direct", {}).get(key)
                direct = f"({fmt(d)})" if d is not None else "–"
            else:
                direct = "" if key.startswith("proxy_") else cell(vals["direct"])
            n = vals["nginx"] if have_nginx else None
            tp, rw = vals["teraproxy"], vals["teraproxy_rw"]
            cells = [label, direct, cell(n) if have_nginx else "n/a", cell(tp), cell(rw), _ratio(tp, n), _ratio(rw, n)]
            lines.append("| " + " | ".join(cells) + " |")
        for key, label in CONTEXT_FIGURES:
            vals = {v: med.get(v, {}).get(key) for v in VARIANTS}
            lines.append(
                f"| {label} | {fmt(vals['direct'])} | {fmt(vals['nginx'])} | {fmt(vals['teraproxy'])} | "
                f"{fmt(vals['teraproxy_rw'])} | | |"
            )
        lines.append("")
    lines.append(
        "Added figures: the variant minus its direct baseline in the same round (direct column: the baseline "
        "itself, in parentheses); teraproxy rewrite is compared with a direct run against the reasoning_content "
        "upstream. Ratios: teraproxy (or rewrite) / nginx; lower is better except requests/s and frames/s."
    )
    return "\n".join(lines)


COLORS = {
    "direct": "#999999",
    "nginx": "#009639",
    "teraproxy": "#1f77b4",
    "direct_rc": "#cccccc",
    "teraproxy_rw": "#ff7f0e",
}
# The chart's panels per scenario family: (key, label, kind) as in FIGURES.
CHART_FIGURES: dict[str, list[tuple[str, str, str]]] = {
    "S1": [
        ("requests_per_s", "requests/s", "abs"),
        ("proxy_cpu_us_per_request", "proxy CPU µs/request", "abs"),
    ],
    "S2": [
        ("frames_per_s", "frames/s", "abs"),
        ("proxy_cpu_s_per_100k_frames", "proxy CPU s/100k frames", "abs"),
    ],
    "S3": [("itl_p99_ms", "inter-token p99 added (ms)", "added"), ("proxy_cpu_pct", "proxy CPU %", "abs")],
}


def _bars(med: dict[str, Any], measurements: list[dict[str, Any]], scn: str, key: str, kind: str,
          ) -> tuple[list[str], list[str], list[float], list[float], list[float]]:
    """One panel's bars: labels, variants, medians and the min/max error bars of the rounds."""
    names, keys, vals, errs_lo, errs_hi = [], [], [], [], []
    for v in VARIANTS:
        if v not in med:
            continue
        if kind == "added" and v not in BASELINE:
            continue
        if key.startswith("proxy_") and v not in PROXIES:
            continue
        val = med[v].get(key + "_added" if kind == "added" else key)
        if val is None:
            continue
        raw: list[float] = [
            m[key] for m in measurements if m["scenario"] == scn and m["variant"] == v and m.get(key) is not None
        ]
        names.append(LABEL[v])
        keys.append(v)
        vals.append(val)
        if kind == "abs" and raw:
            errs_lo.append(max(val - min(raw), 0))
            errs_hi.append(max(max(raw) - val, 0))
        else:
            errs_lo.append(0)
            errs_hi.append(0)
    return names, keys, vals, errs_lo, errs_hi


def write_chart(path: Path, medians: dict[str, Any], measurements: list[dict[str, Any]], scs: list[Scenario]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart (pip install matplotlib)", file=sys.stderr)
        return False
    panels = [(sc.name, key, label, kind) for sc in scs for key, label, kind in CHART_FIGURES[family(sc.name)]]
    cols = 2
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(11, 3.2 * rows), squeeze=False)
    for ax, (scn, key, label, kind) in zip(list(axes.flat)[: len(panels)], panels, strict=True):
        names, keys, vals, errs_lo, errs_hi = _bars(medians.get(scn, {}), measurements, scn, key, kind)
        ax.bar(names, vals, yerr=[errs_lo, errs_hi], capsize=4, color=[COLORS[k] for k in keys])
        ax.set_title(f"{scn}: {label}", fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle("teraproxy vs nginx (median of rounds; bars: min–max)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
