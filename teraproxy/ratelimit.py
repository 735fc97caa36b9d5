"""Per-key limits: requests per minute, tokens per minute, requests in flight.

Pure cores with an injected clock, behind one small interface (:class:`Limiter`):
- requests per minute: a token bucket of L refilled at L/60 per second. A key with a limit of L per
  minute may send L requests at once, then one every 60/L s; never 2L at a window edge.
- tokens per minute: a token bucket that refills at L/60 per second up to L. A request is admitted
  while the bucket is positive (its cost is not known yet); its usage is charged when it finishes,
  which may take the bucket below zero, so a big request delays the next ones by exactly its cost.
- in flight: a count per key, taken at admission and given back by :meth:`Limiter.finish`.

Invariants: a denied request changes no state (it consumes no budget of any kind); state exists only
for keys named in the config (memory does not grow with traffic); ``admit`` + ``finish`` pair up
exactly once per admitted request (the caller releases in ``finally``).

:class:`MemoryLimiter` holds the state in this process. :class:`~teraproxy.ratelimit_redis.RedisLimiter`
keeps the same state in Redis (same arithmetic, in Lua) for a fleet. The proxy never knows which.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

REQUESTS: Final = "requests"
TOKENS: Final = "tokens"
IN_FLIGHT: Final = "in_flight"
BACKEND: Final = "backend"  # the shared store failed and on_backend_error is deny
_EPS: Final = 1e-9  # float slack on a bucket level (<= L): refill arithmetic may miss 1.0 by an ulp


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """A key's limits; None = unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_in_flight: int | None = None

    @property
    def any(self) -> bool:
        return (self.requests_per_minute is not None or self.tokens_per_minute is not None
                or self.max_in_flight is not None)


class Decision:
    """The outcome of one admission: allowed or not, and what the rate-limit headers say.

    ``retry_after`` (seconds) is meaningful when denied. Reset times are seconds until the limit is back to
    its initial state (OpenAI's meaning of ``x-ratelimit-reset-*``). ``ticket`` is the limiter's own handle
    for ``finish`` (None when there is nothing to give back).
    """

    __slots__ = ("allowed", "denied_by", "limits", "remaining_requests", "remaining_tokens", "reset_requests",
                 "reset_tokens", "retry_after", "ticket")

    def __init__(self, limits: KeyLimits, denied_by: str | None = None, retry_after: float = 0.0,
                 remaining_requests: int = 0, reset_requests: float = 0.0, remaining_tokens: int = 0,
                 reset_tokens: float = 0.0, ticket: object = None) -> None:
        self.limits = limits
        self.allowed = denied_by is None
        self.denied_by = denied_by
        self.retry_after = retry_after
        self.remaining_requests = remaining_requests
        self.reset_requests = reset_requests
        self.remaining_tokens = remaining_tokens
        self.reset_tokens = reset_tokens
        self.ticket = ticket

    def headers(self) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers for the limits this key has (empty without rate limits)."""
        out: dict[str, str] = {}
        rpm, tpm = self.limits.requests_per_minute, self.limits.tokens_per_minute
        if rpm is not None:
            out["x-ratelimit-limit-requests"] = str(rpm)
            out["x-ratelimit-remaining-requests"] = str(self.remaining_requests)
            out["x-ratelimit-reset-requests"] = format_reset(self.reset_requests)
        if tpm is not None:
            out["x-ratelimit-limit-tokens"] = str(tpm)
            out["x-ratelimit-remaining-tokens"] = str(self.remaining_tokens)
            out["x-ratelimit-reset-tokens"] = format_reset(self.reset_tokens)
        return out


def format_reset(seconds: float) -> str:
    """A duration as OpenAI writes it in ``x-ratelimit-reset-*``: ``1s``, ``6m0s``, ``1h2m3s``, ``250ms``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    s = math.ceil(seconds)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{sec}s"
    if m:
        return f"{m}m{sec}s"
    return f"{sec}s"


def retry_after_header(seconds: float) -> str:
    """Retry-After in whole seconds, at least 1 (a client waiting 0 s would just be refused again)."""
    return str(max(1, math.ceil(seconds - _EPS)))


# -- the pure arithmetic (the Lua scripts in ratelimit_redis.py mirror it) ------------------------------
# Both limits are token buckets of capacity L refilled at L/60 per second. Taking one request from a
# full bucket is exact integer arithmetic on a float (L - 1 - 1 ...), so a burst of exactly L fits
# whatever L is; refill is recomputed from elapsed time at each step, so no rounding accumulates
# (the GCRA form, adding 60/L to a timestamp per request, drifts by an ulp per step).
def refill(level: float, last: float, now: float, per_minute: int) -> float:
    """A bucket's level at ``now``: refilled at L/60 per second since ``last``, capped at L."""
    if now <= last:
        return level
    return min(float(per_minute), level + (now - last) * per_minute / 60.0)


def seconds_to_full(level: float, per_minute: int) -> float:
    return max(0.0, (per_minute - level) * 60.0 / per_minute)


def seconds_until(level: float, need: float, per_minute: int) -> float:
    """Seconds until a bucket at ``level`` holds ``need``."""
    return max(0.0, (need - level) * 60.0 / per_minute)


class Limiter(Protocol):
    """What the proxy sees of a limiter."""

    async def admit(self, key: str, limits: KeyLimits) -> Decision:
        """Check and take a request's budget (rpm, in-flight) or deny without changing anything."""
        ...

    def finish(self, key: str, decision: Decision, tokens: int) -> None:
        """The admitted request is over: give its in-flight slot back and charge ``tokens``."""
        ...

    def configure(self, keys: dict[str, KeyLimits]) -> None:
        """A reload's limits: new keys get state, removed ones lose it, the others keep their budget."""
        ...

    @property
    def errors(self) -> int:
        """Backend failures so far (teraproxy_ratelimit_backend_errors_total)."""
        ...

    async def close(self) -> None: ...


class _KeyState:
    __slots__ = ("in_flight", "requests", "requests_at", "tokens", "tokens_at")

    def __init__(self, limits: KeyLimits, now: float) -> None:
        self.requests = float(limits.requests_per_minute or 0)
        self.requests_at = now
        self.tokens = float(limits.tokens_per_minute or 0)
        self.tokens_at = now
        self.in_flight = 0


class MemoryLimiter:
    """State for one process; ``keys`` are the names of configured keys (nothing else gets state)."""

    def __init__(self, keys: dict[str, KeyLimits], clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._state: dict[str, _KeyState] = {}
        self.configure(keys)

    def configure(self, keys: dict[str, KeyLimits]) -> None:
        now = self.clock()
        old = self._state
        self._state = {name: old.get(name) or _KeyState(lim, now) for name, lim in keys.items() if lim.any}

    @property
    def errors(self) -> int:
        return 0  # nothing to fail

    async def admit(self, key: str, limits: KeyLimits) -> Decision:
        return self.admit_now(key, limits)

    def admit_now(self, key: str, limits: KeyLimits) -> Decision:
        st = self._state.get(key)
        if st is None:  # no limits configured for this key
            return Decision(limits)
        now = self.clock()
        rpm, tpm, cap = limits.requests_per_minute, limits.tokens_per_minute, limits.max_in_flight
        reqs = refill(st.requests, st.requests_at, now, rpm) if rpm else 0.0
        toks = refill(st.tokens, st.tokens_at, now, tpm) if tpm else 0.0
        denied, wait = None, 0.0
        if cap is not None and st.in_flight >= cap:
            denied, wait = IN_FLIGHT, 1.0
        elif tpm and toks <= 0:
            denied, wait = TOKENS, seconds_until(toks, 1e-3, tpm)
        elif rpm and reqs < 1 - _EPS:
            denied, wait = REQUESTS, seconds_until(reqs, 1.0, rpm)
        if denied is None and rpm:
            reqs -= 1
        d = Decision(limits, denied, wait, int(reqs + _EPS) if rpm else 0, seconds_to_full(reqs, rpm) if rpm else 0,
                     max(0, int(toks)), seconds_to_full(toks, tpm) if tpm else 0.0)
        if denied is None:
            st.requests, st.requests_at = reqs, now
            st.tokens, st.tokens_at = toks, now
            st.in_flight += 1
            d.ticket = st
        return d

    def finish(self, key: str, decision: Decision, tokens: int) -> None:
        st = decision.ticket
        if not isinstance(st, _KeyState):
            return
        decision.ticket = None  # a second finish gives nothing back twice
        st.in_flight -= 1
        tpm = decision.limits.tokens_per_minute
        if tpm is not None and tokens > 0:
            now = self.clock()
            st.tokens = refill(st.tokens, st.tokens_at, now, tpm) - tokens
            st.tokens_at = now

    async def close(self) -> None:
        return None

    def in_flight(self, key: str) -> int:
        st = self._state.get(key)
        return st.in_flight if st else 0
