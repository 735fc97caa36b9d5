"""The per-model admission queue: where a request waits while every replica is at its max_in_flight.

``FairQueue`` is the pure core (no asyncio, an injected clock): entries are grouped by priority class
(high, normal, low) and, inside a class, by key. ``pop()`` chooses the highest class with entries,
except that a lower class keeps a floor share however busy the higher ones are: ``normal`` gets at
least one grant in every 4, ``low`` one in every 10, while they have entries. Inside the class it
takes the next key in round robin over the keys with entries (deficit round robin with a cost of one
request per turn: one key's 2,000 queued requests wait behind one request of every other key), and
that key's oldest entry (FIFO within a key). A key that joins with nothing queued is a *new* key and
is served before the keys already taking turns (FQ-CoDel's new flows, RFC 8290 §4.2): an interactive
user's one request waits for the next free slot, not behind one more request of every busy key. After
its turn a new key joins the round robin's end, and stays there (even with nothing queued) until its
turn comes round, so a key cannot stay new by emptying its queue after each grant. Every entry
carries its deadline; ``pop()`` never returns an expired one. Removal (a client that left, a
timeout) is O(1): the entry is marked and skipped later, the counts change at once. Anonymous
traffic (``auth: off``) is one key.

``Admission`` is the asyncio shell one ModelPool owns: ``wait()`` queues a request and returns once a
slot was granted to it (or raises 503 ``queue_full`` / ``queue_timeout``); ``freed()`` is the
"capacity freed" event the proxy sends when an attempt to this model's replicas ends. A granted slot
is reserved for its waiter until it runs, so a newcomer cannot take it; a waiter cancelled after its
grant (its client left) passes the slot on.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from teraproxy.errors import QueueFull, QueueTimeout

CLASSES = ("high", "normal", "low")
FLOOR_EVERY = (1, 4, 10)  # a waiting class gets at least one grant in this many
CLASS_OF = {name: i for i, name in enumerate(CLASSES)}


@dataclass(eq=False, slots=True)
class Entry:
    key: str
    cls: int
    deadline: float
    live: bool = True
    fut: asyncio.Future[None] | None = field(default=None, repr=False)


class _Class:
    __slots__ = ("fresh", "keys", "ring")

    def __init__(self) -> None:
        self.keys: dict[str, deque[Entry]] = {}  # every key in ``fresh`` or ``ring`` (exactly one of them)
        self.fresh: deque[str] = deque()  # new keys, served first, in arrival order
        self.ring: deque[str] = deque()  # keys taking turns (entries live or not yet skipped; a new key
        #                                  after its turn, possibly with none left), in turn order


class FairQueue:
    """Bounded, deadline-carrying, fair across keys, priority classes with floor shares. Pure."""

    def __init__(self, max_size: int, timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_size = max_size
        self.timeout = timeout
        self.clock = clock
        self._classes = tuple(_Class() for _ in CLASSES)
        self._live = [0, 0, 0]  # live entries per class
        self._starved = [0, 0, 0]  # grants in a row that went to another class while this one waited
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def push(self, key: str, cls: int = 1) -> Entry | None:
        """Queue an entry; None when the queue is full."""
        if self.size >= self.max_size:
            return None
        e = Entry(key, cls, self.clock() + self.timeout)
        c = self._classes[cls]
        q = c.keys.get(key)
        if q is None:
            q = c.keys[key] = deque()
            c.fresh.append(key)
        q.append(e)
        self._live[cls] += 1
        self.size += 1
        return e

    def remove(self, e: Entry) -> None:
        """Take a waiting entry out (its client left or its deadline passed); idempotent."""
        if e.live:
            e.live = False
            self._live[e.cls] -= 1
            self.size -= 1

    def expire(self) -> list[Entry]:
        """Remove and return every entry whose deadline has passed (O(n); the shell uses timers)."""
        now = self.clock()
        out = [e for c in self._classes for q in c.keys.values() for e in q if e.live and e.deadline <= now]
        for e in out:
            self.remove(e)
        return out

    def pop(self) -> Entry | None:
        """The next entry to admit, removed from the queue; None when nothing live is waiting."""
        now = self.clock()
        while self.size:
            cls = self._next_class()
            e = self._pop_class(cls)
            if e is None:
                continue  # only dead entries were left there; counts were already right
            self.remove(e)
            if e.deadline > now:
                return e
        return None

    def _next_class(self) -> int:
        """The highest class with live entries, unless a lower one is owed its floor share: while it
        has entries, class c gets at least one grant in every FLOOR_EVERY[c]."""
        live, starved = self._live, self._starved
        chosen = -1
        for i in range(1, len(CLASSES)):  # the highest class owed its share, if any
            if live[i] and starved[i] >= FLOOR_EVERY[i] - 1:
                chosen = i
                break
        if chosen < 0:
            chosen = next(i for i in range(len(CLASSES)) if live[i])
        for i in range(len(CLASSES)):
            starved[i] = starved[i] + 1 if live[i] and i != chosen else 0
        return chosen

    def _pop_class(self, cls: int) -> Entry | None:
        c = self._classes[cls]
        for turns, new in ((c.fresh, True), (c.ring, False)):
            while turns:
                key = turns.popleft()
                q = c.keys[key]
                while q and not q[0].live:
                    q.popleft()
                if not q:
                    del c.keys[key]
                    continue
                e = q.popleft()
                while q and not q[0].live:
                    q.popleft()
                if q or new:
                    c.ring.append(key)  # its next request waits for every other key's turn
                else:
                    del c.keys[key]
                return e
        return None

    def depth(self) -> int:
        return self.size


class Admission:
    """One model's queue. ``room()`` says how many more requests its replicas take right now."""

    def __init__(self, model: str, max_size: int, timeout: float, room: Callable[[], int],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model
        self.q = FairQueue(max_size, timeout, clock)
        self.room = room
        self.reserved = 0  # slots granted to woken waiters that have not taken them yet

    def busy(self) -> bool:
        """True while others wait (or hold a granted slot): a newcomer must queue behind them."""
        return self.q.size > 0 or self.reserved > 0

    async def wait(self, key: str | None, priority: str) -> None:
        e = self.q.push(key or "", CLASS_OF.get(priority, 1))
        if e is None:
            raise QueueFull(f"Too many requests are waiting for model '{self.model}'; try again shortly.",
                            headers={"Retry-After": "1"})
        e.fut = fut = asyncio.get_running_loop().create_future()
        self.freed()  # there may be room already (a replica came back, or we are first in line)
        try:
            async with asyncio.timeout(max(0.0, e.deadline - self.q.clock())):
                await fut
        except TimeoutError:
            self.q.remove(e)
            if fut.done() and not fut.cancelled():
                self._pass_on()  # granted at the last moment: the slot goes to the next one
            wait = max(1, math.ceil(self.q.timeout))
            raise QueueTimeout(f"The request waited {self.q.timeout:g}s for a free replica of model "
                               f"'{self.model}'; try again later.", headers={"Retry-After": str(wait)}) from None
        except asyncio.CancelledError:  # the client went away: leave the queue at once
            self.q.remove(e)
            if fut.done() and not fut.cancelled():
                self._pass_on()
            raise
        self.reserved -= 1  # the caller takes the slot now, with no await in between

    def _pass_on(self) -> None:
        self.reserved -= 1
        self.freed()

    def freed(self) -> None:
        """Capacity freed (or may have): grant slots to waiters while the replicas have room."""
        if not self.q.size:
            return
        free = self.room() - self.reserved
        while free > 0:
            e = self.q.pop()
            if e is None:
                return
            assert e.fut is not None
            if e.fut.done():  # its timer fired in this same loop iteration; it removes itself
                continue
            e.fut.set_result(None)
            self.reserved += 1
            free -= 1
