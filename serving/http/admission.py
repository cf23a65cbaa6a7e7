"""Admission control: a global limit on requests in flight with a bounded wait, and per-key
request rates. Both are per gateway replica (replicas share nothing, by design)."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque

from serving.api.errors import OverloadedError, RateLimitError, ServiceUnavailableError


class ConcurrencyLimit:
    """At most `limit` requests at once; up to `queue` more wait, each at most `timeout_s`.

    A full queue is refused at once with 429; a wait that runs out is a 503. A slot freed by
    `release` goes straight to the longest waiter, so nobody overtakes the queue.
    """

    def __init__(self, limit: int, queue: int, timeout_s: float) -> None:
        self.limit = limit
        self.queue = queue
        self.timeout_s = timeout_s
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return
        if len(self._waiters) >= self.queue:
            raise OverloadedError(
                f"{self.active} requests are in flight and {self.queue} waiting; retry shortly",
                headers={"Retry-After": "1"},
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancellation that
            # arrives as the slot does, and the abandoned request would then run on unseen.
            async with asyncio.timeout(self.timeout_s):
                await asyncio.shield(waiter)
        except BaseException as exc:  # timed out, or the client went away while waiting
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot arrived as we gave up: pass it on
            else:
                self._waiters.remove(waiter)
                waiter.cancel()
            if isinstance(exc, TimeoutError):
                raise ServiceUnavailableError(
                    f"waited {self.timeout_s:g}s for a free slot; the server is overloaded",
                    headers={"Retry-After": "1"},
                ) from None
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the waiter; `active` is unchanged
                return
        self.active -= 1


class RateLimit:
    """At most `per_minute` requests per key in any sliding minute."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._seen: dict[str, deque[float]] = {}

    def check(self, key: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        times = self._seen.setdefault(key, deque())
        while times and times[0] <= now - 60:
            times.popleft()
        if len(times) >= self.per_minute:
            retry = max(1, math.ceil(times[0] + 60 - now))
            raise RateLimitError(
                f"more than {self.per_minute} requests a minute for this key",
                headers={"Retry-After": str(retry)},
            )
        times.append(now)
        if len(self._seen) > 10_000:  # forget keys idle for a minute, so memory stays bounded
            self._seen = {k: v for k, v in self._seen.items() if v and v[-1] > now - 60}
