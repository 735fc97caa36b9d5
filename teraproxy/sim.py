"""The vLLM simulator behind ``teraproxy sim``: vLLM's OpenAI server byte format, plus fault flags.

Endpoints as vLLM serves them: POST /v1/chat/completions and /v1/completions (streamed as one
``data: {json}\\n\\n`` frame per token, ``data: [DONE]\\n\\n`` last; with ``stream_options.include_usage``
a final ``"choices": []`` usage chunk), GET /v1/models, GET /health, POST /v1/audio/speech.
Reasoning deltas come first under the name the simulated vLLM version uses (``reasoning_content``
up to ~0.11, both in the transition, ``reasoning`` since 0.16). Errors use vLLM's top-level
``{"object": "error", ...}`` shape. Tests steer faults at run time with POST /_sim/faults and read
counters from GET /_sim/stats (real vLLM has neither). Frames are built from pre-encoded pieces so
the simulator is cheap enough to be the upstream of the benchmarks.

Load, as vLLM's scheduler makes it: with ``max_num_seqs`` at most that many generation requests run
at once and the rest wait in FIFO order (a waiting stream has its headers but no token yet, so its time
to first token grows); ``speed`` divides every delay (0.5 = a GPU twice as slow). GET /metrics serves
vLLM v1's scheduler gauges with vLLM's names, types and labels (``model_name``, ``engine``):
``vllm:num_requests_running``, ``vllm:num_requests_waiting`` and ``vllm:kv_cache_usage_perc`` (or the
older ``vllm:gpu_cache_usage_perc`` with ``metrics="gpu"``; no endpoint with ``metrics="none"``).
KV-cache usage is simulated as running / max_num_seqs; ``vllm:request_success_total`` counts completed
requests. Faults ``extra_running``/``extra_waiting`` add load that other clients of the same replica
would cause.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import struct
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

REASONING_FIELDS = ("reasoning", "reasoning_content", "both", "none")
METRICS_STYLES = ("kv", "gpu", "none")  # vllm:kv_cache_usage_perc (v1) | vllm:gpu_cache_usage_perc (v0) | no /metrics
_WORDS = [b" alpha", b" beta", b" gamma", b" delta", b" \xc3\xa9psilon", b" zeta", b" eta", b" theta"]
_TOKENS = [orjson.dumps(w.decode()) for w in _WORDS]  # JSON string literals, quotes included


@dataclass
class Faults:
    """Behaviour a test can switch at run time (POST /_sim/faults with a JSON object of these)."""

    fail_status: int | None = None  # answer generation requests with this status (vLLM error body)
    fail_count: int = 0  # with fail_status: only the next N requests (0 = every request)
    hang_before_headers: bool = False  # generation requests never answer
    reset_after: int | None = None  # streams: abort the TCP connection after N frames
    hang_after: int | None = None  # streams: stop sending (connection open) after N frames
    health_status: int = 200
    health_hang: bool = False
    model: str | None = None  # serve another model id than --model (a replica restarted wrongly)
    api_key: str | None = None  # require this bearer token, answer like vLLM --api-key otherwise
    ttft_ms: float | None = None  # override --ttft
    itl_ms: float | None = None  # override --itl
    extra_running: int = 0  # /metrics reports this many more running requests (other clients' load)
    extra_waiting: int = 0  # ... and this many more waiting ones
    metrics_status: int = 200  # answer GET /metrics with this status (no metrics body unless 200)


@dataclass
class Stats:
    requests: int = 0
    generation_requests: int = 0
    completed: int = 0
    cancelled: int = 0  # client (the proxy) went away before the answer was complete
    active: int = 0
    health_checks: int = 0
    metrics_scrapes: int = 0
    max_running: int = 0  # the most generation requests that ever ran at once
    max_waiting: int = 0
    busy_slot_s: float = 0.0  # integral of running over time (utilisation = busy_slot_s / (max_num_seqs × wall))
    last_body: str = ""
    last_headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SimOptions:
    model: str = "Qwen/Qwen3-8B"
    reasoning_field: str = "reasoning"
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    tokens: int = 16
    max_num_seqs: int = 0  # 0: no limit
    speed: float = 1.0  # delays are divided by this
    metrics: str = "kv"  # one of METRICS_STYLES
    aliases: tuple[str, ...] = ()  # more model ids served (as vLLM --served-model-name a b, or LoRA adapters)


class Scheduler:
    """vLLM's admission in miniature: at most ``max_seqs`` run (0 = no limit), the rest wait FIFO."""

    def __init__(self, max_seqs: int, stats: Stats) -> None:
        self.max_seqs = max_seqs
        self.stats = stats
        self.running = 0
        self.waiters: deque[asyncio.Future[None]] = deque()
        self._since = time.monotonic()

    def account(self) -> None:  # busy_slot_s up to now
        now = time.monotonic()
        self.stats.busy_slot_s += self.running * (now - self._since)
        self._since = now

    async def acquire(self) -> None:
        if not self.waiters and (self.max_seqs <= 0 or self.running < self.max_seqs):
            self.account()
            self.running += 1
            self.stats.max_running = max(self.stats.max_running, self.running)
            return
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        self.stats.max_waiting = max(self.stats.max_waiting, len(self.waiters))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed to us as we were cancelled: pass it on
            elif fut in self.waiters:  # release() may already have dropped it
                self.waiters.remove(fut)
            raise

    def release(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot goes to the next waiter; running is unchanged
                return
        self.account()
        self.running -= 1


class Sim:
    def __init__(self, opts: SimOptions, faults: Faults | None = None) -> None:
        self.opts = opts
        self.faults = faults or Faults()
        self.stats = Stats()
        self.sched = Scheduler(opts.max_num_seqs, self.stats)
        self.created = int(time.time())
        self._ids = itertools.count(1)

    # -- helpers -----------------------------------------------------------------------------
    @property
    def model(self) -> str:
        return self.faults.model or self.opts.model

    def _error(self, status: int, message: str, type_: str) -> web.Response:
        body = {"object": "error", "message": message, "type": type_, "param": None, "code": status}
        return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")

    def _delay(self, which: str) -> float:
        v = getattr(self.faults, which)
        return float(v if v is not None else getattr(self.opts, which)) / 1000.0 / self.opts.speed

    async def _read_request(self, request: web.Request) -> tuple[dict[str, Any] | None, web.Response | None]:
        self.stats.requests += 1
        self.stats.generation_requests += 1
        raw = await request.read()
        self.stats.last_body = raw.decode("utf-8", "replace")
        self.stats.last_headers = dict(request.headers)
        f = self.faults
        if f.api_key is not None and request.headers.get("Authorization") != f"Bearer {f.api_key}":
            return None, web.json_response({"error": "Unauthorized"}, status=401)
        if f.fail_status is not None:
            status = f.fail_status
            if f.fail_count > 0:
                f.fail_count -= 1
                if f.fail_count == 0:
                    f.fail_status = None
            return None, self._error(status, "simulated engine failure", "InternalServerError")
        if f.hang_before_headers:
            await asyncio.sleep(3600)
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            return None, self._error(400, f"invalid JSON: {e}", "BadRequestError")
        if not isinstance(payload, dict):
            return None, self._error(400, "body must be a JSON object", "BadRequestError")
        if payload.get("model") != self.model and payload.get("model") not in self.opts.aliases:
            return None, self._error(404, f"The model `{payload.get('model')}` does not exist.", "NotFoundError")
        return payload, None

    def _n_tokens(self, payload: dict[str, Any]) -> tuple[int, str]:
        n = self.opts.tokens
        for k in ("max_completion_tokens", "max_tokens"):
            v = payload.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                if v < n:
                    return v, "length"
                break
        return n, "stop"

    # -- handlers ----------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        self.stats.requests += 1
        self.stats.health_checks += 1
        if self.faults.health_hang:
            await asyncio.sleep(3600)
        return web.Response(status=self.faults.health_status)

    async def models(self, request: web.Request) -> web.Response:
        self.stats.requests += 1
        m = self.model
        return web.json_response({"object": "list", "data": [{
            "id": i, "object": "model", "created": self.created, "owned_by": "vllm", "root": m,
            "parent": None, "max_model_len": 32768} for i in (m, *self.opts.aliases)]},
            dumps=lambda o: orjson.dumps(o).decode())

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        self.stats.active += 1
        try:
            payload, err = await self._read_request(request)
            if err is not None:
                return err
            assert payload is not None
            if chat and not isinstance(payload.get("messages"), list):
                return self._error(400, "messages: field required", "BadRequestError")
            if not chat and "prompt" not in payload:
                return self._error(400, "prompt: field required", "BadRequestError")
            ttft = self._delay("ttft_ms")
            if payload.get("stream") is True:
                resp = await self._stream(request, payload, chat, ttft)
            else:
                await self.sched.acquire()
                try:
                    if ttft:
                        await asyncio.sleep(ttft + self._delay("itl_ms") * self._n_tokens(payload)[0])
                finally:
                    self.sched.release()
                resp = web.Response(body=self._full(payload, chat), content_type="application/json")
            self.stats.completed += 1
            return resp
        except asyncio.CancelledError:
            self.stats.cancelled += 1
            raise
        finally:
            self.stats.active -= 1

    def _plan(self, payload: dict[str, Any], chat: bool) -> tuple[int, int, str, bool]:
        """(reasoning tokens, content tokens, finish reason, tool call?)"""
        n, finish = self._n_tokens(payload)
        tools = chat and bool(payload.get("tools")) and payload.get("tool_choice") != "none"
        r = 0
        if chat and self.opts.reasoning_field != "none" and n >= 2:
            r = max(1, n // 4)
        return r, n - r, ("tool_calls" if tools and finish == "stop" else finish), tools

    def _full(self, payload: dict[str, Any], chat: bool) -> bytes:
        r, c, finish, tools = self._plan(payload, chat)
        text = "".join(orjson.loads(_TOKENS[i % len(_TOKENS)]) for i in range(r, r + c))
        usage = {"prompt_tokens": 12, "total_tokens": 12 + r + c, "completion_tokens": r + c,
                 "prompt_tokens_details": None}
        rid = next(self._ids)
        if not chat:
            return orjson.dumps({
                "id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()), "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                             "stop_reason": None, "prompt_logprobs": None}],
                "usage": usage, "kv_transfer_params": None})
        msg: dict[str, Any] = {"role": "assistant", "content": None if tools else text, "refusal": None,
                               "annotations": None, "audio": None, "function_call": None, "tool_calls": []}
        if tools:
            msg["tool_calls"] = [{"id": f"chatcmpl-tool-{rid}", "type": "function",
                                  "function": {"name": _tool_name(payload), "arguments": '{"city": "Paris"}'}}]
        thought = "".join(orjson.loads(_TOKENS[i % len(_TOKENS)]) for i in range(r)) if r else None
        rf = self.opts.reasoning_field
        if rf in ("reasoning", "both"):
            msg["reasoning"] = thought
        if rf in ("reasoning_content", "both"):
            msg["reasoning_content"] = thought
        return orjson.dumps({
            "id": f"chatcmpl-{rid}", "object": "chat.completion", "created": int(time.time()), "model": self.model,
            "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": finish,
                         "stop_reason": None}],
            "service_tier": None, "system_fingerprint": None, "usage": usage, "prompt_logprobs": None,
            "kv_transfer_params": None})

    def _frames(self, payload: dict[str, Any], chat: bool) -> list[bytes]:
        r, c, finish, tools = self._plan(payload, chat)
        rid = next(self._ids)
        head = (b'data: {"id":"' + (b"chatcmpl-" if chat else b"cmpl-") + str(rid).encode()
                + b'","object":"' + (b"chat.completion.chunk" if chat else b"text_completion")
                + b'","created":' + str(int(time.time())).encode() + b',"model":' + orjson.dumps(self.model)
                + b',"choices":[{"index":0,')
        tail_open = b',"logprobs":null,"finish_reason":null}]}\n\n' if chat else \
            b',"logprobs":null,"finish_reason":null,"stop_reason":null}],"usage":null}\n\n'

        def fin(reason: str) -> bytes:
            return (b',"logprobs":null,"finish_reason":"' + reason.encode()
                    + (b'","stop_reason":null}]}\n\n' if chat else b'","stop_reason":null}],"usage":null}\n\n'))

        out: list[bytes] = []
        if chat:
            out.append(head + b'"delta":{"role":"assistant","content":""}' + tail_open)
            rf = self.opts.reasoning_field
            for i in range(r):
                tok = _TOKENS[i % len(_TOKENS)]
                if rf == "both":
                    delta = b'"delta":{"reasoning":' + tok + b',"reasoning_content":' + tok + b"}"
                else:
                    delta = b'"delta":{"' + rf.encode() + b'":' + tok + b"}"
                out.append(head + delta + tail_open)
        if tools:
            name = orjson.dumps(_tool_name(payload))
            out.append(head + b'"delta":{"tool_calls":[{"id":"chatcmpl-tool-' + str(rid).encode()
                       + b'","type":"function","index":0,"function":{"name":' + name
                       + b',"arguments":""}}]}' + tail_open)
            parts = ['{"city', '": "Pa', 'ris"}']
            for j, p in enumerate(parts):
                out.append(head + b'"delta":{"tool_calls":[{"index":0,"function":{"arguments":' + orjson.dumps(p)
                           + b"}}]}" + (fin(finish) if j == len(parts) - 1 else tail_open))
        else:
            for i in range(r, r + c):
                tok = _TOKENS[i % len(_TOKENS)]
                body = (b'"delta":{"content":' + tok + b"}") if chat else (b'"text":' + tok)
                out.append(head + body + (fin(finish) if i == r + c - 1 else tail_open))
        so = payload.get("stream_options")
        if isinstance(so, dict) and so.get("include_usage"):
            n = r + c
            out.append(head[: head.index(b'"choices"')] + b'"choices":[],"usage":{"prompt_tokens":12,"total_tokens":'
                       + str(12 + n).encode() + b',"completion_tokens":' + str(n).encode() + b"}}\n\n")
        out.append(b"data: [DONE]\n\n")
        return out

    async def _stream(self, request: web.Request, payload: dict[str, Any], chat: bool,
                      ttft: float) -> web.StreamResponse:
        frames = self._frames(payload, chat)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)  # vLLM sends a stream's headers before the request is scheduled
        await self.sched.acquire()
        try:
            await self._stream_frames(request, resp, frames, ttft)
        finally:
            self.sched.release()
        return resp

    async def _stream_frames(self, request: web.Request, resp: web.StreamResponse, frames: list[bytes],
                             ttft: float) -> None:
        if ttft:
            await asyncio.sleep(ttft)
        f = self.faults
        stop = min(x for x in (f.reset_after, f.hang_after, len(frames)) if x is not None)
        itl = self._delay("itl_ms")
        if itl > 0:
            for i in range(stop):
                if i:
                    await asyncio.sleep(itl)
                await resp.write(frames[i])
        else:  # a fast replica: frames arrive bunched, as vLLM's do under load
            for i in range(0, stop, 32):
                await resp.write(b"".join(frames[i:min(i + 32, stop)]))
        if stop < len(frames):
            if f.reset_after is not None and stop == f.reset_after:
                assert request.transport is not None
                request.transport.abort()
                return
            await asyncio.sleep(3600)  # hang mid-stream until the client goes away
        await resp.write_eof()

    async def speech(self, request: web.Request) -> web.StreamResponse:
        payload, err = await self._read_request(request)
        if err is not None:
            return err
        assert payload is not None
        text = payload.get("input")
        if not isinstance(text, str) or not text:
            return self._error(400, "input: field required", "BadRequestError")
        resp = web.StreamResponse(headers={"Content-Type": "audio/wav"})
        await resp.prepare(request)
        for chunk in _wav_chunks(len(text)):
            await resp.write(chunk)
        await resp.write_eof()
        self.stats.completed += 1
        return resp

    async def set_faults(self, request: web.Request) -> web.Response:
        data = await request.json(loads=orjson.loads)
        names = {f.name for f in fields(Faults)}
        if not isinstance(data, dict) or set(data) - names:
            return web.json_response({"error": f"known faults: {sorted(names)}"}, status=400)
        if data.pop("reset", False):
            self.faults = Faults()
        for k, v in data.items():
            setattr(self.faults, k, v)
        return web.json_response(asdict(self.faults))

    async def get_stats(self, request: web.Request) -> web.Response:
        self.sched.account()  # busy_slot_s up to now
        return web.json_response(asdict(self.stats))

    async def metrics(self, request: web.Request) -> web.Response:
        self.stats.metrics_scrapes += 1  # not in `requests`: tests count those exactly
        if self.faults.metrics_status != 200:
            return web.Response(status=self.faults.metrics_status, text="Not Found")
        return web.Response(body=self.registry_text(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    def registry_text(self) -> bytes:
        reg = CollectorRegistry(auto_describe=False)
        reg.register(_SchedulerCollector(self))
        return generate_latest(reg)


class _SchedulerCollector(Collector):
    """vLLM v1's scheduler gauges (vllm/v1/metrics/loggers.py, PrometheusStatLogger): same names,
    help texts, type and label names (model_name = the served model, engine = the engine index)."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim

    def collect(self) -> Iterator[Metric]:
        sim, f = self.sim, self.sim.faults
        labels, values = ["model_name", "engine"], [sim.model, "0"]
        running = sim.sched.running + f.extra_running
        kv = min(1.0, running / sim.opts.max_num_seqs) if sim.opts.max_num_seqs > 0 else 0.0
        for name, doc, value in (
                ("vllm:num_requests_running", "Number of requests in model execution batches.", running),
                ("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                 len(sim.sched.waiters) + f.extra_waiting)):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, float(value))
            yield g
        if sim.opts.metrics == "gpu":
            g = GaugeMetricFamily("vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage.",
                                  labels=labels)
        else:
            g = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                                  labels=labels)
        g.add_metric(values, kv)
        yield g
        c = CounterMetricFamily("vllm:request_success", "Count of successfully processed requests.",
                                labels=[*labels, "finished_reason"])
        c.add_metric([*values, "stop"], float(sim.stats.completed))
        yield c


def _tool_name(payload: dict[str, Any]) -> str:
    try:
        return str(payload["tools"][0]["function"]["name"])
    except (KeyError, IndexError, TypeError):
        return "tool"


def _wav_chunks(n_chars: int) -> list[bytes]:
    """A real mono 16-bit 8 kHz WAV: a 440 Hz tone, 20 ms of audio per input character."""
    rate, n = 8000, 160 * max(1, n_chars)
    samples = b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / rate))) for i in range(n))
    header = (b"RIFF" + struct.pack("<I", 36 + len(samples)) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate,
              rate * 2, 2, 16) + b"data" + struct.pack("<I", len(samples)))
    data = header + samples
    return [data[i:i + 4096] for i in range(0, len(data), 4096)]


def create_sim_app(opts: SimOptions, faults: Faults | None = None) -> tuple[web.Application, Sim]:
    sim = Sim(opts, faults)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", sim.chat)
    app.router.add_post("/v1/completions", sim.completions)
    app.router.add_post("/v1/audio/speech", sim.speech)
    app.router.add_get("/v1/models", sim.models)
    app.router.add_get("/health", sim.health)
    if opts.metrics != "none":
        app.router.add_get("/metrics", sim.metrics)
    app.router.add_post("/_sim/faults", sim.set_faults)
    app.router.add_get("/_sim/stats", sim.get_stats)
    return app, sim


async def start_sim(host: str, port: int, opts: SimOptions,
                    faults: Faults | None = None) -> tuple[web.AppRunner, Sim]:
    app, sim = create_sim_app(opts, faults)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, keepalive_timeout=75)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=2048).start()
    return runner, sim
