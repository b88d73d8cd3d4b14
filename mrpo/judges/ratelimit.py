"""Rate limits of an LLM judge endpoint: Retry-After, one back-off shared by a rank's threads, and an
optional requests-per-minute cap.

    gate = RateGate(max_requests_per_minute=500)   # one per judge client, shared by its threads
    gate.wait()                                     # before each POST: sleeps through a pause, takes a slot
    gate.pause(seconds)                             # after a 429 (or a 503 with Retry-After): every thread waits

A 429 means the key's quota is spent for now, for every thread of the rank alike: if each thread backed
off on its own, the others would keep hitting the limit, and all would come back at once (a herd). So a
pause holds every thread at the gate until it ends, and the waiting threads leave spread over a short
window (up to 10% of the pause, at most 1 s) instead of together. The requests-per-minute cap is a token
bucket of capacity 1 refilled at rpm / 60 per second: requests leave at least 60 / rpm s apart, in
the order they asked.
"""
from __future__ import annotations

import email.utils
import random
import threading
import time
from datetime import timezone
from typing import Callable, Mapping


def retry_after_s(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds to wait from a reply's headers, or None when they name none (or nothing parseable).

    Reads `retry-after-ms` (OpenAI's, milliseconds) first, then `Retry-After`: delay seconds ("30"; a
    decimal such as "0.5" is accepted too) or an HTTP date ("Wed, 21 Oct 2026 07:28:00 GMT", relative
    to `now`, epoch seconds, default the wall clock). Negative waits are 0."""
    if not headers:
        return None
    get = headers.get
    ms = get("retry-after-ms") or get("Retry-After-Ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = get("Retry-After") or get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    ref = time.time() if now is None else now
    return max(0.0, when.timestamp() - ref)


def rank_share(max_requests_per_minute: float) -> float:
    """This process's share of a run-wide requests-per-minute cap: rpm / WORLD_SIZE (torchrun's
    environment; 1 without it), since every rank sends with the same key."""
    import os

    return float(max_requests_per_minute or 0) / max(1, int(os.environ.get("WORLD_SIZE", "1")))


class RateGate:
    """A rank's shared back-off and optional rate cap (thread-safe).

    max_requests_per_minute: 0 = no cap. clock / sleep: injectable for tests (monotonic seconds)."""

    def __init__(self, max_requests_per_minute: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        if max_requests_per_minute < 0:
            raise ValueError(f"RateGate: max_requests_per_minute={max_requests_per_minute} must be >= 0")
        self.interval = 60.0 / max_requests_per_minute if max_requests_per_minute else 0.0
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._resume_at = 0.0      # no request leaves before this (a shared pause)
        self._next_slot = 0.0      # earliest time of the next request under the rate cap
        self.paused_s = 0.0        # total pause length set (for reports), overlapping pauses counted once
        self._slept = threading.local()   # .until: the end of the pause this thread last slept through

    def pause(self, seconds: float) -> None:
        """Hold every thread at the gate for `seconds` from now (extends a running pause, never shortens it)."""
        with self._lock:
            now = self._clock()
            end = now + max(0.0, seconds)
            if end > self._resume_at:
                self.paused_s += end - max(now, self._resume_at)
                self._resume_at = end

    def wait(self) -> None:
        """Block until a request may leave: after any pause (plus a spread-out jitter), then in its
        rate-cap slot."""
        while True:
            with self._lock:
                now = self._clock()
                paused = self._resume_at - now
                # over, or this thread already slept through this pause (not extended since)
                if paused <= 0 or self._resume_at == getattr(self._slept, "until", None):
                    slot = max(now, self._next_slot)
                    if self.interval:
                        self._next_slot = slot + self.interval
                    delay = slot - now
                    break
                self._slept.until = self._resume_at
            # leave spread over up to 10% of the pause (<= 1 s), then check again: a pause may have grown
            self._sleep(paused + random.uniform(0.0, min(1.0, 0.1 * paused)))
        if delay > 0:
            self._sleep(delay)


__all__ = ["RateGate", "rank_share", "retry_after_s"]
