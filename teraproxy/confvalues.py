"""A config file's values: the converters a key's value passes through (durations, sizes, URLs,
numbers in a range, one of a few words) and the Reader that walks the raw YAML tree, collecting every
problem with its key path. config.py builds the sections from these; each converter raises ValueError
with the message the operator sees after the key's path."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SIZE = re.compile(r"^\s*(\d+)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib)?\s*$", re.I)
_SIZE_MULT = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2,
              "mib": 1024**2, "g": 1024**3, "gb": 1000**3, "gib": 1024**3}


def parse_duration(v: Any) -> float:
    """Seconds as a number, or a string like ``250ms``, ``5s``, ``2m``, ``1h``."""
    if isinstance(v, bool):
        raise ValueError("not a duration")
    if isinstance(v, (int, float)):
        if v < 0:
            raise ValueError("must not be negative")
        return float(v)
    m = _DURATION.match(str(v))
    if not m:
        raise ValueError(f"not a duration (use seconds or e.g. 250ms, 5s, 2m): {v!r}")
    return float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[m.group(2) or "s"]


def parse_size(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError("not a size")
    if isinstance(v, int):
        if v < 0:
            raise ValueError("must not be negative")
        return v
    m = _SIZE.match(str(v))
    if not m:
        raise ValueError(f"not a size (use bytes or e.g. 512KiB, 8MiB): {v!r}")
    return int(m.group(1)) * _SIZE_MULT[(m.group(2) or "").lower()]


class Reader:
    """Walks a raw YAML tree, collecting every problem with its key path.

    ``warnings``: where problems of the environment rather than of the file go (an unset
    ``api_key_env`` variable) when only the file is being checked; None makes them errors."""

    def __init__(self, warnings: list[str] | None = None) -> None:
        self.problems: list[str] = []
        self.warnings = warnings

    def fail(self, path: str, msg: str) -> None:
        self.problems.append(f"{path}: {msg}")

    def fail_env(self, path: str, msg: str) -> None:
        if self.warnings is None:
            self.fail(path, msg)
        else:
            self.warnings.append(f"{path}: {msg}")

    def mapping(self, raw: Any, path: str, allowed: set[str]) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.fail(path, "must be a mapping")
            return {}
        for k in raw:
            if k not in allowed:
                where = f"{path}.{k}" if path else str(k)
                self.fail(where, f"unknown key (allowed: {', '.join(sorted(allowed))})")
        return raw

    def get(self, d: dict[str, Any], key: str, path: str, conv: Any, default: Any) -> Any:
        if key not in d or d[key] is None:
            return default
        try:
            return conv(d[key])
        except (ValueError, TypeError) as e:
            self.fail(f"{path}.{key}" if path else key, str(e))
            return default


def at_least(lo: int) -> Any:
    def conv(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"must be an integer >= {lo}")
        return v
    return conv


def number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError("must be a number")
    return float(v)


def boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("must be true or false")
    return v


def choice(options: tuple[str, ...]) -> Any:
    def conv(v: Any) -> str:
        if v not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return str(v)
    return conv


def positive(conv: Any) -> Any:
    def wrapped(v: Any) -> Any:
        out = conv(v)
        if out <= 0:
            raise ValueError("must be greater than zero")
        return out
    return wrapped


def replica_url(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("not an http(s) URL")
    u = urlsplit(v)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError("not an http(s) URL")
    if u.path.rstrip("/") or u.query or u.fragment:
        raise ValueError("must be scheme://host:port only (teraproxy adds the /v1/... path)")
    try:
        port = u.port
    except ValueError:
        raise ValueError("not an http(s) URL (bad port)") from None
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    return f"{u.scheme}://{host}:{port or (443 if u.scheme == 'https' else 80)}"


def sha256_hex(v: Any) -> bytes:
    if not isinstance(v, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", v):
        raise ValueError("must be the 64-digit hex sha256 of the bearer token")
    return bytes.fromhex(v)


def section(r: Reader, raw: dict[str, Any], name: str, cls: Any, convs: dict[str, Any]) -> Any:
    d = r.mapping(raw.get(name), name, set(convs))
    defaults = cls()
    return cls(**{k: r.get(d, k, name, c, getattr(defaults, k)) for k, c in convs.items()})


def redis_url(v: Any) -> str:
    if not isinstance(v, str) or urlsplit(v).scheme not in ("redis", "rediss", "unix") or "://" not in v:
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    return v


def url_path(v: Any) -> str:
    if not isinstance(v, str) or not v.startswith("/"):
        raise ValueError("must be a path starting with /")
    return v


def fraction(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
        raise ValueError("must be a number between 0 and 1")
    return float(v)
