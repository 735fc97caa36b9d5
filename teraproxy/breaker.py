"""A per-replica circuit breaker: a pure state machine with an injected clock.

closed → (``failures`` consecutive failures) → open for ``open_s`` → half-open: exactly one
probe request is let through; its success closes the breaker, its failure re-opens it for
twice the last open period, capped at ``max_open_s``. 4xx answers are not failures: the
caller decides what to record. ``close()`` is the verdict of a trial run elsewhere (the health
check's warm-up generation): it closes the breaker whatever its state.

Each half-open trial's grant is a number of its own (``PROBE`` or above, see :func:`is_probe`), so
the verdict of a probe that outlived its trial (the breaker was closed by ``close()`` and has
tripped again since) is never taken for the verdict of the trial now in flight.
"""

from __future__ import annotations

from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
DENIED, ALLOWED, PROBE = 0, 1, 2  # what acquire() grants: a probe's grant is PROBE or above


def is_probe(grant: int) -> bool:
    return grant >= PROBE


class Breaker:
    __slots__ = (
        "_fails",
        "_next_probe",
        "_open_for",
        "_opened_at",
        "_probe",
        "clock",
        "failures",
        "max_open_s",
        "open_s",
        "trips",
    )

    def __init__(self, failures: int, open_s: float, max_open_s: float, clock: Callable[[], float]) -> None:
        self.failures = failures
        self.open_s = open_s
        self.max_open_s = max_open_s
        self.clock = clock
        self._fails = 0
        self._opened_at: float | None = None  # None: closed
        self._open_for = 0.0
        self._probe = 0  # the grant of the trial in flight; 0: none
        self._next_probe = PROBE
        self.trips = 0

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return CLOSED
        return HALF_OPEN if self.clock() - self._opened_at >= self._open_for else OPEN

    def available(self) -> bool:
        """Could a request be sent now? (Does not take the half-open probe slot.)"""
        st = self.state
        return st == CLOSED or (st == HALF_OPEN and not self._probe)

    def acquire(self) -> int:
        """Permission to send one request: DENIED, ALLOWED, or PROBE (the single half-open try).
        The grant goes back with the verdict: ``record(ok, grant)`` or ``release(grant)``."""
        st = self.state
        if st == CLOSED:
            return ALLOWED
        if st == HALF_OPEN and not self._probe:
            self._probe, self._next_probe = self._next_probe, self._next_probe + 1
            return self._probe
        return DENIED

    def trial_in_flight(self) -> bool:
        """Half-open with its one probe request out: its verdict is due."""
        return bool(self._probe) and self.state == HALF_OPEN

    def release(self, grant: int) -> None:
        """The request ended without a verdict (its client went away)."""
        if is_probe(grant) and grant == self._probe:
            self._probe = 0

    def record(self, ok: bool, grant: int = ALLOWED) -> None:
        if self._opened_at is not None:
            # open or half-open: only the probe's verdict counts; a request sent before the trip
            # that ends now says nothing about the replica since
            if is_probe(grant) and grant == self._probe:
                self._probe = 0
                if ok:
                    self._close()
                else:  # the probe failed: open again, twice as long
                    self._trip(min(self._open_for * 2, self.max_open_s))
            return
        if ok:
            self._fails = 0
            return
        self._fails += 1
        if self._fails >= self.failures:
            self._trip(self.open_s)

    def close(self) -> None:
        """The replica passed a trial outside the breaker: closed, failure count cleared. A probe
        still in flight ends as an ordinary request (its verdict counts like any other)."""
        self._close()
        self._probe = 0  # that probe's grant now matches no trial

    def _close(self) -> None:
        self._fails = 0
        self._opened_at = None
        self._open_for = 0.0

    def _trip(self, open_for: float) -> None:
        self._opened_at = self.clock()
        self._open_for = open_for
        self.trips += 1

    def retry_in(self) -> float:
        """Seconds until a request may be tried (0 when available now)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self._open_for - self.clock())

    def snapshot(self) -> dict[str, object]:
        return {"state": self.state, "consecutive_failures": self._fails,
                "open_for": self._open_for, "retry_in": round(self.retry_in(), 3), "trips": self.trips}
