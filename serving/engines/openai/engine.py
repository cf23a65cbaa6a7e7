"""An expert behind any OpenAI-compatible server (`vllm serve`, another Chorus, a hosted API).

Requests stream through `POST {base_url}/chat/completions`; a raw prompt (the legacy completions
API) through `POST {base_url}/completions`, as it is. Connection errors and 5xx answers are
retried with exponential backoff, but only before the first byte of output: after that, a lost
connection is reported as `ExpertFailed` (an SSE error event for streaming clients), never
silently restarted; so is an answer that is not what the OpenAI API writes (a line that is not
JSON, a choice without its `index`, ...): another expert may still answer. A background probe
(`GET {base_url}/models`) keeps `ready` current. The client, the retry policy and the reading of
answers are `openai.http`'s (shared with the decode sessions, `openai.session`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp

from ensemble.engine import DecodeSession
from ensemble.errors import ExpertFailed, ExpertUnavailable
from ensemble.structured import STRUCTURED
from ensemble.toolcalls import CALL_CLOSE, CALL_OPEN, HERMES, ToolCallReader
from ensemble.types import (
    ChatMessage,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    TokenLogprob,
    TopLogprob,
)
from serving.config import OpenAIExpertConfig
from serving.engines.common.prompts import stop_strings
from serving.engines.openai.http import (
    RETRYABLE,
    NotServed,
    Retryable,
    client_error,
    field_object,
    open_client,
    post_json,
    reading,
)
from serving.engines.openai.session import (
    TokenTexts,
    open_remote_session,
    server_root,
    tokenized,
)

logger = logging.getLogger(__name__)


class RemoteOpenAIEngine:
    def __init__(self, name: str, config: OpenAIExpertConfig) -> None:
        self.name = name
        self.config = config
        self.base_url = config.base_url.rstrip("/")
        self._client: aiohttp.ClientSession | None = None
        self._healthy = False
        self._probe: asyncio.Task[None] | None = None
        self._token_texts: TokenTexts | None = None  # what sessions learnt of the tokenizer

    @property
    def ready(self) -> bool:
        return self._healthy

    @property
    def context_window(self) -> int:
        return self.config.context_window

    # Passed through to the server, which honours them or answers 400 (`client_error`).
    honours = STRUCTURED

    @property
    def vocabulary(self) -> str:
        """The served model on that server. No other expert shares it in practice, and none
        may: `kl_centroid` and `dlf` need whole distributions, which a remote view does not give."""
        return f"openai:{self.config.model}@{self.base_url}"

    @property
    def default_stop(self) -> tuple[str, ...]:
        return self.config.stop

    def tool_reader(self, request: GenerationRequest) -> ToolCallReader:
        """Chorus's Hermes reader: the server parsed the calls its own way, and they come back
        as Hermes text (`_hermes`)."""
        del request
        return HERMES

    async def open_session(self, request: GenerationRequest) -> DecodeSession:
        """A decode session through `/v1/completions` (`openai.session`)."""
        if self._client is None:
            raise ExpertUnavailable(f"expert {self.name} is not started")
        if self._token_texts is None or self._token_texts.client is not self._client:
            self._token_texts = TokenTexts(self._client, self.config, self.name)
        return await open_remote_session(
            self.name, self.config, self._client, self._token_texts, request
        )

    async def count_prompt_tokens(self, request: GenerationRequest) -> int | None:
        """The prompt's tokens as the server counts them: vLLM's `POST /tokenize` (beside
        `/v1`) with what `generate` sends as the prompt. None where the server has no
        `/tokenize` (it is not vLLM): it cannot say before answering."""
        if self._client is None:
            raise ExpertUnavailable(f"expert {self.name} is not started")
        body: dict[str, Any] = {"model": self.config.model}
        if request.prompt is not None:
            body["prompt"] = request.prompt
        else:
            body["messages"] = [_message(m) for m in request.messages]
            body["add_generation_prompt"] = True
            if request.tools:
                body["tools"] = list(request.tools)
        url = f"{server_root(self.base_url)}/tokenize"
        try:
            ids = await post_json(self._client, self.config, self.name, url, body, tokenized)
        except NotServed:
            return None
        return len(ids)

    def _headers(self) -> dict[str, str]:
        env = self.config.api_key_env
        key = os.environ.get(env, "") if env else ""
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def start(self) -> None:
        self._client = open_client(self.config, self._headers())
        await self.check_health()
        self._probe = asyncio.create_task(self._probe_forever())
        if not self._healthy:
            logger.warning("expert %s: %s is not answering yet", self.name, self.config.base_url)

    async def check_health(self) -> bool:
        assert self._client is not None
        timeout = aiohttp.ClientTimeout(total=self.config.connect_timeout_s)
        try:
            async with self._client.get(f"{self.base_url}/models", timeout=timeout) as response:
                await response.read()
                self._healthy = response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            self._healthy = False
        return self._healthy

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            was = self._healthy
            if await self.check_health() != was:
                logger.info("expert %s is %s", self.name, "up" if self._healthy else "down")

    async def aclose(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        if self._client is not None:
            await self._client.close()
        self._healthy = False

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        params, defaults = request.params, self.config.defaults
        body: dict[str, Any] = {"model": self.config.model}
        if request.prompt is not None:
            body["prompt"] = request.prompt
        else:
            body["messages"] = [_message(m) for m in request.messages]
        body |= {
            "n": params.n,
            "temperature": params.temperature
            if params.temperature is not None
            else defaults.temperature,
            "top_p": params.top_p if params.top_p is not None else defaults.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        max_tokens = params.max_tokens or defaults.max_tokens
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        stop = list(stop_strings(self.config.stop, request))
        if stop:
            body["stop"] = stop
        if params.seed is not None:
            body["seed"] = params.seed
        if params.logprobs and request.prompt is not None:
            body["logprobs"] = params.top_logprobs  # the legacy API's: how many alternatives
        elif params.logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = params.top_logprobs
        # Untouched: the server renders tools, constrains and parses as it does.
        if request.tools:
            body["tools"] = list(request.tools)
            body["tool_choice"] = request.tool_choice
        if request.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = request.parallel_tool_calls
        if request.response_format is not None:
            body["response_format"] = request.response_format
        return body

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        if self._client is None:
            raise ExpertUnavailable(f"expert {self.name} is not started")
        body = self._body(request)
        legacy = request.prompt is not None
        url = f"{self.base_url}/completions" if legacy else f"{self.base_url}/chat/completions"
        for attempt in range(self.config.retries + 1):
            received = False
            try:
                async with self._client.post(url, json=body) as response:
                    if response.status >= 500:
                        raise Retryable(f"HTTP {response.status}")
                    if response.status >= 400:
                        raise client_error(self.name, response.status, await response.text())
                    async for chunk in _chunks(self.name, response, legacy):
                        received = True
                        yield chunk
                return
            except RETRYABLE as exc:
                if received or attempt == self.config.retries:
                    if not isinstance(exc, Retryable):
                        self._healthy = False  # unreachable: skipped until the probe sees it
                    raise ExpertFailed(f"expert {self.name} failed: {exc}") from exc
                delay = self.config.backoff_s * 2**attempt
                logger.warning("expert %s: %s; retrying in %.2fs", self.name, exc, delay)
                await asyncio.sleep(delay)
            except aiohttp.ClientError as exc:  # read timeouts, a connection cut mid-stream
                raise ExpertFailed(f"expert {self.name} failed mid-answer: {exc!r}") from exc


async def _chunks(
    name: str, response: aiohttp.ClientResponse, legacy: bool = False
) -> AsyncGenerator[GenerationChunk, None]:
    """OpenAI SSE chunks (`text_completion` ones when `legacy`) as `GenerationChunk`s; usage
    arrives as one accounting chunk."""
    done = False
    calls: dict[int, dict[int, list[str]]] = {}  # per choice, per call: name and arguments
    async for line in response.content:
        if done or not line.startswith(b"data:"):
            continue  # blank separators and keep-alive comments
        data = line[5:].strip()
        if data == b"[DONE]":
            # Read on to the end of the body (it follows at once): a response left unfinished
            # closes its connection instead of returning it to the pool, and a new connection
            # per request costs both servers CPU and a handshake (loadtest/RESULTS.md, gateway
            # overhead against vLLM, "Found and fixed by profiling the gateway").
            done = True
            continue
        with reading(name, "stream event"):
            chunks = _event_chunks(name, json.loads(data), calls, legacy)
        for chunk in chunks:
            yield chunk


def _event_chunks(
    name: str, event: Any, calls: dict[int, dict[int, list[str]]], legacy: bool = False
) -> list[GenerationChunk]:
    """One SSE event's chunks (read within `reading`: a missing or mistyped field raises);
    `text_completion` ones when `legacy`.

    The server's `delta.tool_calls` fragments are gathered in `calls`; when the choice ends they
    become Hermes text (`<tool_call>{...}</tool_call>`), which the gateway reads back into
    `tool_calls` as it reads every engine's (with ids of its own)."""
    event = field_object(event, "the event")
    if "error" in event:
        error = event["error"]
        message = error.get("message") if isinstance(error, dict) else error
        raise ExpertFailed(f"expert {name} failed mid-answer: {message}")
    chunks = []
    for choice in event.get("choices") or []:
        choice = field_object(choice, "a choice")
        index = int(choice["index"])
        if legacy:
            field, text = "text", choice.get("text") or ""
            logprobs = _legacy_logprobs(field_object(choice.get("logprobs"), "`logprobs`"))
        else:
            delta = field_object(choice.get("delta"), "`delta`")
            field, text = "content", delta.get("content") or ""
            logprobs = _chat_logprobs(field_object(choice.get("logprobs"), "`logprobs`"))
            for call in delta.get("tool_calls") or []:
                function = field_object(call.get("function"), "`function`")
                parts = calls.setdefault(index, {}).setdefault(int(call.get("index", 0)), ["", ""])
                parts[0] += function.get("name") or ""
                parts[1] += function.get("arguments") or ""
        if not isinstance(text, str):
            raise TypeError(f"`{field}` is a JSON {type(text).__name__}, not text")
        finish = choice.get("finish_reason")
        if finish and index in calls:
            text += "".join(_hermes(n, a) for n, a in calls.pop(index).values())
        if text or finish or logprobs:
            reason: FinishReason | None = None
            if finish:  # tool_calls, content_filter: the answer ended all the same
                reason = "length" if finish == "length" else "stop"
            chunks.append(GenerationChunk(name, index, text, 0, 0, logprobs, reason))
    usage = field_object(event.get("usage"), "`usage`")
    if usage:
        completion, prompt = usage.get("completion_tokens"), usage.get("prompt_tokens")
        chunks.append(GenerationChunk(name, 0, "", int(completion or 0), int(prompt or 0)))
    return chunks


def _chat_logprobs(logprobs: dict[str, Any]) -> tuple[TokenLogprob, ...]:
    """A chat choice's `logprobs.content` list."""
    return tuple(
        TokenLogprob(
            str(item["token"]),
            float(item["logprob"]),
            tuple(
                TopLogprob(str(t["token"]), float(t["logprob"]))
                for t in item.get("top_logprobs") or []
            ),
        )
        for item in logprobs.get("content") or []
    )


def _legacy_logprobs(logprobs: dict[str, Any]) -> tuple[TokenLogprob, ...]:
    """A text completion's parallel lists: `tokens`, `token_logprobs`, `top_logprobs` (one
    {token: logprob} object per token, or null)."""
    tokens = logprobs.get("tokens") or []
    chosen = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or [None] * len(tokens)
    return tuple(
        TokenLogprob(
            str(token),
            float(lp),
            tuple(TopLogprob(str(t), float(v)) for t, v in field_object(top, "a top").items()),
        )
        for token, lp, top in zip(tokens, chosen, tops, strict=True)
    )


def _hermes(name: str, arguments: str) -> str:
    body = f'{{"name": {json.dumps(name)}, "arguments": {arguments or "{}"}}}'
    return f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"


def _message(message: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["content"] = message.content or None
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out
