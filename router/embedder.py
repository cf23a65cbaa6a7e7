"""Query embedders, and the micro-batcher that lets concurrent queries share one encode call."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)
Float32Array = npt.NDArray[np.float32]


class Embedder(Protocol):
    """Maps texts to L2-normalised vectors, shape (n_texts, dim)."""

    name: str

    @property
    def dim(self) -> int: ...

    def encode(self, texts: list[str]) -> Float32Array: ...


class SentenceTransformerEmbedder:
    """Any sentence-transformers folder, on CPU by default. Loading imports torch, so it is lazy."""

    def __init__(self, name: str, path: str, *, device: str = "cpu") -> None:
        from sentence_transformers import SentenceTransformer

        self.name = name
        self._model: Any = SentenceTransformer(path, device=device)
        self._dim = int(self._model.get_embedding_dimension() or 0)

    @property
    def dim(self) -> int:
        return self._dim

    def encode(self, texts: list[str]) -> Float32Array:
        vectors = self._model.encode(
            texts,
            batch_size=256,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)


class BatchingEmbedder:
    """Async front of an `Embedder`: queries that arrive together are encoded together.

    Every query waiting when the worker is free goes into one encode call (up to `max_batch`), so
    batches grow with load: queries that arrive during an encode share the next one. `wait_ms`
    optionally holds a batch's first query for company. Encoding runs on one worker thread, never
    on the event loop.
    """

    def __init__(
        self, embedder: Embedder | None = None, *, wait_ms: float = 0.0, max_batch: int = 256
    ) -> None:
        self.embedder = embedder  # may be set later, once loaded
        self.wait_s = wait_ms / 1000
        self.max_batch = max_batch
        self._queue: asyncio.Queue[tuple[str, asyncio.Future[Float32Array]]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedder")
        self.batches = 0  # encode calls made; for benchmarks and tests

    async def load(self, make: Callable[[], Embedder]) -> None:
        """Build the embedder on the worker thread (loading a model is slow)."""
        loop = asyncio.get_running_loop()
        self.embedder = await loop.run_in_executor(self._executor, make)

    async def embed(self, text: str) -> Float32Array:
        if self.embedder is None:
            raise RuntimeError("the embedder is not loaded yet")
        if self._queue is None or self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._run(self._queue))
        future: asyncio.Future[Float32Array] = asyncio.get_running_loop().create_future()
        await self._queue.put((text, future))
        return await future

    async def _run(self, queue: asyncio.Queue[tuple[str, asyncio.Future[Float32Array]]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.wait_s
            while len(batch) < self.max_batch:
                if not queue.empty():
                    batch.append(queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), remaining))
                except TimeoutError:
                    break
            live = [(text, fut) for text, fut in batch if not fut.cancelled()]
            if not live:
                continue
            try:
                encode = self.embedder.encode  # type: ignore[union-attr]
                vectors = await loop.run_in_executor(
                    self._executor, encode, [text for text, _ in live]
                )
            except Exception as exc:  # every waiter gets the failure, the worker lives on
                logger.exception("embedding failed")
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.batches += 1
            for (_, fut), vector in zip(live, vectors, strict=True):
                if not fut.done():
                    fut.set_result(vector)

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
