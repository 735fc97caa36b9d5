"""Command line: serve, check, sim, demo, status, key.

Exit codes: 0 ok; 2 a problem the operator must fix (bad config, missing file, port in use,
unsafe runtime) printed as one line per problem, never a traceback; 1 anything unexpected.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from teraproxy import __version__, build
from teraproxy.config import Config, ConfigError, load_config, parse_config, parse_listen

USAGE_ERROR = 2


class StartupError(Exception):
    """A one-line reason the daemon cannot start."""


def _fail(lines: list[str] | str) -> int:
    for line in [lines] if isinstance(lines, str) else lines:
        print(f"teraproxy: {line}", file=sys.stderr)
    return USAGE_ERROR


def _check_runtime() -> None:
    import aiohttp
    from aiohttp import http_parser

    major, minor, patch = (int(x) for x in aiohttp.__version__.split(".")[:3] if x.isdigit())
    if (major, minor, patch) < (3, 14, 1):
        raise StartupError(f"aiohttp {aiohttp.__version__} is too old: 3.14.1 or newer is required "
                           "(request smuggling fixes in its HTTP parser)")
    if http_parser.HttpRequestParser is getattr(http_parser, "HttpRequestParserPy", None):
        raise StartupError("aiohttp is running on its pure-Python HTTP parser (AIOHTTP_NO_EXTENSIONS set, "
                           "or no C extension for this platform); refusing to serve")


def _setup_logging(level: str) -> None:
    """Lifecycle lines on stderr (journald): INFO for normal events (listening, a replica back up,
    shutdown), WARNING for trouble. ``log.level`` (default info) is the root level, so INFO shows."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


async def _until_signalled() -> str:
    """Wait for SIGTERM or SIGINT; returns its name."""
    got: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def on_signal(name: str) -> None:
        if not got.done():
            got.set_result(name)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    return await got


async def serve_forever(config: Config, ready: Callable[[], None] | None = None, path: str | None = None,
                        overrides: dict[str, Any] | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain (daemon.py); SIGHUP re-reads ``path`` (and applies
    ``overrides``, the command line's settings, over it)."""
    from teraproxy.daemon import Daemon

    await Daemon(config, path, overrides or {}).run(ready)


def _run(coro: Awaitable[None]) -> int:
    import uvloop

    try:
        uvloop.run(coro)  # type: ignore[arg-type]
    except StartupError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        pass
    return 0


def _path(path: str | None) -> str:
    path = path or os.environ.get("TERAPROXY_CONFIG")
    if not path:
        raise ConfigError(["--config: missing (or set TERAPROXY_CONFIG)"])
    return path


def _load(path: str | None, warnings: list[str] | None = None) -> Config:
    return load_config(_path(path), warnings)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        config = _load(args.config)
        if args.admin_listen:  # one config for several instances on one port, each with its own admin port
            try:
                config = dataclasses.replace(config, admin_listen=parse_listen(args.admin_listen))
            except ValueError as e:
                raise ConfigError([f"--admin-listen: {e}"]) from None
        _check_runtime()
    except ConfigError as e:
        return _fail(e.problems)
    except StartupError as e:
        return _fail(str(e))
    _setup_logging(config.log.level)  # the access log is separate: stdout, log.access_log
    # absolute: a reload re-reads it, whatever the working directory is by then
    overrides = {"admin_listen": config.admin_listen} if args.admin_listen else {}
    return _run(serve_forever(config, path=os.path.abspath(_path(args.config)), overrides=overrides))


def cmd_check(args: argparse.Namespace) -> int:
    # `check` validates the file; what only the serving host's environment can supply (api_key_env
    # variables, e.g. from a systemd EnvironmentFile) is a warning here and an error for `serve`.
    warnings: list[str] = []
    try:
        config = _load(args.config, warnings)
    except ConfigError as e:
        return _fail(e.problems)
    for w in warnings:
        print(f"teraproxy: warning: {w} (serve will refuse to start without it)", file=sys.stderr)
    n = sum(len(m.replicas) for m in config.models)
    print(f"ok: {len(config.models)} model(s), {n} replica(s), listen {config.listen}, "
          f"auth {'on' if config.auth.enabled else 'off'}")
    return 0


def _sim_options(args: argparse.Namespace) -> Any:
    from teraproxy.sim import SimOptions

    return SimOptions(model=args.model, reasoning_field=args.reasoning_field, ttft_ms=args.ttft,
                      itl_ms=args.itl, tokens=args.tokens, max_num_seqs=args.max_num_seqs, speed=args.speed,
                      metrics=args.metrics)


def _positive_float(v: str) -> float:
    f = float(v)
    if not f > 0:
        raise argparse.ArgumentTypeError("must be greater than zero")
    return f


def cmd_sim(args: argparse.Namespace) -> int:
    from teraproxy.sim import Faults, start_sim

    faults = Faults(fail_status=args.fail_status, health_status=args.health_status, api_key=args.api_key,
                    hang_before_headers=args.hang, reset_after=args.reset_after, hang_after=args.hang_after)

    async def main() -> None:
        runner, _ = await start_sim(args.host, args.port, _sim_options(args), faults)
        print(f"sim: serving {args.model} on http://{args.host}:{args.port}", flush=True)
        try:
            await _until_signalled()
        finally:
            await runner.cleanup()

    try:
        return _run(main())
    except OSError as e:
        return _fail(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")


DEMO_MODEL = "Qwen/Qwen3-8B"


def cmd_demo(args: argparse.Namespace) -> int:
    from teraproxy.sim import SimOptions, start_sim

    ports = (args.port + 11, args.port + 12)
    raw = {"listen": f"127.0.0.1:{args.port}", "admin_listen": f"127.0.0.1:{args.port + 1}", "auth": "off",
           "health": {"interval": "2s"}, "log": {"access_log": False},
           "models": [{"id": DEMO_MODEL, "replicas": [{"url": f"http://127.0.0.1:{p}"} for p in ports]}]}
    config = parse_config(raw)
    _setup_logging("warning")

    def ready() -> None:
        base = f"http://127.0.0.1:{args.port}"
        print(f"\nteraproxy demo: proxy on {base} in front of two simulated vLLM replicas "
              f"(ports {ports[0]}, {ports[1]}); Ctrl-C stops it.\nTry:\n"
              f"  curl -sN {base}/v1/chat/completions -H 'Content-Type: application/json' "
              f"-d '{{\"model\": \"{DEMO_MODEL}\", \"stream\": true, "
              f"\"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n"
              f"  curl -s http://127.0.0.1:{args.port + 1}/admin/upstreams\n", flush=True)

    async def main() -> None:
        runners = []
        try:
            for p in ports:
                try:
                    runner, _ = await start_sim("127.0.0.1", p, SimOptions(model=DEMO_MODEL, itl_ms=30, tokens=24))
                except OSError as e:
                    raise StartupError(f"cannot listen on 127.0.0.1:{p} for a simulated replica: "
                                       f"{e.strerror or e}") from None
                runners.append(runner)
            await serve_forever(config, ready)
        finally:
            for r in runners:
                await r.cleanup()

    return _run(main())


def cmd_status(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    import orjson

    try:
        config = _load(args.config)
    except ConfigError as e:
        return _fail(e.problems)
    if config.admin_listen is None:
        return _fail("admin_listen: not set in this config, so there is no status to read")
    base = f"http://{config.admin_listen}"

    def table() -> str:
        with urllib.request.urlopen(f"{base}/admin/upstreams", timeout=5) as resp:
            return _replica_table(orjson.loads(resp.read()))

    try:
        if not args.watch:
            print(table())
            return 0
        # follow /admin/events: on every event redraw the table, with the last events under it
        recent: list[str] = []
        with urllib.request.urlopen(f"{base}/admin/events", timeout=60) as stream:
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if not line.startswith("data:"):
                    continue  # pings and blank separators
                recent = [*recent[-9:], line[5:].strip()]
                print("\x1b[H\x1b[2J" + table() + "\n\nevents:\n" + "\n".join(recent), flush=True)
    except KeyboardInterrupt:
        return 0
    except (urllib.error.URLError, OSError) as e:
        return _fail(f"cannot reach {base}: {getattr(e, 'reason', e)}")
    return 0


def _replica_table(doc: dict[str, Any]) -> str:
    rows = [("MODEL", "REPLICA", "UP", "BREAKER", "IN FLIGHT", "LATENCY", "WHY")]
    for m in doc["models"]:
        for r in m["replicas"]:
            lat = "-" if r["latency_ms"] is None else f"{r['latency_ms']:.1f}ms"
            rows.append((m["id"], r["url"], "up" if r["up"] else "DOWN", r["breaker"]["state"],
                         str(r["in_flight"]), lat, r["reason"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1]
                     for row in rows)


def cmd_reload(args: argparse.Namespace) -> int:
    """Check the config, then ask the running proxy (on admin_listen) to re-read its config file."""
    import urllib.error
    import urllib.request

    import orjson

    try:
        config = _load(args.config)
    except ConfigError as e:
        return _fail(e.problems)
    if config.admin_listen is None:
        return _fail("admin_listen: not set in this config; send SIGHUP to the process instead (kill -HUP PID)")
    url = f"http://{config.admin_listen}/admin/reload"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=10) as resp:
            doc = orjson.loads(resp.read())
    except urllib.error.HTTPError as e:
        doc = orjson.loads(e.read()) if e.code == 422 else {"ok": False, "problems": [f"{url} answered {e.code}"]}
    except (urllib.error.URLError, OSError) as e:
        return _fail(f"cannot reach {url}: {getattr(e, 'reason', e)}")
    if not doc.get("ok"):
        return _fail(["reload refused, the proxy keeps its previous config:", *doc.get("problems", [])])
    print(f"reloaded: config sha256 {doc['sha256']}")
    return 0


def cmd_key(args: argparse.Namespace) -> int:
    from teraproxy.auth import hash_key

    if args.hash:
        print(hash_key(args.hash))
        return 0
    token = "sk-tera-" + secrets.token_urlsafe(32)
    print(f"key (give to the client, shown once): {token}")
    print("config entry:")
    print(f"  - {{name: {args.name}, sha256: {hash_key(token)}}}")
    return 0


class _Version(argparse.Action):
    """--version, with the build looked up only when asked (it imports every compiled module)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(f"teraproxy {__version__} ({build()})")  # on stdout, as argparse's own version action
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="teraproxy", description="OpenAI-compatible gateway for vLLM replicas")
    p.add_argument("--version", action=_Version, nargs=0, help="print the version and build, and exit")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the proxy daemon")
    s.add_argument("--config", help="config file (default: $TERAPROXY_CONFIG)")
    s.add_argument("--admin-listen", metavar="HOST:PORT",
                   help="admin_listen for this instance (several instances sharing one config and port)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("check", help="validate a config file")
    s.add_argument("--config", help="config file (default: $TERAPROXY_CONFIG)")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("sim", help="run a simulated vLLM replica")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--model", default="Qwen/Qwen3-8B")
    s.add_argument("--reasoning-field", default="reasoning",
                   choices=("reasoning", "reasoning_content", "both", "none"),
                   help="name of the reasoning delta (vLLM >=0.16: reasoning; <=0.11: reasoning_content)")
    s.add_argument("--ttft", type=float, default=0.0, metavar="MS", help="time to first token")
    s.add_argument("--itl", type=float, default=0.0, metavar="MS", help="time between tokens")
    s.add_argument("--tokens", type=int, default=16, help="tokens per answer (max_tokens may lower it)")
    s.add_argument("--max-num-seqs", type=int, default=0, metavar="N",
                   help="run at most N requests at once, queue the rest (vLLM's --max-num-seqs; 0: no limit)")
    s.add_argument("--speed", type=_positive_float, default=1.0, metavar="F",
                   help="divide every delay by F (0.5: a replica twice as slow)")
    s.add_argument("--metrics", default="kv", choices=("kv", "gpu", "none"),
                   help="GET /metrics with vllm:kv_cache_usage_perc (v1), vllm:gpu_cache_usage_perc (v0), or none")
    s.add_argument("--fail-status", type=int, help="answer generation requests with this HTTP status")
    s.add_argument("--health-status", type=int, default=200, help="status of GET /health")
    s.add_argument("--api-key", help="require this bearer token (as vLLM --api-key)")
    s.add_argument("--hang", action="store_true", help="never answer generation requests")
    s.add_argument("--reset-after", type=int, metavar="N", help="reset streams after N frames")
    s.add_argument("--hang-after", type=int, metavar="N", help="stall streams after N frames")
    s.set_defaults(func=cmd_sim)

    s = sub.add_parser("demo", help="proxy + two simulated replicas in one process")
    s.add_argument("--port", type=int, default=8080)
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("status", help="print the replicas' state from a running proxy's admin port")
    s.add_argument("--config", help="config file (default: $TERAPROXY_CONFIG)")
    s.add_argument("--watch", action="store_true", help="follow /admin/events and redraw the table on each event")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("reload", help="check a config, then make the running proxy re-read its config file")
    s.add_argument("--config", help="config file (default: $TERAPROXY_CONFIG)")
    s.set_defaults(func=cmd_reload)

    s = sub.add_parser("key", help="make a new API key and its config entry")
    s.add_argument("--name", default="team-a")
    s.add_argument("--hash", metavar="TOKEN", help="only print the sha256 of an existing token")
    s.set_defaults(func=cmd_key)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)
