"""Operational events for ``GET /admin/events`` (Server-Sent Events, via aiohttp-sse).

Replica up/down (with the reason), breaker transitions, reloads (success, or the failing keys) and
drain progress, one JSON object per event. Watching costs the request path nothing: replica and
breaker changes are found by a task that compares the replicas' state every quarter second, and
only while someone watches; reloads and the drain publish directly. Bounded: each watcher has a
queue of ``QUEUE`` events; a watcher that falls that far behind is dropped (its stream gets a last
``dropped`` event), never buffered without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from aiohttp_sse import sse_response

if TYPE_CHECKING:
    from teraproxy.runtime import Live

QUEUE = 256
_POLL = 0.25
_PING = 15.0


class Watcher:
    __slots__ = ("dropped", "queue")

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(QUEUE)
        self.dropped = False


class EventBus:
    def __init__(self) -> None:
        self.watchers: set[Watcher] = set()

    def publish(self, event: str, **fields: Any) -> None:
        if not self.watchers:
            return
        data = orjson.dumps({"ts": round(time.time(), 3), "event": event, **fields})
        for w in list(self.watchers):
            try:
                w.queue.put_nowait(data)
            except asyncio.QueueFull:  # too slow: drop it rather than buffer without limit
                self.watchers.discard(w)
                w.dropped = True
                with contextlib.suppress(asyncio.QueueEmpty):
                    w.queue.get_nowait()
                w.queue.put_nowait(b"")  # wakes its handler, which ends the stream

    def watch(self) -> Watcher:
        w = Watcher()
        self.watchers.add(w)
        return w

    def unwatch(self, w: Watcher) -> None:
        self.watchers.discard(w)


def _states(live: Live) -> dict[str, tuple[bool, str, str]]:
    return {r.url: (r.up, r.reason, r.breaker.state) for r in live.current.replicas}


async def watch_replicas(live: Live, bus: EventBus) -> None:
    """Publish replica up/down and breaker changes while anyone watches."""
    last = _states(live)
    while True:
        await asyncio.sleep(_POLL)
        now = _states(live)
        if bus.watchers:
            for url, (up, reason, breaker) in now.items():
                was = last.get(url)
                if was is None:
                    bus.publish("replica_added", replica=url, up=up, reason=reason)
                    continue
                if up != was[0]:
                    bus.publish("replica_up" if up else "replica_down", replica=url, reason=reason)
                if breaker != was[2]:
                    bus.publish("breaker", replica=url, was=was[2], now=breaker)
            for url in last.keys() - now.keys():
                bus.publish("replica_removed", replica=url)
        last = now


async def handler(request: web.Request, live: Live, bus: EventBus) -> web.StreamResponse:
    w = bus.watch()
    try:
        async with sse_response(request, ping_interval=_PING, send_timeout=10) as resp:
            await resp.send(orjson.dumps({"ts": round(time.time(), 3), "event": "hello",
                                          "sha256": live.current.sha256, "draining": live.draining}).decode())
            while resp.is_connected():
                data = await w.queue.get()
                if w.dropped and not data:
                    await resp.send(orjson.dumps({"event": "dropped", "why": f"over {QUEUE} events behind"}).decode())
                    break
                await resp.send(data.decode())
            return resp
    finally:
        bus.unwatch(w)
