"""The next-token views of concurrent decode sessions, computed together.

Token-level fusion asks every expert's session for its view once per step, and lets an expert
that sat a step out catch up in the background. When several requests fuse at once, their
sessions on one engine mostly need the same work: a few more tokens run through their own KV
cache. `SessionViews` collects the view and catch-up calls that arrive while the engine's worker
is busy and answers them in one job: the sessions that need up to `MAX_TOKENS` tokens run
together, in ONE forward over a batch gathered from their caches (`batch.gather`,
`batch.scatter`); the others (a first prompt, a long re-tokenized tail) run alone, as they would
without company. A view is then what `TransformersSession.top_k` gives with those logits.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import torch

from ensemble.types import NextTokens
from serving.engines.transformers.batch import UnsupportedCacheError, can_drop, gather, scatter
from serving.engines.transformers.session import TransformersSession

Pieces = list[tuple[str, list[int]]]  # text, or the model's own ids (`TransformersSession.give`)


@dataclass
class _Call:
    session: TransformersSession
    given: Pieces  # to append first
    future: asyncio.Future[NextTokens | None]
    k: int = 0  # a view of the top `k` (with the whole distribution if `full`)
    full: bool = False
    ahead: Pieces | None = None  # instead: a catch-up to the text after these (no view)

    def unfed(self) -> list[int]:
        if self.ahead is None:
            return self.session.unfed()
        return self.session.unfed_after(self.ahead)

    def finish(self) -> NextTokens | None:
        """The view; for a catch-up, run what a batch did not."""
        if self.ahead is None:
            return self.session.top_k(self.k, self.full)
        unfed = self.session.unfed_after(self.ahead)
        if unfed:
            self.session.run(unfed)
        return None


def _settle(call: _Call, result: NextTokens | BaseException | None) -> None:
    """On the event loop: answer the caller, unless it has left."""
    if call.future.done():
        return
    if isinstance(result, BaseException):
        call.future.set_exception(result)
    else:
        call.future.set_result(result)


class SessionViews:
    """One engine's queue of view and catch-up calls; its jobs run on the engine's worker thread.

    A batch stays within `MAX_PADDED_TOKENS` (rows x the longest row's length): the sessions
    that would pass it step in further batches of the same job.
    """

    MAX_PADDED_TOKENS = 65536
    MAX_TOKENS = 16  # run per row in a batched forward; longer feeds run alone
    REGROUP_WAIT = 0.25  # at most this share of the last job's time, see `_wait_for_returning`

    def __init__(self, executor: Executor, run: Callable[[Callable[[], None]], None]) -> None:
        self._executor = executor
        self._run = run  # how the worker runs a job (one CPU thread for session work)
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._waiting: list[_Call] = []
        self._scheduled = False
        self._answered: list[TransformersSession] = []  # by the last job
        self.rows_together = 0  # session steps run in a batch with others (for diagnostics)
        self._last_job_s = 0.0
        self.model: Any = None

    async def top_k(
        self, session: TransformersSession, given: Pieces, k: int, full: bool
    ) -> NextTokens:
        """`session`'s view after the `given` pieces (text chosen since its last call)."""
        view = await self._call(session, given, k=k, full=full)
        assert view is not None
        return view

    async def catch_up(self, session: TransformersSession, given: Pieces, ahead: Pieces) -> None:
        """Run `session`'s cache up to the text after `given` and `ahead` (only the last
        position's logits kept), without moving it past `given` (`TransformersSession.prefetch`
        without `every`)."""
        await self._call(session, given, ahead=ahead)

    async def _call(
        self, session: TransformersSession, given: Pieces, **what: Any
    ) -> NextTokens | None:
        future: asyncio.Future[NextTokens | None] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._waiting.append(_Call(session, given, future, **what))
            submit, self._scheduled = not self._scheduled, True
            self._arrived.notify()
        if submit:
            self._submit()
        return await future

    def _submit(self) -> None:
        try:
            self._executor.submit(self._run, self._job)
        except RuntimeError as exc:  # the engine was shut down meanwhile
            self.abort(exc)

    def abort(self, error: BaseException) -> None:
        """Fail every waiting call with `error` (the engine is shutting down)."""
        with self._lock:
            waiting, self._waiting, self._scheduled = self._waiting, [], False
        for call in waiting:
            _post(call, error)

    def _job(self) -> None:
        with self._lock:
            self._wait_for_returning(time.perf_counter() + self.REGROUP_WAIT * self._last_job_s)
            calls, later = _first_per_session(self._waiting)
            self._waiting, self._scheduled = later, bool(later)
        started = time.perf_counter()
        self._answered = [call.session for call in calls]
        try:
            self._answer(calls)
        finally:
            self._last_job_s = time.perf_counter() - started
            if later:
                self._submit()

    def _wait_for_returning(self, deadline: float) -> None:
        """Under the lock: give the sessions the last job answered until `deadline` to ask
        again. Each request's next view comes a moment after its last one (its fusion runs in
        between); without this, the requests that miss a job's start would form a second group
        that always steps while the first waits, and each forward would carry half the rows."""
        while (left := deadline - time.perf_counter()) > 0:
            waiting = {id(call.session) for call in self._waiting}
            if all(id(s) in waiting or s.closed for s in self._answered):
                return
            self._arrived.wait(left)

    @torch.inference_mode()
    def _answer(self, calls: list[_Call]) -> None:
        calls = [call for call in calls if self._given(call)]
        try:
            self._step_together(calls)
        except Exception as exc:  # each caller gets the failure
            for call in calls:
                _post(call, exc)
            return
        for call in calls:
            try:
                result: NextTokens | BaseException | None = call.finish()
            except Exception as exc:  # raised to this call's awaiter
                result = exc
            _post(call, result)

    @staticmethod
    def _given(call: _Call) -> bool:
        """Append the call's pieces; whether it still wants an answer."""
        if call.session.closed or call.future.done():
            return False
        try:
            call.session.give(call.given)
        except Exception as exc:  # raised to this call's awaiter
            _post(call, exc)
            return False
        return True

    def _step_together(self, calls: list[_Call]) -> None:
        """Run the sessions that need a few more tokens in batched forwards. A row that needs
        fewer than the most in its batch runs its last cached tokens again to line up (`gather`
        leaves them out of its cache); where a sliding window forbids that, rows go in batches
        of equal counts."""
        rows: list[tuple[TransformersSession, list[int]]] = []
        for call in calls:
            unfed = call.unfed()
            if 0 < len(unfed) <= self.MAX_TOKENS and call.session.cache is not None:
                rows.append((call.session, unfed))
        most = max((len(unfed) for _, unfed in rows), default=0)
        mixed = all(len(s.cached) > most and can_drop(s.cache, most - len(u)) for s, u in rows)
        groups: dict[int, list[tuple[TransformersSession, list[int]]]] = {}
        for session, unfed in rows:
            groups.setdefault(0 if mixed else len(unfed), []).append((session, unfed))
        for group in groups.values():
            group.sort(key=lambda row: len(row[0].cached))
            while len(group) > 1:
                size = 2
                while (
                    size < len(group)
                    and (size + 1) * len(group[size][0].cached) <= self.MAX_PADDED_TOKENS
                ):
                    size += 1
                self._step(group[:size])
                group = group[size:]

    def _step(self, group: list[tuple[TransformersSession, list[int]]]) -> None:
        sessions = [session for session, _ in group]
        caches = [session.cache for session in sessions]
        most = max(len(unfed) for _, unfed in group)
        again = [most - len(unfed) for _, unfed in group]  # cached tokens run again
        try:
            batch = gather(caches, [len(s.cached) for s in sessions], again)
        except UnsupportedCacheError:  # each runs alone
            return
        rows = [
            s.cached[len(s.cached) - d :] + unfed
            for (s, unfed), d in zip(group, again, strict=True)
        ]
        tokens = torch.tensor(rows, dtype=torch.long)
        logits = batch.step(self.model, tokens)
        scatter(batch, caches)
        self.rows_together += len(group)
        for row, (session, unfed) in enumerate(group):
            session.accept(unfed, logits[row])


def _first_per_session(calls: list[_Call]) -> tuple[list[_Call], list[_Call]]:
    """The first call of each session, and the others: a session's calls run in the order
    made, one job at a time (a background catch-up, then the view asked after it)."""
    first: list[_Call] = []
    later: list[_Call] = []
    seen: set[int] = set()
    for call in calls:
        (later if id(call.session) in seen else first).append(call)
        seen.add(id(call.session))
    return first, later


def _post(call: _Call, result: NextTokens | BaseException | None) -> None:
    """From the worker: hand `result` to the caller's event loop."""
    with contextlib.suppress(RuntimeError):  # that event loop is closed: nobody is waiting
        call.future.get_loop().call_soon_threadsafe(_settle, call, result)
