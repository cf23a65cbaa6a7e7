"""In-process Hugging Face transformers engine: the small CPU default.

All model and tokenizer work runs on one worker thread per engine, so the event loop never
blocks. Concurrent requests are batched (continuous batching): a scheduler on the worker keeps
one left-padded KV cache (`batch.PaddedBatch`) over the rows of every running request, and each
of its ticks runs ONE decode forward over all of them. Requests that arrive meanwhile are
prefilled together (one more forward in that tick) and merged into the running batch. A
request's `n` samples are `n` rows that share its prefill. Each request samples its own rows
with its own temperature, top-p, seeded generator and logprobs, so its output does not depend on
what shares the batch. Finished rows, and the rows of a closed stream (a client that left), are
dropped before the next forward. Chunks reach each request's async generator through an asyncio
queue (`loop.call_soon_threadsafe`). Decode sessions (token-level fusion) keep their own caches:
their calls are jobs on the same worker, between the scheduler's ticks, and the views that
concurrent sessions ask for meanwhile are computed in one batched forward (`views`).

transformers' own continuous batching (`generate_batch`, `ContinuousBatchingManager`) was not
used: its sampling settings are one generation config for the whole manager (no per-request
temperature, top-p or seed) and it reports only the chosen token's logprob, not the top ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import os
import threading
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ensemble.engine import DecodeSession
from ensemble.errors import ExpertFailed, ExpertUnavailable
from ensemble.structured import RESPONSE_FORMAT, TOOLS, constraint_of
from ensemble.toolcalls import HERMES, ToolCallReader
from ensemble.types import (
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    NextTokens,
    TokenLogprob,
    TopLogprob,
)
from serving.config import TransformersExpertConfig
from serving.engines.common.prompts import (
    check_room,
    load_chat_template,
    prompt_ids,
    stop_strings,
    template_renders_tools,
)
from serving.engines.transformers.batch import PaddedBatch
from serving.engines.transformers.grammar import Grammars, RowMasks
from serving.engines.transformers.sampling import logprobs_of, sample
from serving.engines.transformers.session import TransformersSession
from serving.engines.transformers.text import SampleText
from serving.engines.transformers.views import SessionViews
from serving.models import bundled

logger = logging.getLogger(__name__)
T = TypeVar("T")

# transformers resolves names lazily and not thread-safely: two engines loading at once on their
# worker threads failed with "cannot import name 'AutoModelForCausalLM'". Loads take turns.
_LOAD_LOCK = threading.Lock()

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TransformersEngine:
    def __init__(self, name: str, config: TransformersExpertConfig) -> None:
        self.name = name
        self.config = config
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{name}")
        self._model: Any = None
        self._tokenizer: Any = None
        self._chat_template: str | None = None
        self._eos_ids: frozenset[int] = frozenset()
        self._context_window = 0
        self._vocabulary = ""
        self._grammars: Grammars | None = None
        self.honours: frozenset[str] = frozenset()  # known once loaded
        self._scheduler = _Scheduler(self)
        self._views = SessionViews(self._executor, _single_threaded)

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._model is not None

    @property
    def context_window(self) -> int:
        return self._context_window

    @property
    def session_rows_batched(self) -> int:
        """Decode-session steps run in one forward with other sessions' so far."""
        return self._views.rows_together

    @property
    def vocabulary(self) -> str:
        return self._vocabulary

    @property
    def default_stop(self) -> tuple[str, ...]:
        return self.config.stop

    def tool_reader(self, request: GenerationRequest) -> ToolCallReader:
        """Chorus's own Hermes reader (vLLM, with its parsers, is optional beside this engine)."""
        del request
        return HERMES

    async def start(self) -> None:
        await self._run(self._load)
        logger.info("expert %s ready (context window %d)", self.name, self._context_window)

    async def aclose(self) -> None:
        self._model = None
        self._views.model = None  # the last reference: the weights are freed with the engine's
        self._scheduler.abort(ExpertUnavailable(f"expert {self.name} was shut down"))
        self._views.abort(ExpertUnavailable(f"expert {self.name} was shut down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _load(self) -> None:
        with _LOAD_LOCK:
            path = bundled.resolve(self.config.model)
            tokenizer = AutoTokenizer.from_pretrained(path)
            model: Any = AutoModelForCausalLM.from_pretrained(
                path, dtype=_DTYPES[self.config.dtype]
            )
            if self.config.adapter is not None:
                model = _merge_adapter(model, self.config.adapter)
        model.to(self.config.device).eval()
        template = load_chat_template(self.config.chat_template)
        if template is None and not tokenizer.chat_template:
            raise ExpertFailed(
                f"expert {self.name}: the tokenizer has no chat template; set `chat_template` "
                "(for example `plain`) in the config"
            )
        eos = model.generation_config.eos_token_id
        eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self._tokenizer = tokenizer
        self._chat_template = template
        self._eos_ids = frozenset(eos_ids)
        self._context_window = self.config.max_model_len or int(
            getattr(model.config, "max_position_embeddings", 2048)
        )
        vocab = sorted(tokenizer.get_vocab().items())
        self._vocabulary = hashlib.sha1(json.dumps(vocab).encode()).hexdigest()
        width = int(model.get_output_embeddings().weight.shape[0])  # the logits' width
        self._grammars = Grammars(tokenizer, width, eos_ids)
        renders_tools = template_renders_tools(template or tokenizer.chat_template)
        self.honours = frozenset({RESPONSE_FORMAT, *([TOOLS] if renders_tools else [])})
        self._model = model
        self._views.model = model

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(fn, *args))

    async def _run_session(self, fn: Callable[..., T], *args: Any) -> T:
        """A decode session's job, on one CPU thread: the fused experts' steps then run at once
        on different cores without contending (loadtest/RESULTS.md). Drafts are the exception
        (`_AsyncSession.draft`)."""
        return await self._run(_single_threaded, partial(fn, *args))

    # -- generation --------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        if not self.ready:
            raise ExpertUnavailable(f"expert {self.name} is not loaded yet")
        stream = _Stream(asyncio.get_running_loop())
        constraint = constraint_of(request)
        compiled = None
        if constraint is not None and self._grammars is not None:
            # Compiling a schema can take a while: not on the event loop, not on the worker.
            loop = asyncio.get_running_loop()
            compiled = await loop.run_in_executor(None, self._grammars.compile, constraint)
        try:
            await self._run(self._begin, request, stream, compiled)
            while (item := await stream.queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                for chunk in item:
                    yield chunk
        finally:
            # The scheduler drops the request's rows before its next step.
            stream.cancelled = True

    def encode_prompt(self, request: GenerationRequest) -> list[int]:
        return prompt_ids(self._tokenizer, self._chat_template, request)

    async def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """The prompt tokens `generate` would count (on the worker, like its own encoding)."""
        if not self.ready:
            raise ExpertUnavailable(f"expert {self.name} is not loaded yet")
        return len(await self._run(self.encode_prompt, request))

    async def open_session(self, request: GenerationRequest) -> DecodeSession:
        if not self.ready:
            raise ExpertUnavailable(f"expert {self.name} is not loaded yet")
        prompt_ids = await self._run(self._checked_prompt, request)
        session = TransformersSession(self._model, self._tokenizer, prompt_ids, self._eos_ids)
        return _AsyncSession(self, session)

    def _checked_prompt(self, request: GenerationRequest) -> list[int]:
        ids = self.encode_prompt(request)
        self._check_room(len(ids), request)
        return ids

    def _check_room(self, prompt_tokens: int, request: GenerationRequest) -> int:
        return check_room(
            self._context_window, prompt_tokens, request.params.max_tokens, request.prompt_param
        )

    def _begin(self, request: GenerationRequest, stream: _Stream, compiled: Any = None) -> None:
        ids = self.encode_prompt(request)
        params = request.params
        room = self._check_room(len(ids), request)
        defaults = self.config.defaults
        max_tokens = params.max_tokens or min(defaults.max_tokens or room, room)
        masks = None
        if compiled is not None and self._grammars is not None:
            masks = RowMasks(compiled, params.n, self._grammars.vocab_size)
        self._scheduler.submit(_Run(self, request, ids, max_tokens, stream, masks))


def _merge_adapter(model: Any, adapter: str) -> Any:
    """The model with a PEFT LoRA adapter merged into its weights: it then runs as a plain
    model (batched with other sessions, no adapter layers per step)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


def _single_threaded(work: Callable[[], T]) -> T:
    threads = torch.get_num_threads()  # per thread: the scheduler's ticks keep theirs
    torch.set_num_threads(1)
    try:
        return work()
    finally:
        torch.set_num_threads(threads)


class _AsyncSession:
    """The event-loop side of a `TransformersSession`: every call is a job on the worker.

    Text the session is given (`extend`, `extend_ids`) is only tokenization: it waits here and
    goes with the session's next job, so a fusion step costs one trip to the worker, not two.
    """

    def __init__(self, engine: TransformersEngine, session: TransformersSession) -> None:
        self.expert = engine.name
        self.prompt_tokens = session.prompt_len
        self._engine = engine
        self._session = session
        self._unsent: list[tuple[str, list[int]]] = []

    def _take(self) -> list[tuple[str, list[int]]]:
        unsent, self._unsent = self._unsent, []
        return unsent

    async def top_k(self, k: int, *, full: bool = False) -> NextTokens:
        return await self._engine._views.top_k(self._session, self._take(), k, full)

    async def extend(self, text: str) -> None:
        self._unsent.append((text, []))

    async def extend_ids(self, ids: tuple[int, ...], text: str) -> None:
        self._unsent.append((text, list(ids)))

    async def draft(self, n: int, k: int) -> list[NextTokens]:
        # On every thread: the other experts wait for the draft, and a large model's step does
        # gain from a second core (loadtest/RESULTS.md, Dynamic Logit Fusion).
        return await self._engine._run(self._session.draft, self._take(), n, k)

    async def prefetch(
        self, pieces: Sequence[tuple[str, tuple[int, ...]]], *, every: bool = True
    ) -> None:
        ahead = [(text, list(ids)) for text, ids in pieces]
        if every:
            await self._engine._run_session(self._session.prefetch, self._take(), ahead)
        else:  # a catch-up: it can run in a batch with other sessions'
            await self._engine._views.catch_up(self._session, self._take(), ahead)

    async def aclose(self) -> None:
        with contextlib.suppress(RuntimeError):  # the engine was shut down meanwhile
            self._engine._executor.submit(self._session.close)


class _Stream:
    """The event-loop side of one request: what the worker hands over, and whether to stop.

    The worker posts lists of chunks, then `None` at the end (or an exception instead).
    `cancelled` is set on the event loop and read by the worker before each step.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[list[GenerationChunk] | BaseException | None] = asyncio.Queue()
        self.cancelled = False

    def post(self, item: list[GenerationChunk] | BaseException | None) -> None:
        """Called on the worker thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening
            self.cancelled = True


class _Scheduler:
    """Continuous batching on the engine's worker thread.

    One `PaddedBatch` holds the rows of every running request (a request with `n` samples owns
    `n` consecutive rows). Each tick is one job on the worker: drop the rows of cancelled
    requests, run ONE decode forward over every live row, prefill the requests that arrived
    meanwhile (together, in one forward) and merge them in, sample each request's rows with its
    own settings, post each request's chunks to its stream, and drop finished rows. A tick
    re-queues itself behind any other job (decode sessions, prompt encoding), so those run
    between ticks.
    """

    # A tick admits waiting requests while the batch stays within these bounds (one request is
    # always admitted into an empty batch, however large).
    MAX_ROWS = 64
    MAX_PADDED_TOKENS = 65536  # rows x padded length of the cache after admission

    def __init__(self, engine: TransformersEngine) -> None:
        self.engine = engine
        self.batch = PaddedBatch()
        self.owners: list[_Run] = []  # the request of each batch row
        self.feed = torch.zeros(0, dtype=torch.long)  # each row's last token, to run next
        self.pending: deque[_Run] = deque()
        self.scheduled = False  # a tick is queued on the worker

    def submit(self, run: _Run) -> None:
        """Worker thread: queue a request for the next tick."""
        self.pending.append(run)
        self._wake()

    def _wake(self) -> None:
        if not self.scheduled:
            with contextlib.suppress(RuntimeError):  # the engine was shut down meanwhile
                self.engine._executor.submit(self.tick)
                self.scheduled = True

    def abort(self, error: BaseException) -> None:
        """End every request with `error` (the engine is shutting down)."""
        for run in {*self.owners, *self.pending}:
            run.stream.post(error)
        self.owners, self.pending = [], deque()

    def tick(self) -> None:
        self.scheduled = False
        try:
            with torch.inference_mode():
                self._tick()
        except Exception as exc:
            logger.exception("expert %s failed during decoding", self.engine.name)
            self.abort(ExpertFailed(f"expert {self.engine.name} failed: {exc}"))
            self.batch, self.feed = PaddedBatch(), torch.zeros(0, dtype=torch.long)
        if self.owners or self.pending:
            self._wake()

    def _tick(self) -> None:
        model = self.engine._model
        if model is None:
            return
        self.pending = deque(run for run in self.pending if not run.stream.cancelled)
        if any(run.stream.cancelled for run in self.owners):
            self._keep([row for row, run in enumerate(self.owners) if not run.stream.cancelled])
        parts: list[torch.Tensor] = []
        if self.owners:
            parts.append(self.batch.step(model, self.feed))
        admitted = self._admissions()
        if admitted:
            new, logits = PaddedBatch.prefill(model, [run.prompt_ids for run in admitted])
            rows = [i for i, run in enumerate(admitted) for _ in range(run.n)]
            new.select(rows)
            self.batch.extend(new)
            self.owners += [run for run in admitted for _ in range(run.n)]
            parts.append(logits[rows])
        if not parts:
            return
        logits = torch.cat(parts)
        chosen = torch.empty(len(self.owners), dtype=torch.long)
        keep: list[int] = []
        start = 0
        for run, group in itertools.groupby(self.owners):
            end = start + len(list(group))
            tokens, alive = run.advance(logits[start:end])
            chosen[start:end] = tokens
            keep += [start + i for i, live in enumerate(alive) if live]
            start = end
        self.feed = chosen
        self._keep(keep)

    def _admissions(self) -> list[_Run]:
        """Take the waiting requests that fit in the batch now, first come first served."""
        admitted: list[_Run] = []
        rows, length = self.batch.rows, self.batch.length
        while self.pending:
            run = self.pending[0]
            rows_after, length_after = rows + run.n, max(length, len(run.prompt_ids))
            fits = (
                rows_after <= self.MAX_ROWS and rows_after * length_after <= self.MAX_PADDED_TOKENS
            )
            if not fits and (rows or admitted):
                break
            admitted.append(self.pending.popleft())
            rows, length = rows_after, length_after
        return admitted

    def _keep(self, rows: list[int]) -> None:
        if len(rows) == len(self.owners):
            return
        self.batch.select(rows)
        self.owners = [self.owners[row] for row in rows]
        self.feed = self.feed[rows] if len(self.feed) else self.feed


class _Run:
    """One request's sampling state: its settings, generator and text per sample.

    Every method runs on the engine's worker thread; its rows live in the scheduler's batch.
    """

    def __init__(
        self,
        engine: TransformersEngine,
        request: GenerationRequest,
        prompt_ids: list[int],
        max_tokens: int,
        stream: _Stream,
        masks: RowMasks | None = None,
    ) -> None:
        params = request.params
        self.masks = masks  # constrained decoding: one grammar matcher per sample
        defaults = engine.config.defaults
        self.engine = engine
        self.stream = stream
        self.tokenizer = engine._tokenizer
        self.prompt_ids = prompt_ids
        self.n = params.n
        self.max_tokens = max_tokens
        self.temperature = (
            params.temperature if params.temperature is not None else defaults.temperature
        )
        self.top_p = params.top_p if params.top_p is not None else defaults.top_p
        self.want_logprobs = params.logprobs
        self.top_logprobs = params.top_logprobs if params.logprobs else 0
        self.prompt_tokens = len(prompt_ids)
        self.generator = torch.Generator(device="cpu")
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little")
        self.generator.manual_seed(seed % (2**63))
        stops = stop_strings(engine.config.stop, request)
        decode = partial(self.tokenizer.decode, skip_special_tokens=True)
        self.samples = [SampleText(decode, prompt_ids, stops) for _ in range(params.n)]
        self.counts = [0] * params.n  # tokens generated per sample
        self.unsent_tokens = [0] * params.n
        self.unsent_logprobs: list[list[TokenLogprob]] = [[] for _ in range(params.n)]
        self.live = list(range(params.n))  # sample index of each of this request's batch rows

    def advance(self, logits: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        """Sample the next token of each live row from `logits` (rows, vocab); post the text.

        Returns the chosen tokens and, per row, whether it goes on.
        """
        allowed = logits if self.masks is None else self.masks.mask(logits, self.live)
        chosen = sample(allowed, self.temperature, self.top_p, self.generator)
        if self.want_logprobs:
            chosen_lp, top_ids, top_lp = logprobs_of(logits, chosen, self.top_logprobs)
        chunks: list[GenerationChunk] = []
        alive: list[bool] = []
        for row, index in enumerate(self.live):
            token = int(chosen[row])
            if self.masks is not None and token not in self.engine._eos_ids:
                self.masks.accept(index, token)
            self.counts[index] += 1
            self.unsent_tokens[index] += 1
            if self.want_logprobs:
                self.unsent_logprobs[index].append(
                    self._token_logprob(token, float(chosen_lp[row]), top_ids[row], top_lp[row])
                )
            text, finish = self._advance(index, token)
            if finish:
                text += self.samples[index].flush()
            if finish or text:
                chunks.append(self._chunk(index, text, finish))
            alive.append(finish is None)
        self.live = [index for index, live in zip(self.live, alive, strict=True) if live]
        if chunks:
            self.stream.post(chunks)
        if not self.live:
            self.stream.post(None)
        return chosen, alive

    def _advance(self, index: int, token: int) -> tuple[str, FinishReason | None]:
        """Feed one token to sample `index`: the text it releases, and why it finished if it did."""
        sample_text = self.samples[index]
        if token in self.engine._eos_ids:
            return "", "stop"
        text = sample_text.push(token)
        if sample_text.stopped:
            return text, "stop"
        if self.counts[index] >= self.max_tokens:
            return text, "length"
        if self.prompt_tokens + self.counts[index] >= self.engine.context_window:
            return text, "length"
        return text, None

    def _chunk(self, index: int, text: str, finish: FinishReason | None) -> GenerationChunk:
        chunk = GenerationChunk(
            expert=self.engine.name,
            index=index,
            text=text,
            tokens=self.unsent_tokens[index],
            prompt_tokens=self.prompt_tokens,
            logprobs=tuple(self.unsent_logprobs[index]),
            finish_reason=finish,
        )
        self.unsent_tokens[index] = 0
        self.unsent_logprobs[index] = []
        return chunk

    def _token_logprob(
        self, token: int, logprob: float, top_ids: torch.Tensor, top_lps: torch.Tensor
    ) -> TokenLogprob:
        top = tuple(
            TopLogprob(self._piece(int(i)), float(lp))
            for i, lp in zip(top_ids.tolist(), top_lps.tolist(), strict=True)
        )
        return TokenLogprob(self._piece(token), logprob, top)

    def _piece(self, token_id: int) -> str:
        text: str = self.tokenizer.decode([token_id])
        return text
