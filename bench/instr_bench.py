"""CPU instructions per request (S1) or per stream (S2, S3), teraproxy and nginx, counted by callgrind.

A CPU-time ratio moves with the core (Python pays more than C on a slow one) and with the host's
neighbours; an instruction count does neither, so it is what a change to the hot path is judged by
here (it repeats to well under 1%). Each proxy runs alone under callgrind with counting off; after a
warm-up, counting is switched on for ``--requests`` requests (bench/loadgen.py, one sim on loopback),
then off, and the count is divided by the requests. ``--scenario S1``: non-streamed, 64 tokens;
``S2``: streamed, 256 tokens with no delay (as compare.py's S2); ``S3``: 64 paced tokens (20 ms apart, 8
streams: one frame per read, as compare.py's S3; per frame is printed too); ``--rewrite``: teraproxy with emit
``both`` against a sim that streams ``reasoning_content`` (compare.py's "teraproxy rewrite"). nginx
runs as one process (``master_process off``) with the same config as bench/compare.py. Access logs
on for both.

    python bench/instr_bench.py [--scenario S1|S2|S3] [--rewrite] [--requests 1000] [--no-nginx] [--keep DIR]

Needs valgrind (``apt-get install valgrind``). Not a timing: instructions are not cycles (cache
misses and branch mispredictions are not in it) and callgrind sees user space only, not the kernel's
socket work that is most of nginx's CPU time; so the CPU tables of compare.py stay the judge of the
ratio to nginx, and this is the judge of a step.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procs import Procs, child_env, free_port, wait_http
from bench.targets import MODEL, find_nginx, render_nginx_conf, teraproxy_conf
from teraproxy import build

VALGRIND = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--dump-instr=no", "--dump-line=no"]


# the sim's tokens (and max_tokens) and ITL (ms), loadgen's concurrency and flags; S3: paced frames, one per
# read (8 streams at 20 ms stay well inside what the proxy does under callgrind, so reads do not bunch)
SCENARIOS = {"S1": ("64", "0", "16", []), "S2": ("256", "0", "16", ["--stream"]),
             "S3": ("64", "20", "8", ["--stream"])}


def _load(port: int, n: int, scenario: str) -> None:
    tokens, _, concurrency, flags = SCENARIOS[scenario]
    subprocess.run([sys.executable, str(Path(__file__).parent / "loadgen.py"), "--url", f"http://127.0.0.1:{port}/v1",
                    "--model", MODEL, "--concurrency", concurrency, "--requests", str(n), "--max-tokens", tokens,
                    *flags, "--quiet"],
                   check=True, stdout=subprocess.DEVNULL, timeout=900)


def _count(procs: Procs, name: str, argv: list[str], port: int, out: Path, warmup: int, n: int,
           scenario: str) -> float:
    """Instructions per request of the process ``argv`` (listening on ``port``) under callgrind."""
    p = procs.start(name, [*VALGRIND, f"--callgrind-out-file={out}", *argv], cpu=1, env=child_env())
    wait_http(f"http://127.0.0.1:{port}/v1/models", p, name, timeout=300)
    _load(port, warmup, scenario)
    subprocess.run(["callgrind_control", "-i", "on", str(p.pid)], check=True, capture_output=True, timeout=120)
    _load(port, n, scenario)
    subprocess.run(["callgrind_control", "-i", "off", str(p.pid)], check=True, capture_output=True, timeout=120)
    # dump now: a process that is slow to exit under valgrind may be SIGKILLed by stop(), losing its counts
    subprocess.run(["callgrind_control", "-d", str(p.pid)], check=True, capture_output=True, timeout=120)
    procs.stop(p)
    total = 0
    for f in out.parent.glob(out.name + "*"):  # one file per dump (each holds the counts since the last)
        m = re.search(rb"^totals: (\d+)", f.read_bytes(), re.M)
        total += int(m.group(1)) if m else 0
    return total / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--no-nginx", action="store_true")
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="S1")
    ap.add_argument("--rewrite", action="store_true", help="teraproxy with emit both, sim with reasoning_content")
    ap.add_argument("--keep", metavar="DIR", type=Path,
                    help="keep the callgrind files in DIR, for a profile: callgrind_annotate DIR/cg.teraproxy.*")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        print("needs valgrind: apt-get install valgrind", file=sys.stderr)
        return 2
    run_dir = Path(tempfile.mkdtemp(prefix="instr-bench-"))
    run_dir.chmod(0o755)
    procs = Procs(run_dir, pin=True)
    try:
        sim_port = free_port()
        sim = procs.start("sim", [sys.executable, "-m", "teraproxy", "sim", "--host", "127.0.0.1", "--port",
                                  str(sim_port), "--model", MODEL, "--ttft", "0", "--itl", SCENARIOS[args.scenario][1],
                                  "--tokens", SCENARIOS[args.scenario][0],
                                  "--reasoning-field", "reasoning_content" if args.rewrite else "none"],
                         cpu=0, env=child_env())
        wait_http(f"http://127.0.0.1:{sim_port}/health", sim, "sim")
        rows: list[tuple[str, float]] = []
        port = free_port()
        conf = teraproxy_conf(run_dir, "teraproxy", port, sim_port, "both" if args.rewrite else "passthrough",
                              access_log=True)
        rows.append(("teraproxy", _count(procs, "teraproxy", [sys.executable, "-m", "teraproxy", "serve", "--config",
                                                               str(conf)], port, run_dir / "cg.teraproxy",
                                         args.warmup, args.requests, args.scenario)))
        nginx = None if args.no_nginx else find_nginx()
        if nginx is not None:
            port = free_port()
            conf = render_nginx_conf(run_dir, port, sim_port, access_log=True)
            argv = [nginx, "-p", f"{run_dir}/", "-c", str(conf), "-e", f"{run_dir}/error.log",
                    "-g", "daemon off; master_process off;"]
            rows.append(("nginx", _count(procs, "nginx", argv, port, run_dir / "cg.nginx", args.warmup,
                                         args.requests, args.scenario)))
    finally:
        procs.stop_all()
    tokens = SCENARIOS[args.scenario][0]
    what = "non-streamed request" if args.scenario == "S1" else f"stream of {tokens} frames"
    print(f"instructions per {what}{' (reasoning rewrite)' if args.rewrite else ''} "
          f"({args.requests} after {args.warmup} of warm-up; teraproxy {build()}):")
    for name, v in rows:
        print(f"  {name:10} {v / 1000:8.0f}k")
    if len(rows) == 2:
        print(f"  ratio      {rows[0][1] / rows[1][1]:8.2f}x")
    if args.scenario == "S3":  # frames + [DONE] (and the usage frame): ~one read each
        print("per frame: " + ", ".join(f"{name} {v / (int(tokens) + 2) / 1000:.1f}k" for name, v in rows))
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        for f in run_dir.glob("cg.*"):
            shutil.copy(f, args.keep)
    shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
