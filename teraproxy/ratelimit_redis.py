"""The Redis limiter: the same limits as MemoryLimiter, shared by every teraproxy that uses one Redis.

One Lua script per admission and one per finish (only for keys with a token limit or an in-flight
cap), so each check is atomic in Redis: no read-modify-write races between instances. Time is Redis's
own clock (``TIME`` inside the script), so instances with skewed clocks still agree.

Keys in Redis (``{name}`` is a hash tag, so one key's state stays on one Redis Cluster slot):
``tp:{name}`` a hash (tat, tok, at) that expires once it is back to its initial state, and
``tp:{name}:if`` a sorted set of in-flight leases scored by their expiry. A lease lives ``lease_ttl``
seconds and this process renews its live leases every third of that, so a killed instance leaks
its slots for at most ``lease_ttl``.

Failure: each call has a deadline of ``timeout`` (tens of ms). On an error or timeout the decision
follows ``on_backend_error`` (allow: serve unlimited; deny: the caller answers 503), the error is
counted in ``errors``, logged at most once per 10 s, and Redis is left alone for ``retry_after``
seconds before the next try; the connection is re-made by itself on that try. The wire is
redisconn.py: one pipelined connection (see there for why not redis-py).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any

import hiredis

from teraproxy.ratelimit import BACKEND, IN_FLIGHT, REQUESTS, TOKENS, Decision, KeyLimits
from teraproxy.redisconn import RedisConn, RedisError, bulk, encode

log = logging.getLogger("teraproxy.ratelimit")

_DENIED = (None, REQUESTS, TOKENS, IN_FLIGHT)

# Times in microseconds (Redis TIME; exact in a Lua double). Buckets as in ratelimit.py: level refilled
# at L/60 per second up to L; a bucket's fields are written only when the key has that limit, and the
# hash expires when every bucket would be full again (a missing hash reads as full buckets).
_LEVEL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function level(v, at, lim)
  local l = tonumber(v) or lim
  local a = tonumber(at) or now
  if now > a then l = math.min(lim, l + (now - a) * lim / 60000000) end
  return l
end
"""

# KEYS: state hash, lease set. ARGV: rpm, tpm, cap (0 = none), lease id, lease ttl (s).
# Returns {denied (0 none, 1 requests, 2 tokens, 3 in flight), retry ms, remaining requests,
# reset requests ms, remaining tokens, reset tokens ms}: integers, as Redis truncates Lua numbers.
ADMIT = _LEVEL + """
local rpm, tpm, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local st = redis.call('HMGET', KEYS[1], 'r', 'rt', 't', 'tt')
local reqs, toks, denied, wait = 0, 0, 0, 0
if rpm > 0 then reqs = level(st[1], st[2], rpm) end
if tpm > 0 then toks = level(st[3], st[4], tpm) end
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= cap then denied, wait = 3, 1000000 end
end
if denied == 0 and tpm > 0 and toks <= 0 then denied, wait = 2, (0.001 - toks) * 60000000 / tpm end
if denied == 0 and rpm > 0 and reqs < 1 - 1e-9 then denied, wait = 1, (1 - reqs) * 60000000 / rpm end
local full_r, full_t = 0, 0
if denied == 0 then
  if rpm > 0 then
    reqs = reqs - 1
    redis.call('HSET', KEYS[1], 'r', string.format('%.9f', reqs), 'rt', string.format('%.0f', now))
  end
  if tpm > 0 then
    redis.call('HSET', KEYS[1], 't', string.format('%.9f', toks), 'tt', string.format('%.0f', now))
  end
  if cap > 0 then
    local ttl = tonumber(ARGV[5])
    redis.call('ZADD', KEYS[2], now + ttl * 1000000, ARGV[4])
    redis.call('PEXPIRE', KEYS[2], math.ceil(ttl * 1000) + 1000)
  end
end
if rpm > 0 then full_r = (rpm - reqs) * 60000000 / rpm end
if tpm > 0 then full_t = (tpm - toks) * 60000000 / tpm end
if denied == 0 and rpm + tpm > 0 then
  redis.call('PEXPIRE', KEYS[1], math.ceil(math.max(full_r, full_t) / 1000) + 1000)
end
local lv = math.floor(toks)
if lv < 0 then lv = 0 end
return {denied, math.ceil(wait / 1000), math.floor(reqs + 1e-9), math.ceil(full_r / 1000), lv,
        math.ceil(full_t / 1000)}
"""

# KEYS: state hash, lease set. ARGV: tpm (0 = none), tokens to charge, lease id ('' = none).
FINISH = _LEVEL + """
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[2], ARGV[3]) end
local tpm, cost = tonumber(ARGV[1]), tonumber(ARGV[2])
if tpm > 0 and cost > 0 then
  local st = redis.call('HMGET', KEYS[1], 't', 'tt')
  local toks = level(st[1], st[2], tpm) - cost
  redis.call('HSET', KEYS[1], 't', string.format('%.9f', toks), 'tt', string.format('%.0f', now))
  local want = math.ceil((tpm - toks) * 60000 / tpm) + 1000
  if redis.call('PTTL', KEYS[1]) < want then redis.call('PEXPIRE', KEYS[1], want) end
end
return 0
"""

# KEYS: lease set. ARGV: lease ttl (s), lease ids... Only leases still present are renewed.
RENEW = _LEVEL + """
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + ttl * 1000000, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 1000) + 1000)
return 0
"""


_SHA = {script: hashlib.sha1(script.encode()).hexdigest() for script in (ADMIT, FINISH, RENEW)}


class _Key:
    """One key's Redis names and its admission command, encoded once (only the lease id varies)."""

    __slots__ = ("head", "lease_set", "limits", "state", "tail")

    def __init__(self, name: str, limits: KeyLimits, lease_ttl: float) -> None:
        self.state, self.lease_set = f"tp:{{{name}}}", f"tp:{{{name}}}:if"
        self.limits = limits
        parts = encode("EVALSHA", _SHA[ADMIT], 2, self.state, self.lease_set, limits.requests_per_minute or 0,
                       limits.tokens_per_minute or 0, limits.max_in_flight or 0)
        self.head = b"*10" + parts[parts.index(b"\r\n"):]  # 10 items: these 8, the lease id, the ttl
        self.tail = bulk(str(lease_ttl).encode())


class _Ticket:
    __slots__ = ("key", "lease")

    def __init__(self, key: _Key, lease: bytes) -> None:
        self.key = key
        self.lease = lease


class RedisLimiter:
    def __init__(self, url: str, keys: dict[str, KeyLimits], *, on_error_allow: bool = True,
                 timeout: float = 0.05, lease_ttl: float = 30.0, retry_after: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.allow_on_error = on_error_allow
        self.timeout = timeout
        self.lease_ttl = lease_ttl
        self.retry_after = retry_after
        self.clock = clock
        self._errors = 0
        self._keys: dict[str, _Key] = {}
        self.configure(keys)
        self._conn = RedisConn(url, timeout)
        self._down_until = 0.0
        self._logged_at = -1e9
        self._leases: dict[bytes, _Key] = {}  # live leases of this process → their key
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sent: set[asyncio.Future[Any]] = set()  # charges sent without waiting, until their reply
        self._renewer: asyncio.Task[None] | None = None

    # -- the Limiter interface -------------------------------------------------------------------
    def configure(self, keys: dict[str, KeyLimits]) -> None:
        self._keys = {name: _Key(name, lim, self.lease_ttl) for name, lim in keys.items() if lim.any}

    @property
    def errors(self) -> int:
        return self._errors

    async def admit(self, key: str, limits: KeyLimits) -> Decision:
        k = self._keys.get(key)
        if k is None:
            return Decision(limits)
        if k.limits != limits:  # a request still on a snapshot from before a reload
            k = _Key(key, limits, self.lease_ttl)
        cap = limits.max_in_flight
        lease = os.urandom(8).hex().encode() if cap else b""
        res = await self._call(k.head + bulk(lease) + k.tail)
        if res is None:
            return self._fallback(limits)
        denied, wait_ms, rem, reset_ms, tok, tok_reset_ms = res
        d = Decision(limits, _DENIED[denied], wait_ms / 1000, rem, reset_ms / 1000, tok, tok_reset_ms / 1000)
        if d.allowed and (cap or limits.tokens_per_minute):
            d.ticket = _Ticket(k, lease)
            if cap:
                self._leases[lease] = k
                self._ensure_renewer()
        return d

    def finish(self, key: str, decision: Decision, tokens: int) -> None:
        t = decision.ticket
        if not isinstance(t, _Ticket):
            return
        decision.ticket = None
        if t.lease:
            self._leases.pop(t.lease, None)
        tpm = decision.limits.tokens_per_minute or 0
        if not t.lease and not (tpm and tokens > 0):
            return
        cmd = encode("EVALSHA", _SHA[FINISH], 2, t.key.state, t.key.lease_set, tpm, max(0, tokens), t.lease)
        if self.clock() < self._down_until:
            self._errors += 1  # lost: the lease expires by itself, the charge is not made
            return
        fut = self._conn.send_nowait(cmd)
        if fut is None:  # not connected: the ordinary path (connect, deadline) in the background
            self._spawn(self._call(cmd), "teraproxy-ratelimit-finish")
        else:  # sent after the answer, awaited by nobody: no task per request
            self._sent.add(fut)
            fut.add_done_callback(functools.partial(self._finished, cmd))

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109  (close() and tests bound their wait)
        """Wait (up to ``timeout``) for the charges and releases already sent."""
        deadline = self.clock() + timeout
        while (self._tasks or self._sent) and self.clock() < deadline:  # a reply may start a retry task
            await asyncio.wait([*self._tasks, *self._sent], timeout=deadline - self.clock())

    def _finished(self, cmd: bytes, fut: asyncio.Future[Any]) -> None:
        self._sent.discard(fut)
        if fut.cancelled():
            return
        err = fut.exception()
        reply = None if err is not None else fut.result()
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
            self._spawn(self._call(cmd), "teraproxy-ratelimit-finish")  # loads the script first
        elif err is not None or isinstance(reply, hiredis.ReplyError):
            self._failed(err or RedisError(str(reply)), self.clock())

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        await self.drain(self.timeout * 2 + 0.1)  # charges already under way get a short deadline to land
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, *(t for t in [self._renewer] if t), return_exceptions=True)
        await self._conn.close()

    # -- internals -------------------------------------------------------------------------------
    def _fallback(self, limits: KeyLimits) -> Decision:
        if self.allow_on_error:
            return Decision(KeyLimits())  # served as if unlimited: no headers that would be made up
        return Decision(limits, BACKEND, self.retry_after)

    async def _call(self, command: bytes) -> Any:
        """The script's result, or None when Redis failed (counted, logged at most once per 10 s)."""
        now = self.clock()
        if now < self._down_until:
            self._errors += 1
            return None
        try:
            async with asyncio.timeout(self.timeout):
                try:
                    return await self._conn.call(command)
                except RedisError as err:
                    if not str(err).startswith("NOSCRIPT"):
                        raise
                    # a new or restarted Redis: load every script, so a charge never meets NOSCRIPT later
                    await asyncio.gather(*(self._conn.call(encode("SCRIPT", "LOAD", x)) for x in _SHA))
                    return await self._conn.call(command)
        except (RedisError, TimeoutError) as e:
            self._failed(e, now)
            return None

    def _failed(self, e: BaseException, now: float) -> None:
        """Count, log at most once per 10 s, drop the connection and leave Redis alone for a while."""
        self._conn.reset()
        self._errors += 1
        self._down_until = now + self.retry_after
        if now - self._logged_at >= 10.0:
            self._logged_at = now
            log.warning("rate-limit backend (redis) failed: %s; %s requests until it answers again",
                        str(e) or type(e).__name__, "allowing" if self.allow_on_error else "refusing")

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _ensure_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_leases(),
                                                                   name="teraproxy-ratelimit-leases")

    async def _renew_leases(self) -> None:
        """Keep this process's in-flight leases alive while their requests run."""
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            by_set: dict[str, list[bytes]] = {}
            for lease, k in self._leases.items():
                by_set.setdefault(k.lease_set, []).append(lease)
            for lease_set, leases in by_set.items():
                await self._call(encode("EVALSHA", _SHA[RENEW], 1, lease_set, self.lease_ttl, *leases))
