"""Decode sessions on the vLLM engine: next-token candidates for fusion without a request per token.

A vLLM request costs a fixed overhead (scheduling, inter-process messages, output processing) on
top of the model step, so asking for one token at a time pays a whole request per token. Here a
view of the next step comes from a *draft*: one streamed request that decodes the expert's own
greedy continuation, up to `session_lookahead` tokens long (adapted to how far the chosen text
has been following the drafts), with the top log-probabilities at every position. While the
chosen text follows the draft (the expert decides alone on gated steps, the others agree with
it, a one-expert cascade), the next views are already there or on their way; when the text
leaves the draft, the rest is aborted and a new draft starts from the new text, on vLLM's prefix
cache. `score(text)` instead scores a given chunk in one pass with prompt log-probabilities (a
chunk drafted by another expert), and caches the views along it.

Texts chosen by others are re-tokenized from a few tokens back, as the transformers session
does. vLLM only reports the top log-probabilities, so `NextTokens.entropy` is estimated from
the top `max_logprobs` (20 by default) with the rest of the mass lumped into one outcome (a lower
bound), and `full` distributions need `max_logprobs: -1` in the expert's `engine_args`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ensemble.errors import ExpertFailed
from ensemble.types import Candidate, NextTokens
from serving.engines.common.candidates import (
    MAX_BYTE_LOOKAHEAD,
    REPLACEMENT,
    TAIL_TOKENS,
    renormalised,
)

if TYPE_CHECKING:
    from serving.engines.vllm.engine import VllmEngine

View = dict[int, float]  # {token id: logprob} of one next-token distribution (its top entries)


class _Draft:
    """One vLLM request's greedy path from `base`: `views[j]` is the next-token distribution
    after `base + tokens[:j]`. Filled in the background as vLLM streams."""

    def __init__(self, base: list[int], full: bool) -> None:
        self.base = base
        self.full = full
        self.tokens: list[int] = []
        self.views: list[View] = []
        self.used = 0  # views handed out (the furthest one, plus one)
        self.finished = False
        self.error: BaseException | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def streaming(cls, base: list[int], full: bool, stream: AsyncGenerator[Any, None]) -> _Draft:
        draft = cls(base, full)
        draft._task = asyncio.create_task(draft._consume(stream))
        return draft

    @classmethod
    def done(cls, base: list[int], tokens: list[int], views: list[View]) -> _Draft:
        draft = cls(base, full=False)
        draft.tokens, draft.views, draft.finished = tokens, views, True
        return draft

    async def _consume(self, stream: AsyncGenerator[Any, None]) -> None:
        from serving.engines.vllm.engine import logprob_map

        try:
            async for output in stream:
                sample = output.outputs[0]
                for token, entries in zip(sample.token_ids, sample.logprobs or (), strict=False):
                    self.tokens.append(int(token))
                    self.views.append(logprob_map(entries))
                self._changed.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.error = exc
        finally:
            self.finished = True
            self._changed.set()
            await stream.aclose()  # aborts the request in vLLM if it is still running

    async def _wait(self, tokens: int) -> None:
        while len(self.tokens) < tokens and not self.finished:
            self._changed.clear()
            await self._changed.wait()

    async def view_for(self, ids: Sequence[int]) -> View | None:
        """The view after `ids` if they follow this draft (waiting for it to get there)."""
        n = len(self.base)
        if len(ids) < n or list(ids[:n]) != self.base:
            return None
        rest = list(ids[n:])
        while True:
            known = min(len(self.tokens), len(rest))
            if self.tokens[:known] != rest[:known]:
                return None  # the path left the draft (no need to wait for more of it)
            if len(self.views) > len(rest):
                break
            if self.finished:
                return None
            self._changed.clear()
            await self._changed.wait()
        self.used = max(self.used, len(rest) + 1)
        return self.views[len(rest)]

    def followed_past_end(self, ids: Sequence[int]) -> bool:
        """`ids` went along the whole draft and on beyond it."""
        path = self.base + self.tokens
        return self.finished and len(ids) > len(path) and list(ids[: len(path)]) == path

    async def path_from(self, ids: Sequence[int], tokens: int) -> list[tuple[int, float]]:
        """Up to `tokens` of the draft's own path from `ids`, with their logprobs."""
        offset = len(ids) - len(self.base)
        await self._wait(offset + tokens)
        return [
            (token, self.views[i].get(token, -math.inf))
            for i, token in enumerate(self.tokens[offset : offset + tokens], start=offset)
        ]

    async def cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class VllmSession:
    def __init__(self, engine: VllmEngine, prompt_ids: list[int], request_id: str) -> None:
        self.expert = engine.name
        self.prompt_tokens = len(prompt_ids)
        # Draft length: up to `max_lookahead`, adapted to how far the chosen text follows the
        # drafts (doubled after a draft used to its end, cut to the views used after one that
        # was left early), so a path that leaves every draft at once pays for one token each.
        self.max_lookahead = self.lookahead = engine.config.session_lookahead
        self.requests = 0  # vLLM requests made (diagnostics, benchmarks)
        self._engine = engine
        self._tokenizer = engine.tokenizer
        self._eos_ids = engine.eos_ids
        self._special_ids = frozenset(self._tokenizer.all_special_ids) | self._eos_ids
        self._request_id = request_id
        self.ids = list(prompt_ids)  # prompt + the chosen text, tokenized
        self.starts: list[int] = []  # character offset in `text` where each generated token starts
        self.text = ""
        self._draft: _Draft | None = None
        self._pieces: dict[int, str] = {}

    # -- text in -----------------------------------------------------------------------------

    def _retokenized(self, text: str) -> tuple[list[int], list[int]]:
        """`ids` and `starts` with `text` appended, re-tokenizing only a few tokens back."""
        full = self.text + text
        keep = max(0, len(self.ids) - self.prompt_tokens - TAIL_TOKENS)
        offset = self.starts[keep] if keep < len(self.starts) else 0 if keep == 0 else len(full)
        encoded = self._tokenizer(
            full[offset:], add_special_tokens=False, return_offsets_mapping=True
        )
        tail_ids: list[int] = encoded["input_ids"]
        tail_starts = [offset + start for start, _ in encoded["offset_mapping"]]
        return (
            self.ids[: self.prompt_tokens + keep] + tail_ids,
            self.starts[:keep] + tail_starts,
        )

    async def extend(self, text: str) -> None:
        if text:
            self.ids, self.starts = self._retokenized(text)
            self.text += text

    async def extend_ids(self, ids: tuple[int, ...], text: str) -> None:
        """Tokens this expert proposed itself: no re-tokenizing, so the session stays on its own
        path (and on its draft)."""
        start = len(self.text)
        self.text += text
        self.ids += ids
        self.starts += [start] * len(ids)

    # -- candidates out ----------------------------------------------------------------------

    async def top_k(self, k: int, *, full: bool = False) -> NextTokens:
        if self._engine.context_window - len(self.ids) <= 0:
            return NextTokens((Candidate("", 0.0, (), end=True),), 0.0)
        view = await self._view(full)
        return await self._candidates(view, k, full)

    async def _view(self, full: bool) -> View:
        draft = self._draft
        if draft is not None and (draft.full or not full):
            view = await draft.view_for(self.ids)
            if view is not None:
                return view
        if draft is not None:
            self._adapt(draft)
        await self._drop_draft()
        draft = self._draft = self._start_draft(full)
        view = await draft.view_for(self.ids)
        if view is None:
            error = draft.error
            raise ExpertFailed(f"expert {self.expert} failed: {error}") from error
        return view

    def _adapt(self, draft: _Draft) -> None:
        if draft.followed_past_end(self.ids):
            self.lookahead = min(self.max_lookahead, self.lookahead * 2)
        else:
            self.lookahead = max(1, min(self.max_lookahead, draft.used))

    def _logprobs(self, full: bool) -> int:
        engine_max = self._engine.max_logprobs
        if full:
            if engine_max != -1:
                raise ExpertFailed(
                    f"expert {self.expert}: whole next-token distributions (`dynamic` "
                    "weighting) need `max_logprobs: -1` in its engine_args"
                )
            return -1
        return engine_max if engine_max != -1 else 20

    def _start_draft(self, full: bool) -> _Draft:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        llm = self._engine.llm
        if llm is None:
            raise ExpertFailed(f"expert {self.expert} is shut down")
        room = self._engine.context_window - len(self.ids)
        params = SamplingParams(
            max_tokens=max(1, min(self.lookahead, room)),
            temperature=0.0,
            logprobs=self._logprobs(full),
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
        )
        self.requests += 1
        request_id = self._engine.request_id(f"{self._request_id}-s{self.requests}")
        stream = llm.generate(TokensPrompt(prompt_token_ids=list(self.ids)), params, request_id)
        return _Draft.streaming(list(self.ids), full, stream)

    async def score(self, text: str, k: int = 10) -> list[NextTokens]:
        """Score a chunk of text in one vLLM pass (prompt log-probabilities): the views before
        each of its tokens and after the last, as if it were appended. Nothing is appended, but
        the views are kept, so `top_k` along this text costs no further request."""
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import SamplingParams

        from serving.engines.vllm.engine import logprob_map

        llm = self._engine.llm
        if llm is None:
            raise ExpertFailed(f"expert {self.expert} is shut down")
        ids, _ = self._retokenized(text)
        common = 0
        for a, b in zip(self.ids, ids, strict=False):
            if a != b:
                break
            common += 1
        base, chunk = ids[:common], ids[common:]
        logprobs = self._logprobs(False)
        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            logprobs=logprobs,
            prompt_logprobs=logprobs,
            detokenize=False,
        )
        self.requests += 1
        request_id = self._engine.request_id(f"{self._request_id}-p{self.requests}")
        final: Any = None
        async for output in llm.generate(TokensPrompt(prompt_token_ids=ids), params, request_id):
            final = output
        if final is None:
            raise ExpertFailed(f"expert {self.expert}: vLLM returned nothing")
        prompt_views = [logprob_map(e or {}) for e in final.prompt_logprobs[common:]]
        sample = final.outputs[0]
        views = [*prompt_views, logprob_map(sample.logprobs[0])]
        await self._drop_draft()
        self._draft = _Draft.done(base, [*chunk, *sample.token_ids], views)
        return [await self._candidates(v, k, False) for v in views]

    async def _candidates(self, view: View, k: int, full: bool) -> NextTokens:
        """The `k` most likely next pieces of text, renormalised over what is kept (the same
        rules as the transformers session: end-of-sequence tokens become one `end` candidate,
        other special tokens are dropped, a partial UTF-8 character is completed along the
        draft when it is the top token, tokens with the same text are merged)."""
        ranked = sorted(view.items(), key=lambda item: -item[1])
        mass: dict[str, float] = {}
        ids: dict[str, tuple[int, ...]] = {}
        for rank, (token, lp) in enumerate(ranked):
            if len(mass) >= k:
                break
            path: tuple[int, ...]
            if token in self._eos_ids:
                text, path = "", (token,)
            elif token in self._special_ids:
                continue
            else:
                text, path = self._piece(token), (token,)
                if REPLACEMENT in text or not text:
                    completed = await self._complete_character(token) if rank == 0 else None
                    if completed is None:
                        continue
                    text, path, lp = completed
            mass[text] = mass.get(text, 0.0) + math.exp(lp)
            ids.setdefault(text, path)
        if not mass:  # nothing usable among the top entries: end the answer
            return NextTokens((Candidate("", 0.0, (), end=True),), 0.0)
        candidates = renormalised(mass, ids)
        probs = np.exp(np.fromiter(view.values(), dtype=np.float64))
        rest = max(0.0, 1.0 - float(probs.sum()))
        entropy = float(-(probs * np.log(np.maximum(probs, 1e-300))).sum())
        if rest > 1e-9:
            entropy -= rest * math.log(rest)
        distribution = self._distribution(view) if full else None
        return NextTokens(candidates, entropy, distribution)

    def _distribution(self, view: View) -> np.ndarray:
        size = max(len(self._tokenizer), max(view) + 1)
        llm = self._engine.llm
        if llm is not None:
            size = max(size, int(llm.model_config.get_vocab_size()))
        out = np.full(size, -np.inf, dtype=np.float32)
        out[np.fromiter(view.keys(), dtype=np.int64)] = np.fromiter(view.values(), np.float32)
        return out

    async def _complete_character(self, token: int) -> tuple[str, tuple[int, ...], float] | None:
        """Follow the draft from a partial-character token until the bytes decode."""
        draft = self._draft
        if draft is None or await draft.view_for(self.ids) is None:
            return None
        path = await draft.path_from(self.ids, MAX_BYTE_LOOKAHEAD + 1)
        if not path or path[0][0] != token:
            return None
        for end in range(2, len(path) + 1):
            ids = [t for t, _ in path[:end]]
            text: str = self._tokenizer.decode(ids)
            if text and REPLACEMENT not in text:
                return text, tuple(ids), sum(lp for _, lp in path[:end])
        return None

    def _piece(self, token: int) -> str:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._tokenizer.decode([token])
        return piece

    async def _drop_draft(self) -> None:
        draft, self._draft = self._draft, None
        if draft is not None:
            await draft.cancel()

    async def aclose(self) -> None:
        await self._drop_draft()
