"""Decode sessions on the vLLM engine: next-token candidates for fusion without a request per token.

A vLLM request costs a fixed overhead (scheduling, inter-process messages, output processing) on
top of the model step, so asking for one token at a time pays a whole request per token. Here a
view of the next step comes from a *draft* (`common.drafts`): one streamed request that decodes
the expert's own greedy continuation, up to `session_lookahead` tokens long (adapted to how far
the chosen text has been following the drafts), with the top log-probabilities at every position.
While the chosen text follows the draft, the next views are already there or on their way; when
the text leaves the draft, the rest is aborted and a new draft starts from the new text, on
vLLM's prefix cache. `score(text)` instead scores a given chunk in one pass with prompt
log-probabilities (a chunk drafted by another expert), and caches the views along it.

Texts chosen by others are re-tokenized at the tail (`common.retokenize`), candidates follow every
engine's rules (`common.candidates`; a partial character is completed along the draft), and
`NextTokens.entropy` is the estimate from the top log-probabilities (`common.entropy`). `full`
distributions need `max_logprobs: -1` in the expert's `engine_args`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from functools import partial
from typing import Any, Protocol

import numpy as np

from ensemble.errors import ExpertFailed
from ensemble.types import NextTokens
from serving.config import VllmExpertConfig
from serving.engines.common import candidates
from serving.engines.common.drafts import Draft, Steps, View, next_lookahead
from serving.engines.common.entropy import ENTROPY_TOP
from serving.engines.common.retokenize import AnswerTokens, tokenize_with_starts
from serving.engines.vllm.logprobs import logprob_map


class VllmModel(Protocol):
    """What a session needs of its engine (`VllmEngine`)."""

    @property
    def name(self) -> str: ...

    @property
    def config(self) -> VllmExpertConfig: ...

    @property
    def llm(self) -> Any: ...

    @property
    def tokenizer(self) -> Any: ...

    @property
    def eos_ids(self) -> frozenset[int]: ...

    @property
    def context_window(self) -> int: ...

    @property
    def max_logprobs(self) -> int: ...

    def request_id(self, request_id: str) -> str: ...


class VllmSession:
    def __init__(self, engine: VllmModel, prompt_ids: list[int], request_id: str) -> None:
        self.expert = engine.name
        self.prompt_tokens = len(prompt_ids)
        # Draft length (`common.drafts.next_lookahead`): a streamed draft starts at the most.
        self.max_lookahead = self.lookahead = engine.config.session_lookahead
        self.requests = 0  # vLLM requests made (diagnostics, benchmarks)
        self._engine = engine
        self._tokenizer = engine.tokenizer
        self._pieces = candidates.TokenizerPieces(self._tokenizer, engine.eos_ids)
        self._request_id = request_id
        self.answer = AnswerTokens(prompt_ids)  # prompt + the chosen text, tokenized
        self._tokenize = partial(tokenize_with_starts, self._tokenizer)
        self._draft: Draft | None = None

    @property
    def ids(self) -> list[int]:
        return self.answer.ids

    # -- text in -----------------------------------------------------------------------------

    async def extend(self, text: str) -> None:
        self.answer.extend(text, self._tokenize)

    async def extend_ids(self, ids: tuple[int, ...], text: str) -> None:
        """Tokens this expert proposed itself: no re-tokenizing, so the session stays on its own
        path (and on its draft)."""
        self.answer.add_ids(ids, text)

    # -- candidates out ----------------------------------------------------------------------

    async def top_k(self, k: int, *, full: bool = False) -> NextTokens:
        if self._engine.context_window - len(self.ids) <= 0:
            return NextTokens((candidates.END,), 0.0)
        view = await self._view(full)
        return await self._candidates(view, k, full)

    async def _view(self, full: bool) -> View:
        draft = self._draft
        if draft is not None and (draft.full or not full):
            view = await draft.view_for(self.ids)
            if view is not None:
                return view
        if draft is not None:
            self.lookahead = next_lookahead(draft, self.ids, self.lookahead, self.max_lookahead)
        await self._drop_draft()
        draft = self._draft = self._start_draft(full)
        view = await draft.view_for(self.ids)
        if view is None:
            error = draft.error
            raise ExpertFailed(f"expert {self.expert} failed: {error}") from error
        return view

    def _logprobs(self, full: bool) -> int:
        engine_max = self._engine.max_logprobs
        if full:
            if engine_max != -1:
                raise ExpertFailed(
                    f"expert {self.expert}: whole next-token distributions (`kl_centroid`, "
                    "`dlf`) need `max_logprobs: -1` in its engine_args"
                )
            return -1
        return engine_max if engine_max != -1 else ENTROPY_TOP

    def _start_draft(self, full: bool) -> Draft:
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
        return Draft.streaming(self.ids, _steps(stream), full=full)

    async def score(self, text: str, k: int = 10) -> list[NextTokens]:
        """Score a chunk of text in one vLLM pass (prompt log-probabilities): the views before
        each of its tokens and after the last, as if it were appended. Nothing is appended, but
        the views are kept, so `top_k` along this text costs no further request."""
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import SamplingParams

        llm = self._engine.llm
        if llm is None:
            raise ExpertFailed(f"expert {self.expert} is shut down")
        tail = self.answer.tail(text)
        ids = self.answer.retokenized(tail, self._tokenize(tail.text)[0])
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
        self._draft = Draft.done(base, [*chunk, *sample.token_ids], views)
        return [await self._candidates(v, k, False) for v in views]

    async def _candidates(self, view: View, k: int, full: bool) -> NextTokens:
        """The `k` most likely next pieces of text, renormalised over what is kept (the rules of
        `common.candidates`; a partial character is completed along the draft)."""
        entries = candidates.ranked(view)
        unfinished = candidates.partial_top(entries, self._pieces)
        completed = await self._complete_character(unfinished[0]) if unfinished else None
        distribution = self._distribution(view) if full else None
        return candidates.next_tokens(entries, k, self._pieces, completed, distribution)

    def _distribution(self, view: View) -> np.ndarray:
        size = max(len(self._tokenizer), max(view) + 1)
        llm = self._engine.llm
        if llm is not None:
            size = max(size, int(llm.model_config.get_vocab_size()))
        out = np.full(size, -np.inf, dtype=np.float32)
        out[np.fromiter(view.keys(), dtype=np.int64)] = np.fromiter(view.values(), np.float32)
        return out

    async def _complete_character(self, token: int) -> candidates.Completion | None:
        """Follow the draft from a partial-character token until the bytes decode."""
        draft = self._draft
        if draft is None or await draft.view_for(self.ids) is None:
            return None
        path = await draft.path_from(self.ids, candidates.MAX_BYTE_LOOKAHEAD + 1)
        if not path or path[0][0] != token:
            return None
        return candidates.complete_character(path, self._pieces.decode)

    async def _drop_draft(self) -> None:
        draft, self._draft = self._draft, None
        if draft is not None:
            await draft.cancel()

    async def aclose(self) -> None:
        await self._drop_draft()


async def _steps(stream: AsyncGenerator[Any, None]) -> Steps:
    """A vLLM output stream as a draft's steps: each output's tokens and their views; closing
    it aborts the request in vLLM if it is still running."""
    try:
        async for output in stream:
            sample = output.outputs[0]
            yield sample.token_ids, [logprob_map(entries) for entries in sample.logprobs or ()]
    finally:
        await stream.aclose()
