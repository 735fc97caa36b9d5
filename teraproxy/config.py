"""YAML config → validated, frozen dataclasses.

Parsed once, strictly: unknown keys are errors naming their path (``models[1].replicas[0].url``),
every problem is collected (not just the first), and durations/sizes are converted at load time
(by confvalues.py's converters) so the request path only ever reads attributes. ``load_config``
raises ConfigError with one line per problem.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from teraproxy.confvalues import (
    Reader,
    at_least,
    boolean,
    choice,
    fraction,
    number,
    parse_duration,
    parse_size,
    positive,
    redis_url,
    replica_url,
    section,
    sha256_hex,
    url_path,
)
from teraproxy.reasoning import EMITS
from teraproxy.sse import MAX_EVENT

POLICIES = ("least", "affinity")
PRIORITIES = ("high", "normal", "low")


class ConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class KeyConfig:
    name: str
    sha256: bytes  # raw digest of the bearer token
    models: frozenset[str] | None  # None: every model; exact ids (globs are in model_globs)
    priority: str = "normal"  # admission queue class: high | normal | low
    model_globs: re.Pattern[str] | None = None  # the shell-style patterns of `models`, as one regex
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_in_flight: int | None = None

    def may_use(self, model: str) -> bool:
        if self.models is None or model in self.models:
            return True
        return self.model_globs is not None and self.model_globs.fullmatch(model) is not None

    @property
    def limited(self) -> bool:
        return (self.requests_per_minute is not None or self.tokens_per_minute is not None
                or self.max_in_flight is not None)


@dataclass(frozen=True)
class AuthConfig:
    enabled: bool
    keys: tuple[KeyConfig, ...] = ()
    keys_file: str | None = None


@dataclass(frozen=True)
class RateLimitConfig:
    backend: str = "memory"  # memory (this process) | redis (shared by every instance on one Redis)
    redis_url: str | None = None
    on_backend_error: str = "allow"  # allow: serve and count the error | deny: answer 503
    redis_timeout: float = 0.05  # deadline of one Redis call
    lease_ttl: float = 30.0  # an in-flight slot of a killed instance is free again after this
    meter_streams: bool = False  # ask every stream for its usage, so teraproxy_tokens_total counts all


@dataclass(frozen=True)
class ReplicaConfig:
    url: str  # normalised: scheme://host:port, no trailing slash
    weight: float = 1.0
    api_key: str | None = None
    max_in_flight: int | None = None  # requests this proxy sends at once; beyond it they queue
    ca: str | None = None  # https: PEM file of the CA(s) to verify the replica against (else the system store)
    verify: bool = True  # https: verify the replica's certificate and name


@dataclass(frozen=True)
class ModelConfig:
    id: str
    replicas: tuple[ReplicaConfig, ...]
    reasoning: str  # emit mode for this model's responses
    reasoning_in: bool  # add messages[].reasoning where only reasoning_content was sent
    policy: str = "least"


@dataclass(frozen=True)
class Limits:
    max_body: int = 8 * 1024 * 1024
    max_response: int = 32 * 1024 * 1024  # a non-streamed answer read into memory; over it: 502
    body_read: float = 30.0  # deadline for reading a request body
    max_event: int = MAX_EVENT  # one SSE event from a replica (and all it sends before its first)


@dataclass(frozen=True)
class Timeouts:
    connect: float = 5.0
    headers: float = 600.0  # until response headers; a non-streamed vLLM answer sends them at the end
    idle: float = 120.0  # longest silence inside a streamed answer (and before its first event)
    # client connection idle between requests; also the deadline for a request's headers,
    # counted from connect or from the previous response (aiohttp does not re-arm it on data)
    keepalive: float = 30.0
    client_stall: float = 60.0  # a client that reads nothing of a stream for this long is disconnected
    first_event_keepalive: float = 0.0  # streams: status line + ": keep-alive" every this long until the first event


@dataclass(frozen=True)
class UpstreamPool:
    max_connections: int = 4096
    keepalive: float = 4.0  # below uvicorn's (so vLLM's) 5 s, so a replica never closes a connection we reuse


@dataclass(frozen=True)
class HealthConfig:
    enabled: bool = True
    path: str = "/health"
    interval: float = 5.0
    timeout: float = 2.0
    fall: int = 3
    rise: int = 2
    check_models: bool = True
    warmup: bool = True
    slow_start: float = 30.0


@dataclass(frozen=True)
class BreakerConfig:
    failures: int = 5
    open: float = 10.0
    max_open: float = 300.0
    trial_wait: float = 30.0  # a request with no other replica waits this long for a half-open trial


@dataclass(frozen=True)
class RetryConfig:
    attempts: int = 3
    budget: float = 0.2  # share of recent requests that may be retries
    window: float = 10.0


@dataclass(frozen=True)
class LoadConfig:
    """Scraping the replicas' /metrics for their own view of their load (loadreport.py)."""

    enabled: bool = True
    path: str = "/metrics"
    interval: float = 1.0
    timeout: float = 0.5
    stale_after: float = 0.0  # 0: three intervals


@dataclass(frozen=True)
class QueueConfig:
    """The per-model admission queue used when every replica is at its max_in_flight (admission.py)."""

    max: int = 1000  # waiting requests per model; 0: no queue, answer 503 queue_full at once
    timeout: float = 30.0  # longest wait in the queue (then 503 queue_timeout)


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    access_log: bool = True
    access_log_buffer: int = 4 * 1024 * 1024  # lines not yet written to stdout; past it they are dropped


@dataclass(frozen=True)
class Config:
    listen: Listen
    auth: AuthConfig
    models: tuple[ModelConfig, ...]
    admin_listen: Listen | None = None
    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    upstream: UpstreamPool = field(default_factory=UpstreamPool)
    health: HealthConfig = field(default_factory=HealthConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    log: LogConfig = field(default_factory=LogConfig)
    ratelimit: RateLimitConfig = field(default_factory=RateLimitConfig)
    reasoning: str = "both"
    shutdown: ShutdownConfig = field(default_factory=lambda: ShutdownConfig())
    listen_reuse_port: bool = False  # SO_REUSEPORT: several instances share the API port
    tls: TLSConfig | None = None  # HTTPS on the API listener
    load: LoadConfig = field(default_factory=LoadConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)


def parse_listen(v: Any) -> Listen:
    if not isinstance(v, str) or ":" not in v:
        raise ValueError("must be host:port")
    host, _, port_s = v.rpartition(":")
    host = host.strip("[]")
    if not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"must be host:port with a port 1-65535: {v!r}")
    return Listen(host, int(port_s))


_KEY_FIELDS = {"name", "sha256", "models", "priority", "requests_per_minute", "tokens_per_minute", "max_in_flight"}


def _auth(r: Reader, raw: dict[str, Any], base: Path | None) -> AuthConfig:
    if "auth" not in raw:
        r.fail("auth", "missing: write `auth: off` for open access, or list keys")
        return AuthConfig(enabled=False)
    v = raw["auth"]
    if v is False or v == "off":
        return AuthConfig(enabled=False)
    d = r.mapping(v, "auth", {"keys", "keys_file"})
    keys_raw = d.get("keys")
    if keys_raw is not None and not isinstance(keys_raw, list):
        r.fail("auth.keys", "must be a list of keys")
        keys_raw = None
    entries: list[tuple[str, Any]] = [(f"auth.keys[{i}]", k) for i, k in enumerate(keys_raw or [])]
    keys_file = d.get("keys_file")
    before = len(r.problems)
    if keys_file is not None:
        if not isinstance(keys_file, str) or not keys_file:
            r.fail("auth.keys_file", "must be a file path")
            keys_file = None
        else:
            keys_file = str(base / keys_file) if base is not None and not os.path.isabs(keys_file) else keys_file
            entries += _keys_file(r, keys_file)
    if not entries and len(r.problems) == before:
        r.fail("auth.keys", "must be a non-empty list (or name a keys_file, or write `auth: off`)")
    keys: list[KeyConfig] = []
    seen: dict[bytes, str] = {}
    names: dict[str, str] = {}
    for p, k in entries:
        key = _key(r, k, p)
        if key is None:
            continue
        if key.sha256 in seen:
            r.fail(f"{p}.sha256", f"duplicate key (also {seen[key.sha256]})")
        elif key.name in names:
            r.fail(f"{p}.name", f"duplicate name (also {names[key.name]}): limits and metrics go by name")
        seen[key.sha256] = names[key.name] = p
        keys.append(key)
    return AuthConfig(enabled=True, keys=tuple(keys), keys_file=keys_file)


def _keys_file(r: Reader, path: str) -> list[tuple[str, Any]]:
    """The entries of a keys file: a list of keys, or a mapping with `keys:`; problems name the file."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        r.fail("auth.keys_file", f"cannot read {path}: {e.strerror or e}")
        return []
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        r.fail("auth.keys_file", f"{path}: invalid YAML{where}: {getattr(e, 'problem', None) or 'invalid YAML'}")
        return []
    if isinstance(raw, dict) and set(raw) <= {"keys"}:
        raw = raw.get("keys")
    if not isinstance(raw, list):
        r.fail("auth.keys_file", f"{path}: must be a list of keys (or a mapping with `keys:`)")
        return []
    return [(f"{path}: keys[{i}]", k) for i, k in enumerate(raw)]


def _key(r: Reader, k: Any, p: str) -> KeyConfig | None:
    kd = r.mapping(k, p, _KEY_FIELDS)
    name = kd.get("name")
    if not isinstance(name, str) or not name or not name.isprintable():
        r.fail(f"{p}.name", "must be a non-empty string")
        name = "?"
    digest = r.get(kd, "sha256", p, sha256_hex, None)
    if "sha256" not in kd:
        r.fail(f"{p}.sha256", "missing")
    models = kd.get("models")
    if models is not None and not (isinstance(models, list) and all(isinstance(m, str) and m for m in models)):
        r.fail(f"{p}.models", "must be a list of model ids (shell-style globs allowed, e.g. \"openai/*\")")
        models = None
    exact = frozenset(m for m in models if not _is_glob(m)) if models is not None else None
    globs = [m for m in models or () if _is_glob(m)]
    pos = at_least(1)
    rpm = r.get(kd, "requests_per_minute", p, pos, None)
    tpm = r.get(kd, "tokens_per_minute", p, pos, None)
    cap = r.get(kd, "max_in_flight", p, pos, None)
    if digest is None:
        return None
    pattern = re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs)) if globs else None
    return KeyConfig(name, digest, exact, priority=r.get(kd, "priority", p, choice(PRIORITIES), "normal"),
                     model_globs=pattern, requests_per_minute=rpm, tokens_per_minute=tpm, max_in_flight=cap)


def _is_glob(model: str) -> bool:
    return any(c in model for c in "*?[")


def _ratelimit(r: Reader, raw: dict[str, Any]) -> RateLimitConfig:
    convs = {"backend": choice(("memory", "redis")), "redis_url": redis_url,
             "on_backend_error": choice(("allow", "deny")), "redis_timeout": positive(parse_duration),
             "lease_ttl": positive(parse_duration), "meter_streams": boolean}
    d = r.mapping(raw.get("ratelimit"), "ratelimit", set(convs) | {"anonymous"})
    if "anonymous" in d:
        r.fail("ratelimit.anonymous", "not supported: limits are per API key; list keys under `auth.keys` "
                                      "(per-IP limits belong in the load balancer in front)")
    cfg: RateLimitConfig = section(r, {"ratelimit": {k: v for k, v in d.items() if k in convs}}, "ratelimit",
                                   RateLimitConfig, convs)
    if cfg.backend == "redis" and cfg.redis_url is None:
        r.fail("ratelimit.redis_url", "missing: backend redis needs e.g. redis://127.0.0.1:6379/0")
    if cfg.backend == "memory" and cfg.redis_url is not None:
        r.fail("ratelimit.redis_url", "given, but ratelimit.backend is memory (write `backend: redis`)")
    return cfg


def _replica(r: Reader, raw: Any, p: str) -> ReplicaConfig | None:
    d = r.mapping(raw, p, {"url", "weight", "api_key", "api_key_env", "max_in_flight", "ca", "verify"})
    if "url" not in d:
        r.fail(f"{p}.url", "missing")
        return None
    url = r.get(d, "url", p, replica_url, None)
    weight = r.get(d, "weight", p, positive(number), 1.0)
    api_key = d.get("api_key")
    if api_key is not None and not isinstance(api_key, str):
        r.fail(f"{p}.api_key", "must be a string")
        api_key = None
    elif api_key is not None and not _header_safe(api_key):
        r.fail(f"{p}.api_key", _HEADER_SAFE)
        api_key = None
    env = d.get("api_key_env")
    if env is not None:
        if d.get("api_key") is not None:
            r.fail(f"{p}.api_key_env", "give api_key or api_key_env, not both")
        elif not isinstance(env, str) or not env:
            r.fail(f"{p}.api_key_env", "must be the name of an environment variable")
        elif env not in os.environ:
            r.fail_env(f"{p}.api_key_env", f"environment variable {env!r} is not set")
        elif not _header_safe(os.environ[env]):
            r.fail(f"{p}.api_key_env", f"environment variable {env!r}: {_HEADER_SAFE}")
        else:
            api_key = os.environ[env]
    cap = r.get(d, "max_in_flight", p, at_least(1), None)
    ca = d.get("ca")
    if ca is not None and (not isinstance(ca, str) or not os.access(ca, os.R_OK)):
        r.fail(f"{p}.ca", f"cannot read {ca!r} (a PEM file of CA certificates)")
        ca = None
    verify = r.get(d, "verify", p, boolean, True)
    return ReplicaConfig(url, weight, api_key, cap, ca, verify) if url else None


# A replica's key goes into an Authorization header, which is encoded as Latin-1 by our client and
# as UTF-8 by aiohttp's (health checks): only printable ASCII is the same bytes in both, and it is
# what vLLM's --api-key compares against. The key itself is never echoed in the message.
_HEADER_SAFE = "must be a non-empty string of printable ASCII characters (it is sent in an Authorization header)"


def _header_safe(v: str) -> bool:
    return bool(v) and v.isascii() and v.isprintable() and v == v.strip()


def _models(r: Reader, raw: dict[str, Any], default_emit: str) -> tuple[ModelConfig, ...]:
    ms = raw.get("models")
    if not isinstance(ms, list) or not ms:
        r.fail("models", "must be a non-empty list")
        return ()
    out: list[ModelConfig] = []
    ids: set[str] = set()
    first_seen: dict[str, tuple[str, ReplicaConfig]] = {}  # url → (path, config) where it was first listed
    for i, m in enumerate(ms):
        p = f"models[{i}]"
        d = r.mapping(m, p, {"id", "replicas", "reasoning", "reasoning_in", "policy"})
        mid = d.get("id")
        if not isinstance(mid, str) or not mid.strip():
            r.fail(f"{p}.id", "must be a non-empty string (the HuggingFace model id)")
            continue
        if mid in ids:
            r.fail(f"{p}.id", f"duplicate model id {mid!r}")
        ids.add(mid)
        reps_raw = d.get("replicas")
        if not isinstance(reps_raw, list) or not reps_raw:
            r.fail(f"{p}.replicas", "must be a non-empty list")
            reps_raw = []
        reps = [_replica(r, x, f"{p}.replicas[{j}]") for j, x in enumerate(reps_raw)]
        urls = [x.url for x in reps if x]
        if len(set(urls)) != len(urls):
            r.fail(f"{p}.replicas", "the same url is listed twice")
        _same_server(r, first_seen, reps, p)
        emit = r.get(d, "reasoning", p, _reasoning_emit, default_emit)
        out.append(ModelConfig(
            id=mid,
            replicas=tuple(x for x in reps if x),
            reasoning=emit,
            reasoning_in=r.get(d, "reasoning_in", p, boolean, True),
            policy=r.get(d, "policy", p, choice(POLICIES), "least"),
        ))
    return tuple(out)


def _same_server(r: Reader, first_seen: dict[str, tuple[str, ReplicaConfig]],
                 reps: list[ReplicaConfig | None], p: str) -> None:
    """A URL listed under several models is one server (one replica object, one breaker): it has
    one key and one share of traffic, so every listing must agree on api_key and weight."""
    for j, x in enumerate(reps):
        if x is None:
            continue
        seen = first_seen.setdefault(x.url, (f"{p}.replicas[{j}]", x))
        if seen[1] is not x and (seen[1].api_key, seen[1].weight) != (x.api_key, x.weight):
            r.fail(f"{p}.replicas[{j}]", f"{x.url} is also listed at {seen[0]} with another api_key or weight "
                   "(one server has one key and one weight)")


def _reasoning_emit(v: Any) -> str:
    """``reasoning: both`` or ``reasoning: {emit: both}``."""
    if isinstance(v, dict):
        if set(v) - {"emit"}:
            raise ValueError("unknown key (allowed: emit)")
        v = v.get("emit")
    return str(choice(EMITS)(v))


def parse_config(raw: Any, warnings: list[str] | None = None, base: Path | None = None) -> Config:
    """Validate a raw YAML tree. With ``warnings`` (``teraproxy check``), problems of this machine's
    environment rather than of the file are appended there instead of failing. ``base``: the directory
    relative paths in the config (auth.keys_file) are taken from."""
    r = Reader(warnings)
    top = {"listen", "admin_listen", "auth", "models", "limits", "timeouts", "upstream",
           "health", "breaker", "retry", "log", "reasoning", "load", "queue", "ratelimit", "shutdown",
           "listen_reuse_port", "tls"}
    if not isinstance(raw, dict):
        raise ConfigError(["(top level): must be a mapping of settings"])
    r.mapping(raw, "", top)
    if "listen" not in raw:
        r.fail("listen", "missing (e.g. 127.0.0.1:8080)")
    listen = r.get(raw, "listen", "", parse_listen, Listen("127.0.0.1", 8080))
    admin = r.get(raw, "admin_listen", "", parse_listen, None)
    if admin is not None and admin == listen:
        r.fail("admin_listen", "must differ from listen (metrics and admin never share the API port)")
    emit = r.get(raw, "reasoning", "", _reasoning_emit, "both")
    dur, pdur, pint = parse_duration, positive(parse_duration), at_least(1)
    auth = _auth(r, raw, base)
    cfg = Config(
        listen=listen,
        admin_listen=admin,
        auth=auth,
        ratelimit=_ratelimit(r, raw),
        models=_models(r, raw, emit),
        reasoning=emit,
        limits=section(r, raw, "limits", Limits,
                       {"max_body": positive(parse_size), "body_read": pdur,
                        "max_response": positive(parse_size),
                        "max_event": positive(parse_size)}),
        timeouts=section(r, raw, "timeouts", Timeouts,
                         {"connect": pdur, "headers": pdur, "idle": pdur, "keepalive": pdur,
                          "client_stall": pdur, "first_event_keepalive": dur}),
        upstream=section(r, raw, "upstream", UpstreamPool, {"max_connections": pint, "keepalive": pdur}),
        health=section(r, raw, "health", HealthConfig, {
            "enabled": boolean, "path": url_path, "interval": pdur, "timeout": pdur, "fall": pint,
            "rise": pint, "check_models": boolean, "warmup": boolean, "slow_start": dur}),
        breaker=section(r, raw, "breaker", BreakerConfig,
                        {"failures": pint, "open": pdur, "max_open": pdur, "trial_wait": dur}),
        retry=section(r, raw, "retry", RetryConfig, {"attempts": pint, "budget": fraction, "window": pdur}),
        log=section(r, raw, "log", LogConfig,
                    {"level": choice(("debug", "info", "warning", "error")), "access_log": boolean,
                     "access_log_buffer": positive(parse_size)}),
        load=section(r, raw, "load", LoadConfig, {"enabled": boolean, "path": url_path, "interval": pdur,
                                                  "timeout": pdur, "stale_after": dur}),
        queue=section(r, raw, "queue", QueueConfig, {"max": at_least(0), "timeout": pdur}),
        shutdown=section(r, raw, "shutdown", ShutdownConfig, {"drain": dur}),
        listen_reuse_port=r.get(raw, "listen_reuse_port", "", boolean, False),
        tls=_tls(r, raw),
    )
    if cfg.breaker.max_open < cfg.breaker.open:
        r.fail("breaker.max_open", "must be >= breaker.open")
    if r.problems:
        raise ConfigError(r.problems)
    return cfg


@dataclass(frozen=True)
class ShutdownConfig:
    drain: float = 30.0  # SIGTERM: how long in-flight requests and streams may take to finish


@dataclass(frozen=True)
class TLSConfig:
    cert: str  # PEM certificate chain; re-read on every reload (renewals need no restart)
    key: str


def _tls(r: Reader, raw: dict[str, Any]) -> TLSConfig | None:
    if raw.get("tls") is None:
        return None
    d = r.mapping(raw["tls"], "tls", {"cert", "key"})
    files = {}
    for k in ("cert", "key"):
        v = d.get(k)
        if not isinstance(v, str) or not v:
            r.fail(f"tls.{k}", "missing: the path of a PEM file")
        elif not os.access(v, os.R_OK):
            r.fail(f"tls.{k}", f"cannot read {v}")
        else:
            files[k] = v
    return TLSConfig(files["cert"], files["key"]) if len(files) == 2 else None


def load_config(path: str | os.PathLike[str], warnings: list[str] | None = None) -> Config:
    """Read and validate a config file; every failure is a ConfigError with one line per problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{path}: cannot read config: {e.strerror or e}"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError([f"{path}: invalid YAML{where}: {problem}"]) from None
    return parse_config(raw, warnings, Path(path).parent)
