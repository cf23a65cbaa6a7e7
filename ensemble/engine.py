"""The Engine seam: one object per expert, whatever runs the model (transformers, vLLM, remote)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Protocol, runtime_checkable

from ensemble.types import GenerationChunk, GenerationRequest, NextTokens


@runtime_checkable
class Engine(Protocol):
    """An expert model.

    `generate` streams `GenerationChunk`s for all `n` samples of a request, interleaved, each
    sample ending with a chunk that has a `finish_reason`. Errors about the request itself (a prompt
    longer than the context window) are raised before the first chunk. Closing the iterator early
    stops the model work for that request.

    Optional, read where present: `honours` (the structured request fields it serves) and
    `tool_reader(request)`, how tool calls are read out of its text (`ensemble.toolcalls`;
    without one, Chorus's Hermes reader).
    """

    name: str

    @property
    def ready(self) -> bool: ...

    @property
    def context_window(self) -> int: ...

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]: ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


class DecodeSession(Protocol):
    """One answer decoded step by step from outside the engine (token-level fusion).

    `top_k` gives the expert's view of the next step; `extend` appends text chosen by
    someone else (the engine re-tokenizes its tail); `extend_ids` appends tokens the expert itself
    proposed (no re-tokenizing). Methods run one at a time per session.
    """

    expert: str
    prompt_tokens: int

    async def top_k(self, k: int, *, full: bool = False) -> NextTokens: ...

    async def extend(self, text: str) -> None: ...

    async def extend_ids(self, ids: tuple[int, ...], text: str) -> None: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class LookaheadSession(DecodeSession, Protocol):
    """A decode session that can look ahead, for speculative fusion (`ensemble.fuse`).

    `draft` gives the views along the expert's own greedy path for up to `n` pieces (each view's
    top candidate taken, until the end of sequence) without moving the session; `prefetch`
    computes in one pass what the coming `top_k` calls would ask for after `pieces` (text, or
    the expert's own ids), without moving it either: the view after every piece, or with
    `every` False only after the last (a catch-up). Both only save work: every later `top_k`
    answers exactly what it would have answered without them (up to floating-point rounding
    of a batched pass)."""

    async def draft(self, n: int, k: int) -> list[NextTokens]: ...

    async def prefetch(
        self, pieces: Sequence[tuple[str, tuple[int, ...]]], *, every: bool = True
    ) -> None: ...


@runtime_checkable
class SessionEngine(Engine, Protocol):
    """An engine that can open decode sessions. `vocabulary` identifies its tokenizer's
    vocabulary: experts with equal values share token ids (needed for `kl_centroid` weights and
    for `dlf`)."""

    @property
    def vocabulary(self) -> str: ...

    @property
    def default_stop(self) -> tuple[str, ...]: ...

    async def open_session(self, request: GenerationRequest) -> DecodeSession: ...
