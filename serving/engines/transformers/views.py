"""The next-token views of concurrent decode sessions, computed together.

Token-level fusion asks every expert's session for its view once per step. When several requests
fuse at once, their sessions on one engine mostly need the same work: one more token run through
their own KV cache. `SessionViews` collects the view calls that arrive while the engine's worker
is busy and answers them in one job: the sessions that need exactly one token step together, in
ONE forward over a batch gathered from their caches (`batch.gather`, `batch.scatter`); the others
(a first prompt, a re-tokenized tail, a catch-up over several tokens) run alone, as they would
without company. Each answer is then what `TransformersSession.top_k` gives with those logits.
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
from serving.engines.transformers.batch import UnsupportedCacheError, gather, scatter
from serving.engines.transformers.session import TransformersSession


@dataclass
class _Call:
    session: TransformersSession
    given: list[tuple[str, list[int]]]  # pieces to append first (`TransformersSession.give`)
    k: int
    full: bool
    future: asyncio.Future[NextTokens]


def _settle(call: _Call, result: NextTokens | BaseException) -> None:
    """On the event loop: answer the caller, unless it has left."""
    if call.future.done():
        return
    if isinstance(result, BaseException):
        call.future.set_exception(result)
    else:
        call.future.set_result(result)


class SessionViews:
    """One engine's queue of view calls; its jobs run on the engine's worker thread.

    A batch stays within `MAX_PADDED_TOKENS` (rows x the longest row's length): the sessions
    that would pass it step in further batches of the same job.
    """

    MAX_PADDED_TOKENS = 65536
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
        self,
        session: TransformersSession,
        given: list[tuple[str, list[int]]],
        k: int,
        full: bool,
    ) -> NextTokens:
        """`session`'s view after the `given` pieces (text chosen since its last call)."""
        future: asyncio.Future[NextTokens] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._waiting.append(_Call(session, given, k, full, future))
            submit, self._scheduled = not self._scheduled, True
            self._arrived.notify()
        if submit:
            try:
                self._executor.submit(self._run, self._job)
            except RuntimeError as exc:  # the engine was shut down meanwhile
                self.abort(exc)
        return await future

    def abort(self, error: BaseException) -> None:
        """Fail every waiting call with `error` (the engine is shutting down)."""
        with self._lock:
            waiting, self._waiting, self._scheduled = self._waiting, [], False
        for call in waiting:
            _post(call, error)

    def _job(self) -> None:
        with self._lock:
            self._wait_for_returning(time.perf_counter() + self.REGROUP_WAIT * self._last_job_s)
            calls, self._waiting, self._scheduled = self._waiting, [], False
        started = time.perf_counter()
        self._answered = [call.session for call in calls]
        try:
            self._answer(calls)
        finally:
            self._last_job_s = time.perf_counter() - started

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

    def _answer(self, calls: list[_Call]) -> None:
        calls = [call for call in calls if self._given(call)]
        try:
            with torch.inference_mode():
                self._step_together(calls)
        except Exception as exc:  # each caller gets the failure
            for call in calls:
                _post(call, exc)
            return
        for call in calls:
            try:
                result: NextTokens | BaseException = call.session.top_k(call.k, call.full)
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
        """Run the sessions that need one more token in batched forwards."""
        stepping: list[tuple[TransformersSession, int]] = []
        for call in calls:
            unfed = call.session.unfed()
            if len(unfed) == 1 and call.session.cache is not None:
                stepping.append((call.session, unfed[0]))
        stepping.sort(key=lambda item: len(item[0].cached))
        while len(stepping) > 1:
            rows = 2
            while (
                rows < len(stepping)
                and (rows + 1) * len(stepping[rows][0].cached) <= self.MAX_PADDED_TOKENS
            ):
                rows += 1
            group, stepping = stepping[:rows], stepping[rows:]
            self._step(group)

    def _step(self, group: list[tuple[TransformersSession, int]]) -> None:
        sessions = [session for session, _ in group]
        caches = [session.cache for session in sessions]
        try:
            batch = gather(caches, [len(session.cached) for session in sessions])
        except UnsupportedCacheError:  # each runs alone in its own `top_k`
            return
        tokens = torch.tensor([token for _, token in group], dtype=torch.long)
        logits = batch.step(self.model, tokens)
        scatter(batch, caches)
        self.rows_together += len(group)
        for row, (session, token) in enumerate(group):
            session.accept(token, logits[row])


def _post(call: _Call, result: NextTokens | BaseException) -> None:
    """From the worker: hand `result` to the caller's event loop."""
    with contextlib.suppress(RuntimeError):  # that event loop is closed: nobody is waiting
        call.future.get_loop().call_soon_threadsafe(_settle, call, result)
