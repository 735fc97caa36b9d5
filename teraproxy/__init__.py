"""teraproxy: an OpenAI-compatible gateway in front of vLLM replicas."""

__version__ = "0.1.0"

# the hot path, compiled by mypyc to C extensions when TERAPROXY_MYPYC=1 at install (setup.py): plain
# mypy --strict modules that do not subclass aiohttp's classes
COMPILED = ("accesslog", "admission", "auth", "balance", "breaker", "client", "errors", "events", "exchange",
            "health", "loadreport", "metrics", "proxy", "quota", "ratelimit", "ratelimit_redis", "reasoning",
            "redisconn", "relay", "reply", "runtime", "sse", "upstreams", "usage")


def build() -> str:
    """"compiled", "interpreted", or what is amiss: compiled modules that run interpreted, or in a
    checkout the ones whose source was edited since the install built them (Python imports the
    extension, so the edit does not run until the install is repeated)."""
    import importlib
    import importlib.machinery
    import os

    native = [n for n in COMPILED if isinstance(importlib.import_module(f"teraproxy.{n}").__loader__,
                                                 importlib.machinery.ExtensionFileLoader)]
    if not native:
        return "interpreted"
    if len(native) < len(COMPILED):
        return f"partly compiled; interpreted: {', '.join(n for n in COMPILED if n not in native)}"
    here = os.path.dirname(os.path.abspath(__file__))
    lib = os.path.join(here, "_native__mypyc" + importlib.machinery.EXTENSION_SUFFIXES[0])  # all of their code
    if not (os.path.exists(os.path.join(here, os.pardir, "setup.py")) and os.path.exists(lib)):
        return "compiled"  # an installed wheel: its files' times say nothing
    built = os.path.getmtime(lib) + 2
    stale = [n for n in COMPILED if os.path.getmtime(os.path.join(here, n + ".py")) > built]
    return f"compiled; stale, sources edited since: {', '.join(stale)}" if stale else "compiled"
