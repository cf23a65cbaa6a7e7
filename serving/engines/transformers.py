"""In-process Hugging Face transformers engine: the small CPU default.

All model and tokenizer work runs on one worker thread per engine, one decode step per job, so the
event loop never blocks and concurrent requests interleave step by step instead of queueing whole
generations behind each other. A request's `n` samples decode together as one batch that shares
the prompt's prefill; finished samples are dropped from the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ensemble.engine import DecodeSession
from ensemble.types import (
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    NextTokens,
    TokenLogprob,
    TopLogprob,
)
from serving import bundled
from serving.config import TransformersExpertConfig
from serving.engines.sampling import logprobs_of, sample
from serving.engines.session import TransformersSession
from serving.engines.text import SampleText
from serving.errors import ContextLengthError, ExpertError, ServiceUnavailableError

logger = logging.getLogger(__name__)
T = TypeVar("T")

# transformers resolves names lazily and not thread-safely: two engines loading at once on their
# worker threads failed with "cannot import name 'AutoModelForCausalLM'". Loads take turns.
_LOAD_LOCK = threading.Lock()

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_chat_template(spec: str | None) -> str | None:
    if spec is None:
        return None
    if spec == "plain":
        return resources.files("serving").joinpath("templates/plain.jinja").read_text()
    return Path(spec).read_text()


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

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._model is not None

    @property
    def context_window(self) -> int:
        return self._context_window

    @property
    def vocabulary(self) -> str:
        return self._vocabulary

    @property
    def default_stop(self) -> tuple[str, ...]:
        return self.config.stop

    async def start(self) -> None:
        await self._run(self._load)
        logger.info("expert %s ready (context window %d)", self.name, self._context_window)

    async def aclose(self) -> None:
        self._model = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _load(self) -> None:
        with _LOAD_LOCK:
            path = bundled.resolve(self.config.model)
            tokenizer = AutoTokenizer.from_pretrained(path)
            model: Any = AutoModelForCausalLM.from_pretrained(
                path, dtype=_DTYPES[self.config.dtype]
            )
        model.to(self.config.device).eval()
        template = load_chat_template(self.config.chat_template)
        if template is None and not tokenizer.chat_template:
            raise ExpertError(
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
        self._model = model

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(fn, *args))

    # -- generation --------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        if not self.ready:
            raise ServiceUnavailableError(f"expert {self.name} is not loaded yet")
        run = await self._run(self._begin, request)
        try:
            while not run.done:
                for chunk in await self._run(run.step):
                    yield chunk
        finally:
            # On the worker thread, after any step still running: never free state under it.
            with contextlib.suppress(RuntimeError):  # the engine was shut down meanwhile
                self._executor.submit(run.release)

    def encode_prompt(self, request: GenerationRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        text = self._tokenizer.apply_chat_template(
            messages,
            chat_template=self._chat_template,
            add_generation_prompt=True,
            tokenize=False,
        )
        # The template already wrote any BOS/special tokens it wants.
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False)
        return ids

    async def open_session(self, request: GenerationRequest) -> DecodeSession:
        if not self.ready:
            raise ServiceUnavailableError(f"expert {self.name} is not loaded yet")
        prompt_ids = await self._run(self._checked_prompt, request)
        session = TransformersSession(self._model, self._tokenizer, prompt_ids, self._eos_ids)
        return _AsyncSession(self, session)

    def _checked_prompt(self, request: GenerationRequest) -> list[int]:
        prompt_ids = self.encode_prompt(request)
        self._check_room(len(prompt_ids), request.params.max_tokens)
        return prompt_ids

    def _check_room(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """Tokens left for the completion; a prompt that leaves none is a 400."""
        room = self._context_window - prompt_tokens
        if room <= 0 or (max_tokens is not None and max_tokens > room):
            asked = max_tokens or 1
            raise ContextLengthError(
                f"This model's maximum context length is {self._context_window} tokens. "
                f"However, you requested {prompt_tokens + asked} tokens "
                f"({prompt_tokens} in the messages, {asked} in the completion).",
                param="messages",
            )
        return room

    def _begin(self, request: GenerationRequest) -> _Run:
        prompt_ids = self.encode_prompt(request)
        params = request.params
        room = self._check_room(len(prompt_ids), params.max_tokens)
        defaults = self.config.defaults
        max_tokens = params.max_tokens or min(defaults.max_tokens or room, room)
        return _Run(self, request, prompt_ids, max_tokens)


class _AsyncSession:
    """The event-loop side of a `TransformersSession`: every call is a job on the worker."""

    def __init__(self, engine: TransformersEngine, session: TransformersSession) -> None:
        self.expert = engine.name
        self.prompt_tokens = session.prompt_len
        self._engine = engine
        self._session = session

    async def top_k(self, k: int, *, full: bool = False) -> NextTokens:
        return await self._engine._run(self._session.top_k, k, full)

    async def extend(self, text: str) -> None:
        await self._engine._run(self._session.extend, text)

    async def extend_ids(self, ids: tuple[int, ...], text: str) -> None:
        await self._engine._run(self._session.extend_ids, list(ids), text)

    async def aclose(self) -> None:
        with contextlib.suppress(RuntimeError):  # the engine was shut down meanwhile
            self._engine._executor.submit(self._session.close)


class _Run:
    """One request's decoding state; every method runs on the engine's worker thread."""

    def __init__(
        self,
        engine: TransformersEngine,
        request: GenerationRequest,
        prompt_ids: list[int],
        max_tokens: int,
    ) -> None:
        params = request.params
        defaults = engine.config.defaults
        self.engine = engine
        self.model = engine._model
        self.tokenizer = engine._tokenizer
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
        stops = (*engine.config.stop, *params.stop)
        decode = partial(self.tokenizer.decode, skip_special_tokens=True)
        self.samples = [SampleText(decode, prompt_ids, stops) for _ in range(params.n)]
        self.counts = [0] * params.n  # tokens generated per sample
        self.unsent_tokens = [0] * params.n
        self.unsent_logprobs: list[list[TokenLogprob]] = [[] for _ in range(params.n)]
        self.rows = list(range(params.n))  # sample index of each live batch row
        self.cache: Any = None
        self.feed: torch.Tensor | None = None  # tokens chosen last step, to run through the model
        self.logits = self._prefill(prompt_ids, params.n)
        self.done = False

    @torch.inference_mode()
    def _prefill(self, prompt_ids: list[int], n: int) -> torch.Tensor:
        out = self.model(
            input_ids=torch.tensor([prompt_ids], device=self.model.device),
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache = out.past_key_values
        if n > 1:
            self.cache.batch_repeat_interleave(n)
        logits: torch.Tensor = out.logits[:, -1, :].expand(n, -1)
        return logits

    @torch.inference_mode()
    def step(self) -> list[GenerationChunk]:
        try:
            return self._step()
        except Exception as exc:
            self.done = True
            logger.exception("expert %s failed during decoding", self.engine.name)
            raise ExpertError(f"expert {self.engine.name} failed: {exc}") from exc

    def _step(self) -> list[GenerationChunk]:
        if self.feed is not None:
            out = self.model(
                input_ids=self.feed[:, None], past_key_values=self.cache, use_cache=True
            )
            self.logits = out.logits[:, -1, :]
        chosen = sample(self.logits, self.temperature, self.top_p, self.generator)
        if self.want_logprobs:
            chosen_lp, top_ids, top_lp = logprobs_of(self.logits, chosen, self.top_logprobs)

        chunks: list[GenerationChunk] = []
        keep: list[int] = []
        for row, index in enumerate(self.rows):
            token = int(chosen[row])
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
            if finish is None:
                keep.append(row)
        if len(keep) < len(self.rows):
            self.rows = [self.rows[r] for r in keep]
            if keep:
                self.cache.batch_select_indices(torch.tensor(keep))
        if not self.rows:
            self.done = True
            self.feed = None
        else:
            self.feed = chosen[keep] if len(keep) < len(chosen) else chosen
        return chunks

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

    def release(self) -> None:
        """Drop the KV cache now rather than when the generator is collected."""
        self.cache = None
        self.logits = torch.empty(0)
        self.feed = None
        self.done = True
