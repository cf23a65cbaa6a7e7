"""What token-level strategies share: decode sessions kept in step with the chosen text, experts
left out when they fail, stop strings, length limits, the request's sampling of each piece, output
chunks, and a record of every step."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from ensemble.engine import DecodeSession, Engine, LookaheadSession, SessionEngine
from ensemble.errors import ExpertFailed
from ensemble.fusion import FloatArray, pick
from ensemble.text import StopScanner
from ensemble.types import (
    Candidate,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    NextTokens,
    Piece,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
)


@dataclass(frozen=True, slots=True)
class Step:
    """One chosen piece of text: who it came from, with what weights, and what it cost."""

    text: str
    producer: str  # the expert credited with the piece
    weights: dict[str, float]  # the weights used; {primary: 1.0} on a gated step
    gated: bool  # the primary was sure enough to decide alone
    seconds: float


StepObserver = Callable[[Step], None]


def session_engines(experts: Sequence[Engine], strategy: str) -> list[SessionEngine]:
    """The experts as session engines; TypeError names those without decode sessions. The
    gateway asks this at start-up (`_check_token_level_pools`), so a strategy never meets one."""
    engines = [e for e in experts if isinstance(e, SessionEngine)]
    if len(engines) != len(experts):
        missing = [e.name for e in experts if not isinstance(e, SessionEngine)]
        raise TypeError(f"`{strategy}` needs engines with decode sessions; {missing} have none")
    return engines


def sole_weights(experts: Sequence[str], index: int) -> dict[str, float]:
    """Step weights when the expert at `index` alone decided: 1.0 for it, 0.0 for the others."""
    return {name: float(i == index) for i, name in enumerate(experts)}


@dataclass(frozen=True, slots=True)
class Picker:
    """How one request's pieces are picked: its temperature (greedy unless given), its top_p, and
    a generator seeded with its seed."""

    temperature: float
    top_p: float
    rng: np.random.Generator

    @classmethod
    def of(cls, params: SamplingParams) -> Picker:
        temperature = params.temperature if params.temperature is not None else 0.0
        top_p = params.top_p if params.top_p is not None else 1.0
        # numpy seeds are non-negative; the API's (like vLLM's) may be any integer.
        seed = None if params.seed is None else params.seed % 2**64
        return cls(temperature, top_p, np.random.default_rng(seed))

    def pick(self, keys: Sequence[str], probs: FloatArray, primary: str) -> int:
        """The index of the key chosen from `probs` (see `ensemble.fusion.pick`)."""
        return pick(
            keys, probs, primary, temperature=self.temperature, top_p=self.top_p, rng=self.rng
        )

    def own(self, view: NextTokens) -> Candidate:
        """One expert's own pick from its candidates: its top one, or a sample."""
        ranked = sorted(view.candidates, key=lambda c: -c.logprob)
        if self.temperature == 0:
            return ranked[0]
        keys = [c.text for c in ranked]
        probs = np.exp([c.logprob for c in ranked])
        return ranked[self.pick(keys, probs / probs.sum(), keys[0])]


class Stepper:
    """Sessions for one request. Text chosen for the answer reaches each session lazily, just
    before that session is asked for its next view, so an expert that sits out steps (gating,
    cascades) costs nothing until it is needed."""

    def __init__(self, sessions: Sequence[DecodeSession], stops: Sequence[str], max_tokens: int):
        self.sessions = list(sessions)
        self.failed: list[str] = []  # experts left out after failing
        self._dropped: list[DecodeSession] = []
        self.scanner = StopScanner(stops)
        self.max_tokens = max_tokens
        self.steps = 0
        self.finished = False
        self.produced: Counter[str] = Counter()  # pieces credited to each expert
        self.observer: StepObserver | None = None
        self._pending: list[list[tuple[str, tuple[int, ...]]]] = [[] for _ in sessions]
        self.top_logprobs: int | None = None  # report each step's distribution when set
        self._unsent: list[TokenLogprob] = []  # steps whose text a stop string still holds
        self._held: list[Piece] = []  # chosen pieces not yet streamed, who chose them
        self._warming: dict[str, asyncio.Task[None]] = {}  # catch-ups running, by expert

    @classmethod
    async def open(
        cls,
        engines: Sequence[SessionEngine],
        request: GenerationRequest,
        max_tokens: int,
        observer: StepObserver | None = None,
    ) -> Stepper:
        """Sessions on every engine (the first is the primary), each chosen step told to
        `observer`. Stop strings are the request's and every expert's own: a base model's
        "\nUser:" ends the shared answer too, or text the other experts proposed would run on
        into an invented next turn.

        An expert that fails to open is left out (see `failed`); any other error, or every
        expert failing, is raised."""
        opening = replace(request, params=replace(request.params, max_tokens=max_tokens, n=1))
        results = await asyncio.gather(
            *(e.open_session(opening) for e in engines), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        opened = [r for r in results if not isinstance(r, BaseException)]
        fatal = [e for e in errors if not isinstance(e, ExpertFailed)]
        if fatal or not opened:
            await asyncio.gather(*(s.aclose() for s in opened))
            raise (fatal or errors)[0]
        stops = (*(s for e in engines for s in e.default_stop), *request.params.stop)
        stepper = cls(opened, stops, max_tokens)
        stepper.observer = observer
        if request.params.logprobs:
            stepper.top_logprobs = request.params.top_logprobs
        stepper.failed = [
            e.name for e, r in zip(engines, results, strict=True) if isinstance(r, BaseException)
        ]
        return stepper

    @property
    def experts(self) -> list[str]:
        return [s.expert for s in self.sessions]

    async def drop(self, indexes: Sequence[int], error: BaseException) -> None:
        """Leave out the sessions at `indexes`, whose experts failed with `error`. If the
        primary goes, the next one takes over (it catches up on the chosen text like any
        session that sat out steps). When no expert is left, the request fails with `error`."""
        gone = [self.sessions[i] for i in sorted(indexes)]
        for i in sorted(indexes, reverse=True):
            del self.sessions[i], self._pending[i]
        for session in gone:
            self._dropped.append(session)
            self.failed.append(session.expert)
            await session.aclose()
        if not self.sessions:
            raise error

    async def view(self, i: int, k: int, *, full: bool = False) -> NextTokens:
        await self._catch_up(i)
        return await self.sessions[i].top_k(k, full=full)

    async def _catch_up(self, i: int) -> None:
        """Give session `i` the chosen text it has not seen yet."""
        session = self.sessions[i]
        for text, ids in self._drain(i):
            if ids:
                await session.extend_ids(ids, text)
            else:
                await session.extend(text)

    async def draft(self, n: int, k: int, i: int = 0) -> list[NextTokens]:
        """Session `i`'s views along its own greedy path, up to `n` pieces (see
        `LookaheadSession.draft`); none when it cannot look ahead or fails (the step that
        follows asks it again, and leaves it out if it fails again)."""
        session = self.sessions[i]
        if not isinstance(session, LookaheadSession):
            return []
        try:
            await self._catch_up(i)
            return await session.draft(n, k)
        except ExpertFailed:
            return []

    async def prefetch(self, i: int, text: str) -> None:
        """Let session `i` compute ahead what it will be asked after the text chosen so far and
        `text` (see `LookaheadSession.prefetch`); a failure shows at its next view."""
        session = self.sessions[i]
        if isinstance(session, LookaheadSession):
            await _quietly(session.prefetch([*self._merged(self._pending[i]), (text, ())]))

    def warm(self, i: int) -> None:
        """Let session `i` catch up with the chosen text in the background, on its engine's own
        thread, while the primary works on the next steps: when it is next asked, its view is
        ready. One catch-up at a time per session; a failure shows at its next view."""
        session = self.sessions[i]
        running = self._warming.get(session.expert)
        if not isinstance(session, LookaheadSession) or (running and not running.done()):
            return
        pieces = self._merged(self._pending[i])
        if pieces:
            catch_up = session.prefetch(pieces, every=False)
            self._warming[session.expert] = asyncio.create_task(_quietly(catch_up))

    async def try_view(self, i: int, k: int, *, full: bool = False) -> NextTokens | None:
        """The view of session `i`, or None when its expert failed: it is dropped (see `drop`)."""
        try:
            return await self.view(i, k, full=full)
        except ExpertFailed as exc:
            await self.drop([i], exc)
            return None

    def _drain(self, i: int) -> list[tuple[str, tuple[int, ...]]]:
        """Pending pieces, consecutive plain-text ones merged into one `extend`."""
        merged = self._merged(self._pending[i])
        self._pending[i] = []
        return merged

    @staticmethod
    def _merged(
        pieces: Sequence[tuple[str, tuple[int, ...]]],
    ) -> list[tuple[str, tuple[int, ...]]]:
        merged: list[tuple[str, tuple[int, ...]]] = []
        for text, ids in pieces:
            if merged and not ids and not merged[-1][1]:
                merged[-1] = (merged[-1][0] + text, ())
            else:
                merged.append((text, ids))
        return merged

    def choose(
        self,
        chosen: Candidate,
        views: Sequence[NextTokens | None],
        *,
        producer: str,
        weights: Mapping[str, float],
        gated: bool,
        started: float,
        distribution: Sequence[Candidate] = (),
    ) -> GenerationChunk | None:
        """Take one step's choice: record it, tell the observer, and return what to stream.

        `distribution` is what the piece was chosen from (the fused candidates, or the deciding
        expert's own); when the request asked for logprobs, the chunk reports it."""
        text, finish = self.commit(chosen, views)
        if not chosen.end:  # an end candidate's text is a marker, never part of the answer
            self._held.append(Piece(chosen.text, producer, dict(weights)))
        self.produced[producer] += 1
        self.finished = finish is not None
        if self.observer is not None:
            seconds = time.perf_counter() - started
            self.observer(Step(chosen.text, producer, dict(weights), gated, seconds))
        if self.top_logprobs is not None:
            ranked = sorted(distribution, key=lambda c: -c.logprob)[: self.top_logprobs]
            top = tuple(TopLogprob(c.text, c.logprob) for c in ranked)
            self._unsent.append(TokenLogprob(chosen.text, chosen.logprob, top))
        if not (text or finish):
            return None
        chunk = replace(
            self.chunk(text, finish),
            logprobs=tuple(self._unsent),
            pieces=self._release(text, finish is not None),
        )
        self._unsent = []
        return chunk

    def _release(self, text: str, finished: bool) -> tuple[Piece, ...]:
        """The held pieces that make up `text`, the stop scanner's output, split where it cut
        one; the scanner emits a prefix of what was pushed, so the pieces follow in order. On
        the last chunk whatever is still held was a stop string's, never streamed."""
        out: list[Piece] = []
        left = len(text)
        while left and self._held:
            piece = self._held[0]
            if len(piece.text) <= left:
                out.append(self._held.pop(0))
                left -= len(piece.text)
            else:
                out.append(replace(piece, text=piece.text[:left]))
                self._held[0] = replace(piece, text=piece.text[left:])
                left = 0
        if finished:
            self._held = []
        return tuple(out)

    def shares(self) -> dict[str, float]:
        steps = max(self.steps, 1)
        return {
            s.expert: round(self.produced[s.expert] / steps, 4)
            for s in (*self.sessions, *self._dropped)
        }

    def commit(
        self, chosen: Candidate, own: Sequence[NextTokens | None]
    ) -> tuple[str, FinishReason | None]:
        """Append the chosen piece to the answer and queue it for every session.

        A session whose own view held this very text gets its own tokens for it; the others
        get the text to re-tokenize. Returns the text safe to emit and why the answer ended.
        """
        self.steps += 1
        if chosen.end:
            return self.scanner.flush(), "stop"
        for i, view in enumerate(own):
            ids: tuple[int, ...] = ()
            if view is not None:
                ids = next((c.token_ids for c in view.candidates if c.text == chosen.text), ())
            self._pending[i].append((chosen.text, ids))
        delta = self.scanner.push(chosen.text)
        if self.scanner.stopped:
            return delta, "stop"
        if self.steps >= self.max_tokens:
            return delta + self.scanner.flush(), "length"
        return delta, None

    def chunk(self, text: str, finish: FinishReason | None) -> GenerationChunk:
        primary = self.sessions[0]
        return GenerationChunk(primary.expert, 0, text, 1, primary.prompt_tokens, (), finish)

    def accounting(self) -> list[GenerationChunk]:
        """Zero-text chunks carrying the other experts' prompt tokens, for usage."""
        others = (*self.sessions[1:], *self._dropped)
        return [GenerationChunk(s.expert, 0, "", 0, s.prompt_tokens) for s in others]

    async def aclose(self) -> None:
        for task in self._warming.values():
            task.cancel()
        await asyncio.gather(*self._warming.values(), return_exceptions=True)
        await asyncio.gather(*(s.aclose() for s in self.sessions))


async def _quietly(work: Awaitable[None]) -> None:
    """Work done ahead: an expert's failure there shows when it is next asked."""
    with contextlib.suppress(ExpertFailed):
        await work


def greedy_top(view: NextTokens) -> Candidate:
    """A view's most likely piece: what a lone expert's greedy step takes."""
    return max(view.candidates, key=lambda c: c.logprob)


def same_piece(drafted: Candidate | None, chosen: Candidate | None) -> bool:
    """Whether a step chose the drafted piece."""
    return (
        drafted is not None
        and chosen is not None
        and (chosen.text, chosen.end) == (drafted.text, drafted.end)
    )


@dataclass(slots=True)
class DraftRounds:
    """Speculative rounds: how long the next draft is, and how many drafted pieces were
    chosen as drafted. The length follows the acceptance: one more after a round accepted
    whole, one past the accepted pieces otherwise, between 2 and `most`."""

    most: int  # 1: no drafts, step by step
    length: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    def __post_init__(self) -> None:
        self.length = min(4, self.most)

    def add(self, drafted: int, accepted: int) -> None:
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        grown = self.length + 1 if accepted == drafted else max(2, accepted + 1)
        self.length = min(self.most, grown)

    @property
    def acceptance(self) -> float | None:
        return round(self.accepted / self.drafted, 4) if self.drafted else None

    @property
    def mean_length(self) -> float | None:
        return round(self.drafted / self.rounds, 4) if self.rounds else None


async def speculative_steps(
    stepper: Stepper,
    rounds: DraftRounds,
    lookahead: Callable[[int], Awaitable[list[Candidate]]],
    step: Callable[[], Awaitable[tuple[GenerationChunk | None, Candidate | None]]],
) -> AsyncGenerator[GenerationChunk, None]:
    """Steps until the answer is finished, in rounds: `lookahead` drafts up to `rounds.length`
    pieces (none: one plain step), then `step` runs as it would step by step until it chooses
    other than the draft or an expert leaves. Yields what the steps stream."""
    while not stepper.finished:
        drafted = await lookahead(rounds.length)
        live = list(stepper.sessions)
        accepted = 0
        planned: list[Candidate | None] = [*drafted] or [None]
        for piece in planned:
            chunk, chosen = await step()
            if chunk is not None:
                yield chunk
            if not same_piece(piece, chosen) or stepper.sessions != live:
                break
            accepted += 1
            if stepper.finished:
                break
        if drafted:
            rounds.add(len(drafted), accepted)
