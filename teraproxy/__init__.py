"""teraproxy: an OpenAI-compatible gateway in front of vLLM replicas."""

__version__ = "0.1.0"

# the hot path, compiled by mypyc to C extensions when TERAPROXY_MYPYC=1 at install (setup.py): plain
# mypy --strict modules that do not subclass aiohttp's classes
COMPILED = ("accesslog", "admission", "auth", "balance", "breaker", "client", "errors", "events", "health",
            "loadreport", "metrics", "proxy", "quota", "ratelimit", "ratelimit_redis", "redisconn", "relay",
            "reply", "runtime", "sse", "upstreams", "usage")


def build() -> str:
    """"compiled" or "interpreted", and in a checkout the compiled modules whose source was edited
    since (Python imports the extension, so the edit does not run until the install is repeated)."""
    import importlib.machinery
    import os

    from teraproxy import sse

    if sse.__file__ is None or sse.__file__.endswith(".py"):
        return "interpreted"
    here = os.path.dirname(os.path.abspath(__file__))
    stale = []
    for name in COMPILED:
        src, ext = (os.path.join(here, name + s) for s in (".py", importlib.machinery.EXTENSION_SUFFIXES[0]))
        if os.path.exists(src) and os.path.exists(ext) and os.path.getmtime(src) > os.path.getmtime(ext) + 2:
            stale.append(name)
    return f"compiled; stale, sources edited since: {', '.join(stale)}" if stale else "compiled"
