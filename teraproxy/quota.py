"""Keys' limits on the request path: the limiter built from the config, admission as 429s, usage settled.

The glue between config (what each key may do), ratelimit (the limiters) and usage (what a request
cost), so that ``proxy.py`` only admits before forwarding and settles when it is done.

Invariants: the limiter outlives snapshots (a reload keeps every key's budget and in-flight count;
only its per-key limits change); an admitted request is settled exactly once (``settle`` clears the
decision); a key with no limits costs one dict lookup; the 429 says which limit and when it resets.
"""

from __future__ import annotations

from teraproxy.config import Config, KeyConfig
from teraproxy.errors import RateLimited, RateLimitUnavailable
from teraproxy.ratelimit import (
    BACKEND,
    IN_FLIGHT,
    REQUESTS,
    TOKENS,
    Decision,
    KeyLimits,
    Limiter,
    MemoryLimiter,
    format_reset,
    retry_after_header,
)
from teraproxy.usage import Usage, UsageTap, estimate_prompt


class Quota:
    """The (long-lived) limiter and the limits of each key of one config."""

    __slots__ = ("backend", "by_key", "limiter", "meter_streams")

    def __init__(self, limiter: Limiter, by_key: dict[str, KeyLimits], backend: tuple[object, ...],
                 meter_streams: bool) -> None:
        self.limiter = limiter
        self.by_key = by_key
        self.backend = backend  # the settings the limiter was built with (a reload cannot change them)
        self.meter_streams = meter_streams

    def limits_of(self, key: KeyConfig | None) -> KeyLimits | None:
        return None if key is None else self.by_key.get(key.name)

    def wants_usage(self, limits: KeyLimits | None) -> bool:
        """Ask a stream for its usage chunk: the key has a token limit, or metering counts every stream."""
        return self.meter_streams or (limits is not None and limits.tokens_per_minute is not None)

    def settle(self, key: str, decision: Decision, usage: Usage | None) -> None:
        self.limiter.finish(key, decision, usage.total if usage is not None else 0)


def build_quota(config: Config, previous: Quota | None = None) -> Quota:
    """The quota for ``config``; with ``previous`` (a reload) its limiter is kept and given the new limits."""
    rl = config.ratelimit
    by_key = {k.name: KeyLimits(k.requests_per_minute, k.tokens_per_minute, k.max_in_flight)
              for k in config.auth.keys if k.limited}
    backend = (rl.backend, rl.redis_url, rl.on_backend_error, rl.redis_timeout, rl.lease_ttl)
    if previous is not None:  # the backend settings are restart-only (runtime.RESTART_ONLY pins them)
        previous.limiter.configure(by_key)
        return Quota(previous.limiter, by_key, previous.backend, rl.meter_streams)
    limiter: Limiter
    if rl.backend == "redis" and rl.redis_url is not None:
        from teraproxy.ratelimit_redis import RedisLimiter  # only fleets pay for importing redis

        limiter = RedisLimiter(rl.redis_url, by_key, on_error_allow=rl.on_backend_error == "allow",
                               timeout=rl.redis_timeout, lease_ttl=rl.lease_ttl)
    else:
        limiter = MemoryLimiter(by_key)
    return Quota(limiter, by_key, backend, rl.meter_streams)


def stream_usage(tap: UsageTap | None, body: bytes) -> Usage | None:
    """What a stream cost: its usage chunk, else (a broken or abandoned stream) an estimate from the
    frames relayed, at least one token per content frame."""
    if tap is None:
        return None
    if tap.usage is not None:
        return tap.usage
    produced = tap.estimate()
    return Usage(estimate_prompt(body), produced, estimated=True) if produced else None


_WHAT = {REQUESTS: "requests per minute", TOKENS: "tokens per minute"}


def refusal(name: str, d: Decision) -> RateLimited | RateLimitUnavailable:
    """The error for a denied admission: 429 naming the limit and its reset, or 503 (backend down, deny)."""
    lim = d.limits
    headers = {"Retry-After": retry_after_header(d.retry_after), **d.headers()}
    if d.denied_by == BACKEND:
        return RateLimitUnavailable("The rate-limit service is unavailable; try again shortly.",
                                    headers={"Retry-After": headers["Retry-After"]})
    if d.denied_by == IN_FLIGHT:
        return RateLimited(f"Too many concurrent requests for key '{name}': at most {lim.max_in_flight} in flight. "
                           "Try again when one of them has finished.", code="too_many_concurrent_requests",
                           headers=headers)
    limit = lim.requests_per_minute if d.denied_by == REQUESTS else lim.tokens_per_minute
    reset = d.reset_requests if d.denied_by == REQUESTS else d.reset_tokens
    return RateLimited(f"Rate limit reached for key '{name}' on {_WHAT[str(d.denied_by)]}: limit {limit}. "
                       f"Try again in {format_reset(d.retry_after)} (fully reset in {format_reset(reset)}).",
                       headers=headers)
