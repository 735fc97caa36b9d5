"""admission.py: the fair queue's pure core (injected clock, hypothesis) and its asyncio shell."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teraproxy.admission import CLASS_OF, Admission, FairQueue
from teraproxy.errors import QueueFull, QueueTimeout

pytestmark = pytest.mark.timeout(30)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _drain(q: FairQueue) -> list[str]:
    out = []
    while (e := q.pop()) is not None:
        out.append(e.key)
    return out


def test_round_robin_over_keys_fifo_within_a_key() -> None:
    q = FairQueue(100, 10, Clock())
    entries = [q.push("flood") for _ in range(5)]
    q.push("b")
    q.push("c")
    q.push("b")
    first = q.pop()
    assert first is entries[0]
    # the flooding key's next four wait behind one request of every other key, in turn
    assert _drain(q) == ["b", "c", "flood", "b", "flood", "flood", "flood"]


def test_a_new_key_is_served_before_keys_taking_turns() -> None:
    """A quiet key's one request takes the next grant, not the one after the busy key's next."""
    q = FairQueue(100, 10, Clock())
    for _ in range(10):
        q.push("flood")
    assert q.pop().key == "flood"  # type: ignore[union-attr]  # flood now takes turns
    q.push("solo")
    assert q.pop().key == "solo"  # type: ignore[union-attr]
    # two new keys: in arrival order, both before the busy key
    q.push("x")
    q.push("y")
    assert [q.pop().key for _ in range(3)] == ["x", "y", "flood"]  # type: ignore[union-attr]


def test_a_key_cannot_stay_new_by_emptying_its_queue() -> None:
    """After its turn a new key waits in the round robin (with nothing queued) until its turn comes
    round; a request it sends before then takes that turn, not a new key's place."""
    q = FairQueue(100, 10, Clock())
    for k in ("a", "b", "c"):
        for _ in range(3):
            q.push(k)
    assert [q.pop().key for _ in range(3)] == ["a", "b", "c"]  # type: ignore[union-attr]
    q.push("sly")
    assert q.pop().key == "sly"  # type: ignore[union-attr]
    q.push("sly")  # its queue was empty, but its place in the ring is kept: behind a, b, c
    assert _drain(q) == ["a", "b", "c", "sly", "a", "b", "c"]
    q.push("sly")  # its placeholder was used: new again
    q.push("a")
    assert _drain(q) == ["sly", "a"]


def test_bounded_and_removal_frees_a_place_at_once() -> None:
    q = FairQueue(2, 10, Clock())
    a = q.push("a")
    assert q.push("a") is not None and q.push("b") is None and len(q) == 2
    assert a is not None
    q.remove(a)
    q.remove(a)  # idempotent
    assert len(q) == 1 and q.push("b") is not None
    assert _drain(q) == ["a", "b"]


def test_deadlines_expire_and_pop_never_returns_an_expired_entry() -> None:
    clock = Clock()
    q = FairQueue(10, 5, clock)
    q.push("a")
    clock.t += 3
    late = q.push("b")
    clock.t += 2.5  # a is past its deadline, b is not
    assert q.pop() is late and q.pop() is None
    q.push("c")
    clock.t += 6
    assert [e.key for e in q.expire()] == ["c"] and len(q) == 0


def test_priorities_first_with_a_floor_share_for_lower_classes() -> None:
    q = FairQueue(10_000, 10, Clock())
    for _ in range(1000):
        q.push("hi", CLASS_OF["high"])
    for _ in range(300):
        q.push("mid", CLASS_OF["normal"])
    for _ in range(100):
        q.push("lo", CLASS_OF["low"])
    first = [q.pop().key for _ in range(1000)]  # type: ignore[union-attr]
    assert first[:3] == ["hi"] * 3 and first[3] == "mid"  # high first; normal every 4th grant
    counts = Counter(first)
    assert counts["lo"] >= 90 and counts["mid"] >= 240 and counts["hi"] >= 600
    gaps = [i for i, k in enumerate(first) if k == "lo"]
    assert gaps[0] < 10 and max(b - a for a, b in itertools.pairwise(gaps)) <= 11
    # with only high and low waiting, low gets exactly one grant in ten
    q2 = FairQueue(10_000, 10, Clock())
    for _ in range(100):
        q2.push("hi", 0)
        q2.push("lo", 2)
    assert Counter(q2.pop().key for _ in range(100)) == {"hi": 90, "lo": 10}  # type: ignore[union-attr]
    # a lone lower class is served at once, and without high traffic normal precedes low
    q3 = FairQueue(10, 10, Clock())
    q3.push("lo", 2)
    q3.push("mid", 1)
    assert _drain(q3) == ["mid", "lo"]


ops = st.lists(st.one_of(
    st.tuples(st.just("push"), st.sampled_from(["a", "b", "c", "d"]), st.integers(0, 2)),
    st.tuples(st.just("pop"), st.just(""), st.just(0)),
    st.tuples(st.just("remove"), st.just(""), st.integers(0, 50)),
    st.tuples(st.just("tick"), st.just(""), st.integers(0, 3)),
), max_size=200)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_invariants_under_any_sequence(seq: list[tuple[str, str, int]]) -> None:
    """Size is exact; nothing is lost, returned twice or returned after removal or its deadline;
    within a key, entries come out in push order."""
    clock = Clock()
    q = FairQueue(20, 5, clock)
    pushed: list[Any] = []
    out: set[int] = set()
    removed: set[int] = set()
    last_of_key: dict[tuple[str, int], int] = {}
    for op, key, n in seq:
        if op == "push":
            e = q.push(key, n)
            live = len(pushed) - len(out) - len(removed)
            assert (e is None) == (live >= 20)
            if e is not None:
                pushed.append(e)
        elif op == "pop":
            e = q.pop()
            if e is not None:
                i = next(j for j, x in enumerate(pushed) if x is e)
                assert i not in out and i not in removed and e.deadline > clock.t
                assert i > last_of_key.get((e.key, e.cls), -1)
                last_of_key[(e.key, e.cls)] = i
                out.add(i)
            # an entry skipped because its deadline passed is gone too
            for j, x in enumerate(pushed):
                if j not in out and j not in removed and not x.live:
                    removed.add(j)
            if e is None:
                assert len(q) == 0
        elif op == "remove" and pushed:
            j = n % len(pushed)
            q.remove(pushed[j])
            if j not in out:
                removed.add(j)
        else:
            clock.t += n
        assert len(q) == len(pushed) - len(out) - len(removed)


# -- the asyncio shell -------------------------------------------------------------------------------
class Slots:
    """A stand-in for a model's replicas: ``free`` slots; the proxy's acquire/release."""

    def __init__(self, free: int) -> None:
        self.free = free

    def room(self) -> int:
        return self.free


async def _admitted(adm: Admission, slots: Slots, key: str, prio: str, log: list[str]) -> None:
    if adm.busy() or slots.free <= 0:
        await adm.wait(key, prio)
    slots.free -= 1  # taken with no await after the grant
    log.append(key)


async def test_shell_grants_on_capacity_freed_in_fair_order() -> None:
    slots = Slots(0)
    adm = Admission("m", 100, 10, slots.room)
    log: list[str] = []
    tasks = [asyncio.create_task(_admitted(adm, slots, k, "normal", log))
             for k in ["flood"] * 4 + ["b", "c"]]
    await asyncio.sleep(0)
    assert len(adm.q) == 6 and not log
    for _ in range(6):
        slots.free += 1
        adm.freed()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert log == ["flood", "b", "c", "flood", "flood", "flood"]
    assert adm.reserved == 0 and len(adm.q) == 0


async def test_a_newcomer_cannot_take_a_slot_granted_to_a_waiter() -> None:
    slots = Slots(0)
    adm = Admission("m", 100, 10, slots.room)
    log: list[str] = []
    waiter = asyncio.create_task(_admitted(adm, slots, "old", "normal", log))
    await asyncio.sleep(0)
    slots.free = 1
    adm.freed()  # the slot is reserved for "old" before it runs
    newcomer = asyncio.create_task(_admitted(adm, slots, "new", "high", log))
    await waiter
    slots.free += 1
    adm.freed()
    await newcomer
    assert log == ["old", "new"]


async def test_full_queue_and_timeout_answer_503_with_retry_after() -> None:
    adm = Admission("m", 1, 0.05, lambda: 0)
    t = asyncio.create_task(adm.wait("a", "normal"))
    await asyncio.sleep(0)
    with pytest.raises(QueueFull) as full:
        await adm.wait("b", "normal")
    assert full.value.status == 503 and full.value.headers["Retry-After"] == "1"
    with pytest.raises(QueueTimeout) as late:
        await t
    assert late.value.status == 503 and late.value.code == "queue_timeout" and "Retry-After" in late.value.headers
    assert len(adm.q) == 0 and adm.reserved == 0


async def test_a_cancelled_waiter_leaves_at_once_and_a_granted_one_passes_its_slot_on() -> None:
    slots = Slots(0)
    adm = Admission("m", 10, 10, slots.room)
    log: list[str] = []
    gone = asyncio.create_task(_admitted(adm, slots, "gone", "normal", log))
    nxt = asyncio.create_task(_admitted(adm, slots, "next", "normal", log))
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    assert len(adm.q) == 1
    third = asyncio.create_task(_admitted(adm, slots, "third", "normal", log))
    await asyncio.sleep(0)
    slots.free = 1
    adm.freed()  # granted to "next" ...
    nxt.cancel()  # ... whose client leaves before it runs: the slot goes to "third"
    await asyncio.gather(nxt, return_exceptions=True)
    await third
    assert log == ["third"] and adm.reserved == 0 and len(adm.q) == 0


async def test_a_waiter_is_admitted_at_once_when_there_is_room() -> None:
    adm = Admission("m", 10, 10, lambda: 1)
    await asyncio.wait_for(adm.wait(None, "low"), 5)  # anonymous traffic is one key
    assert adm.reserved == 0
