"""The load generator's output (bench/loadgen.py): the text summary, the per-request JSON and the
PNG chart."""

from __future__ import annotations

import math

import orjson

from bench.lgstats import Results, percentile


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.2f}"


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


def format_summary(res: Results) -> str:
    s = res.summary()
    o = res.options
    lines = [
        f"target      {res.url}  model={o.get('model')}  "
        f"{'stream' if o.get('stream') else 'non-stream'}  concurrency={o.get('concurrency')}  "
        f"max_tokens={o.get('max_tokens')}",
        f"window      {s['window_s']:.2f}s (run {s['elapsed_s']:.2f}s, warm-up {o.get('warmup')}s)",
        f"requests    {s['requests_ok_window']} ok in window, {s['requests_total']} sent in all",
        f"requests/s  {_rate(s['requests_per_s'])}",
        f"tokens/s    {_rate(s['tokens_per_s'])}   (frames/s {_rate(s['frames_per_s'])})",
        f"tokens      {s['tokens']} ({s['reasoning_tokens']} reasoning) in {s['frames']} data frames; "
        f"{s['not_done']} streams without [DONE]",
        "",
        f"{'ms':<14}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for name, key in (("latency", "latency"), ("TTFT", "ttft"), ("inter-token", "itl")):
        d = s[key]
        lines.append(f"{name:<14}{_ms(d['p50']):>10}{_ms(d['p90']):>10}{_ms(d['p99']):>10}")
    lines.append("")
    if s["errors"]:
        samples = res.error_samples()
        lines.append(f"errors      {s['errors_total']} (whole run)")
        for kind, n in sorted(s["errors"].items(), key=lambda kv: -kv[1]):
            sample = samples.get(kind, "")
            lines.append(f"  {kind:<14}{n:>8}  {sample[:100]}")
    else:
        lines.append("errors      0")
    return "\n".join(lines)


def write_json(res: Results, path: str) -> None:
    doc = {
        "url": res.url,
        "options": res.options,
        "summary": res.summary(),
        "requests": [r.to_dict(res.t0) for r in res.records],
    }
    with open(path, "wb") as f:
        f.write(orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY))


def write_plot(res: Results, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError(f"--plot needs matplotlib ({e}); pip install matplotlib") from e
    ok = [r for r in res.window_records() if not r.error]
    series = {
        "latency (ms)": sorted(r.latency * 1000 for r in ok if r.latency is not None),
        "TTFT (ms)": sorted(r.ttft * 1000 for r in ok if r.ttft is not None),
        "inter-token gap (ms)": sorted(g * 1000 for r in ok for g in r.gaps),
    }
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (name, vals) in zip(list(axes.flat)[:3], series.items(), strict=True):
        if vals:
            n = len(vals)
            ax.plot(vals, [(i + 1) / n for i in range(n)])
            hi = percentile(vals, 99.5, presorted=True) or 0.0
            if hi > vals[0]:
                ax.set_xlim(vals[0] - (hi - vals[0]) * 0.05, hi * 1.1)
        ax.set_xlabel(name)
        ax.set_ylabel("fraction")
        ax.set_title(f"CDF of {name}")
        ax.grid(alpha=0.3)
    ax = axes.flat[3]
    ends = sorted(r.end - res.t0 for r in res.records if r.end is not None and not r.error)
    if ends:
        width = max(0.1, ends[-1] / 40)
        nb = max(1, math.ceil(ends[-1] / width))
        ax.hist(ends, bins=nb, range=(0, nb * width), weights=[1 / width] * len(ends))
    ax.axvline(res.window_start - res.t0, color="green", ls="--", label="window")
    ax.axvline(res.window_end - res.t0, color="green", ls="--")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("requests completed per second")
    ax.set_title("throughput")
    ax.legend()
    fig.suptitle(f"{res.url} c={res.options.get('concurrency')} stream={res.options.get('stream')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

