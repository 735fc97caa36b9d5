"""Active health checks: one owned, named asyncio task per replica (per URL: a server listed
under two models is probed once), on the app's ClientSession.

Each task probes ``GET health.path`` every ``health.interval`` (±15% jitter, first probe within
a random fraction of a second so a fleet is not probed in lock-step). A replica goes down after
``fall`` consecutive failures and comes back after ``rise`` successes, but only once
``GET /v1/models`` lists the models it is configured for (a model it does not list is taken out
of that model's pool only) and, with ``warmup``, a 1-token request has completed — so users
never pay a cold start (CUDA graph capture) themselves.
A replica assumed up at start-up (upstreams.ASSUMED_UP) is already taking traffic: its first
successful check only confirms its models (no warm-up, it keeps full weight), and its first
failing check takes it down at once: it was never confirmed, so ``fall`` does not apply.
That warm-up is a real generation, so it also counts as the replica's circuit-breaker trial: a
replica that comes back with a passed warm-up has its breaker closed (see upstreams.Replica).
The set of watched replicas follows reloads through ``sync()`` (a new replica gets a task, a removed one
loses its task through ``unwatch()`` once its requests are done); settings are re-read through
``configure()``. Tasks are cancelled and awaited in ``stop()``.
"""

from __future__ import annotations

import logging
import random
import ssl
import time
from collections.abc import Iterable

import aiohttp
import orjson

from teraproxy.config import Config
from teraproxy.upstreams import Replica, ReplicaTasks

log = logging.getLogger("teraproxy.health")

# Every answer a check reads is bounded: past its limit the check fails (a replica cannot make the
# proxy buffer an endless body). vLLM's /health is empty; /v1/models lists a card per model and LoRA
# adapter; a warm-up answer is one token.
HEALTH_MAX = 64 * 1024
MODELS_MAX = 4 * 1024 * 1024
WARMUP_MAX = 1024 * 1024


class AnswerTooLarge(aiohttp.ClientPayloadError):
    """A check's answer went past its limit (an aiohttp.ClientError, so it fails the check)."""


async def read_at_most(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body of ``resp``, or AnswerTooLarge as soon as it is over ``limit`` bytes."""
    if resp.content_length is not None and resp.content_length > limit:
        raise AnswerTooLarge(f"answer of {resp.content_length} bytes is over {limit}")
    parts: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(65536):
        size += len(chunk)
        if size > limit:
            raise AnswerTooLarge(f"answer over {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


class HealthChecker:
    def __init__(self, config: Config, session: aiohttp.ClientSession, rng: random.Random | None = None) -> None:
        self.session = session
        self.rng = rng or random.Random()
        self.tasks = ReplicaTasks("health")
        self.tls: dict[tuple[str, int, bool], ssl.SSLContext] = {}  # https replicas' contexts (app.py fills it)
        self.cfg = config.health
        self.configure(config)

    def configure(self, config: Config) -> None:
        old, self.cfg = self.cfg, config.health
        if old.interval != self.cfg.interval:
            self.tasks.nudge()  # a check now, then at the new interval
        self.warmup_timeout = config.timeouts.headers
        self._timeout = aiohttp.ClientTimeout(total=self.cfg.timeout)

    def sync(self, replicas: Iterable[Replica]) -> None:
        """Watch every replica of the live table that is not watched yet (all of them at start-up)."""
        if not self.cfg.enabled:
            self.tasks.cancel_all()
            for r in replicas:
                if not r.up:  # checks were switched off by a reload: trust it, as at a start without them
                    r.up, r.reason = True, "health checks disabled"
            return
        for r in replicas:
            self.tasks.watch(r, self._watch)

    def unwatch(self, r: Replica) -> None:
        self.tasks.unwatch(r)

    async def stop(self) -> None:
        await self.tasks.stop()

    async def _watch(self, r: Replica) -> None:
        ok_run = fail_run = 0
        await self.tasks.pause(self.rng.uniform(0, min(0.25, self.cfg.interval)))
        while True:
            try:
                ok_run, fail_run = await self._step(r, ok_run, fail_run)
            except Exception:  # a bug must never end the watch: the replica would freeze in its state
                log.exception("health check of %s failed unexpectedly", r.url)
                fail_run, ok_run = fail_run + 1, 0
            await self.tasks.pause(self.cfg.interval * self.rng.uniform(0.85, 1.15))

    async def _step(self, r: Replica, ok_run: int, fail_run: int) -> tuple[int, int]:
        """One check and its consequences; returns the updated (ok_run, fail_run)."""
        ok, why = await self.probe(r)
        if not ok:
            fail_run, ok_run = fail_run + 1, 0
            if r.up and (fail_run >= self.cfg.fall or not r.checked):
                r.mark_down(why)
                log.warning("replica %s (%s) is down: %s", r.url, ", ".join(r.models), why)
            elif not r.up:
                r.reason = why
            r.checked = True
            return ok_run, fail_run
        ok_run, fail_run = ok_run + 1, 0
        if r.up and not r.checked:  # assumed up at start-up and serving already: confirm, no warm-up
            ok, why = await self._admit(r, warm=False)
            r.checked = True
            if ok:
                r.reason = "healthy"
            else:
                r.mark_down(why)
                log.warning("replica %s (%s) is down: %s", r.url, ", ".join(r.models), why)
        elif not r.up and ok_run >= (self.cfg.rise if r.checked else 1):
            ok, why = await self._admit(r, warm=self.cfg.warmup)
            r.checked = True
            if ok:
                # the warm-up was a real generation: it passed the breaker's trial too
                r.mark_up(time.monotonic(), verified=self.cfg.warmup)
                log.info("replica %s (%s) is up", r.url, ", ".join(r.models))
            else:
                ok_run = 0
                r.reason = why
        return ok_run, fail_run

    async def probe(self, r: Replica) -> tuple[bool, str]:
        t0 = time.monotonic()
        try:
            async with self.session.get(r.url + self.cfg.path, timeout=self._timeout,
                                        ssl=self.tls.get(r.origin, True)) as resp:
                await read_at_most(resp, HEALTH_MAX)
                status = resp.status
        except TimeoutError:
            return self._checked(r, t0, False, f"health check timed out after {self.cfg.timeout:g}s")
        except aiohttp.ClientError as e:
            return self._checked(r, t0, False, f"health check failed: {e or type(e).__name__}")
        if status != 200:
            return self._checked(r, t0, False, f"health check answered HTTP {status}")
        return self._checked(r, t0, True, "healthy")

    @staticmethod
    def _checked(r: Replica, t0: float, ok: bool, why: str) -> tuple[bool, str]:
        r.last_check = time.monotonic()
        r.latency = r.last_check - t0
        return ok, why

    def _headers(self, r: Replica) -> dict[str, str]:
        return {"Authorization": r.auth_header} if r.auth_header else {}

    async def _admit(self, r: Replica, warm: bool) -> tuple[bool, str]:
        """Before a replica takes traffic: does it serve our models (those it does not list are
        recorded in ``r.missing``), and, with ``warm``, is it warm?"""
        try:
            if self.cfg.check_models:
                async with self.session.get(r.url + "/v1/models", headers=self._headers(r),
                                            timeout=self._timeout, ssl=self.tls.get(r.origin, True)) as resp:
                    if resp.status != 200:
                        return False, f"/v1/models answered HTTP {resp.status}"
                    doc = orjson.loads(await read_at_most(resp, MODELS_MAX))
                data = doc.get("data") if isinstance(doc, dict) else None
                ids = [str(m.get("id")) for m in data if isinstance(m, dict)] if isinstance(data, list) else []
                listed = ", ".join(ids) or "no model"
                missing = {m: f"serves {listed}, not {m}" for m in r.models if m not in ids}
                if len(missing) == len(r.models):
                    return False, f"serves {listed}, not {' or '.join(r.models)}"
                self._set_missing(r, missing)
                # kept for /v1/models: max_model_len, root, ... as the replica reports them
                r.cards = {m["id"]: m for m in data or () if isinstance(m, dict) and m.get("id") in r.models}
            if warm:
                r.reason = "warming up"
                model = next(m for m in r.models if m not in r.missing)
                body = orjson.dumps({"model": model, "max_tokens": 1, "stream": False,
                                     "messages": [{"role": "user", "content": "ping"}]})
                async with self.session.post(
                        r.url + "/v1/chat/completions", data=body, ssl=self.tls.get(r.origin, True),
                        headers={"Content-Type": "application/json", **self._headers(r)},
                        timeout=aiohttp.ClientTimeout(total=self.warmup_timeout)) as resp:
                    await read_at_most(resp, WARMUP_MAX)
                    if resp.status != 200:
                        return False, f"warm-up request answered HTTP {resp.status}"
        except TimeoutError:
            return False, "admission check timed out"
        except (aiohttp.ClientError, orjson.JSONDecodeError, AttributeError) as e:
            return False, f"admission check failed: {e or type(e).__name__}"
        return True, "healthy"

    @staticmethod
    def _set_missing(r: Replica, missing: dict[str, str]) -> None:
        """A server that does not list one of its models leaves only that model's pool."""
        for m in missing.keys() - r.missing.keys():
            log.warning("replica %s is out of model %s's pool: it %s", r.url, m, missing[m])
        r.missing = missing
