"""Decode sessions through an OpenAI-compatible server: fusion with a `vllm serve` expert.

The server owns the chat template, so a session asks it for the prompt once: `POST /tokenize`
with the messages and `add_generation_prompt` (vLLM's tokenizer endpoints sit beside `/v1`, at
the server root) gives the very token ids `/v1/chat/completions` would feed the model. From then
on the session holds token ids: the prompt's, then the answer's, and every view of the next step
is `POST /v1/completions` with those ids as the prompt, `temperature: 0`, `logprobs: L` and
`return_tokens_as_token_ids` (so two tokens with the same text stay two, and each comes back with
its id). The server's prefix cache makes the repeated prompt cheap; each step still costs one
HTTP round trip and one scheduled request.

Drafting: a view asks for up to `max_lookahead` greedy tokens at once, with the top-L logprobs at
every position. While the answer follows this expert's own greedy tokens (its proposal was
chosen, or a gated step took it), the next views are read off that draft with no request; when
the answer leaves the draft, the rest is dropped. The draft length adapts: it doubles after a
draft was used to its end and falls back to 1 after one that was left early, so an expert that
keeps being overruled costs one decode step per view, not `max_lookahead`.

What a remote view cannot give, and what stands in for it:

- The whole next-token distribution. `top_k(full=True)` returns `distribution=None`, and the
  config refuses `dynamic` weighting (whole distributions over a shared vocabulary) for pools
  with an `openai` expert.
- The entropy of that distribution (what cascades read). It is estimated from the top-L
  logprobs (L = `logprobs` asked, 20 at most, vLLM's default `--max-logprobs`): with kept
  probabilities p_1 >= ... >= p_L and leftover mass r = 1 - sum(p),
  H ~= -sum(p_i log p_i) - r log min(p_L, r). Every token outside the top L has probability at
  most p_L, and at most r, so its share -q log q is at least -q log min(p_L, r): the estimate
  is a lower bound on the true entropy (the leftover spread over tokens as likely as the least
  likely kept one, or lumped into one outcome, whichever says more), exact when r = 0.
- Which tokens end the sequence. A token's text is the server's `/detokenize` of it alone
  (cached per engine). A token whose text looks like a special token (`<...>`) is asked about
  once, by forcing it (`allowed_token_ids`, one token): the server ends with `finish_reason:
  stop` and no text on an end-of-sequence token (the tokenizer's or the generation config's), and
  returns no text for another special token, which is then dropped, as the transformers session
  drops special tokens. A greedy step that the server itself ends the same way marks its token as
  end-of-sequence too.

Text chosen by another expert (`extend`) is appended as text and tokenized by the server
(`POST /tokenize`) just before the next view, together with up to 8 tokens before it (a merge
across the join, " Par" + "is", re-tokenizes as the transformers session does). A candidate that
is only part of a UTF-8 character is completed greedily when it is the top one (one request for
up to 4 tokens), else dropped.

Connection errors and 5xx answers are retried with the engine's backoff (every request here is
idempotent); 4xx answers are errors at once. An answer that is not JSON or lacks a field this
module reads is the expert's failure (`ExpertFailed`), named with the request it answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import aiohttp

from ensemble.errors import ExpertFailed
from ensemble.types import GenerationRequest, NextTokens
from serving.config import OpenAIExpertConfig
from serving.engines.common.candidates import (
    MAX_BYTE_LOOKAHEAD,
    REPLACEMENT,
    TAIL_TOKENS,
    renormalised,
)
from serving.engines.common.prompts import check_room
from serving.engines.openai.engine import RETRYABLE, _Retryable, client_error, field_object, reading

logger = logging.getLogger(__name__)

MAX_LOGPROBS = 20  # vLLM's default `--max-logprobs`
EXTRA_LOGPROBS = 8  # asked beyond k: special and partial-character tokens are dropped
MAX_LOOKAHEAD = 8  # most greedy tokens drafted in one request
SEPARATOR = "\u241e"  # ␞, between tokens detokenized together

TokenKind = Literal["text", "end", "special"]
T = TypeVar("T")


def server_root(base_url: str) -> str:
    """vLLM serves /tokenize and /detokenize at the root, beside `/v1`."""
    base = base_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def _as_is(answer: Any) -> Any:
    return answer


async def post_json(
    client: aiohttp.ClientSession,
    config: OpenAIExpertConfig,
    name: str,
    url: str,
    body: dict[str, Any],
    read: Callable[[Any], T] = _as_is,
) -> T:
    """POST with the engine's retry policy: connection errors and 5xx, with backoff. The JSON
    answer is passed through `read`, which takes out what the caller needs: an answer that is
    not JSON, or that `read` cannot take apart (a missing field, a wrong kind), raises
    `ExpertFailed`."""
    for attempt in range(config.retries + 1):
        try:
            async with client.post(url, json=body) as response:
                if response.status >= 500:
                    raise _Retryable(f"HTTP {response.status}")
                raw = await response.read()
                if response.status >= 400:
                    raise client_error(name, response.status, raw.decode(errors="replace"))
                break
        except RETRYABLE as exc:
            if attempt == config.retries:
                raise ExpertFailed(f"expert {name} failed: {exc}") from exc
            await asyncio.sleep(config.backoff_s * 2**attempt)
        except aiohttp.ClientError as exc:  # cut off
            raise ExpertFailed(f"expert {name} failed: {exc!r}") from exc
    else:
        raise AssertionError("unreachable")
    with reading(name, f"answer to POST {urlsplit(url).path}"):
        return read(json.loads(raw))


class TokenTexts:
    """What the engine has learnt about the server's tokens: each one's text and kind.

    Shared by all sessions of one engine (one tokenizer); concurrent asks for one token share
    one request."""

    def __init__(
        self, client: aiohttp.ClientSession, config: OpenAIExpertConfig, name: str
    ) -> None:
        self.client = client
        self.config = config
        self.name = name
        self.root = server_root(config.base_url)
        self.completions_url = f"{config.base_url.rstrip('/')}/completions"
        self.texts: dict[int, str] = {}
        self.kinds: dict[int, TokenKind] = {}
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._separator: list[int] | None = None
        self.requests = 0  # tokenizer and probe requests made (for the benchmark)

    async def learn(self, ids: Sequence[int]) -> None:
        """Learn the text and kind of every token not known yet (one `/detokenize` for all)."""
        waiting = {self._pending[i] for i in ids if i in self._pending}
        missing = [i for i in dict.fromkeys(ids) if i not in self.kinds and i not in self._pending]
        if missing:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            for token in missing:
                self._pending[token] = future
            try:
                texts = await self._detokenize_each(missing)
                kinds = await asyncio.gather(*(self._kind(t, x) for t, x in texts.items()))
                for (token, text), kind in zip(texts.items(), kinds, strict=True):
                    self.texts[token] = text
                    self.kinds[token] = kind
                future.set_result(None)
            except BaseException as exc:
                future.set_exception(exc)
                future.exception()  # retrieved: a failure with no other waiter is not logged
                raise
            finally:
                for token in missing:
                    del self._pending[token]
        for other in waiting:
            await asyncio.shield(other)

    async def _detokenize_each(self, ids: list[int]) -> dict[int, str]:
        """Each token's text as if decoded alone, in one request: the tokens joined by a
        separator and the answer split on it. A tokenizer that does not give the separator back
        cleanly (a token holding it, a prefix space) falls back to one request per token."""
        if self._separator is None:
            self._separator = await self.tokenize(SEPARATOR)
        sep = self._separator
        joined: list[int] = list(sep)
        for token in ids:
            joined += [token, *sep]
        parts = (await self.detokenize(joined)).split(SEPARATOR)
        if len(parts) == len(ids) + 2 and parts[0] == parts[-1] == "":
            return dict(zip(ids, parts[1:-1], strict=True))
        texts = await asyncio.gather(*(self.detokenize([t]) for t in ids))
        return dict(zip(ids, texts, strict=True))

    async def _kind(self, token: int, text: str) -> TokenKind:
        if text.startswith("<") and text.endswith(">") and len(text) > 2:
            return await self._probe(token)
        return "text"

    async def _probe(self, token: int) -> TokenKind:
        """Force the token as the only allowed one: an end-of-sequence token stops the answer
        with no text; any other special token gives no text either."""
        body = {
            "model": self.config.model,
            "prompt": [token],
            "max_tokens": 1,
            "temperature": 0,
            "allowed_token_ids": [token],
        }
        self.requests += 1
        choice = await post_json(
            self.client, self.config, self.name, self.completions_url, body, _first_choice
        )
        if choice.get("text"):
            return "text"
        stopped = choice.get("finish_reason") == "stop" and choice.get("stop_reason") in (
            None,
            token,
        )
        return "end" if stopped else "special"

    def mark_end(self, token: int) -> None:
        self.kinds[token] = "end"

    async def detokenize(self, ids: Sequence[int]) -> str:
        self.requests += 1
        body = {"model": self.config.model, "tokens": list(ids)}
        url = f"{self.root}/detokenize"
        return await post_json(self.client, self.config, self.name, url, body, _detokenized)

    async def tokenize(self, text: str) -> list[int]:
        self.requests += 1
        body = {"model": self.config.model, "prompt": text, "add_special_tokens": False}
        url = f"{self.root}/tokenize"
        return await post_json(self.client, self.config, self.name, url, body, _tokenized)


@dataclass(slots=True)
class _Draft:
    base: tuple[int, ...]  # the ids the draft continues
    tokens: list[int]  # the greedy tokens the server chose
    views: list[list[tuple[int, float]]]  # top logprobs before each of them, best first


@dataclass(slots=True)
class _Segment:
    text: str
    ids: list[int] | None  # None: chosen text not yet tokenized


async def open_remote_session(
    name: str,
    config: OpenAIExpertConfig,
    client: aiohttp.ClientSession,
    texts: TokenTexts,
    request: GenerationRequest,
    *,
    max_lookahead: int = MAX_LOOKAHEAD,
) -> RemoteSession:
    body = {
        "model": config.model,
        "messages": [{"role": m.role, "content": m.content} for m in request.messages],
        "add_generation_prompt": True,
    }
    prompt_ids, window = await post_json(
        client,
        config,
        name,
        f"{texts.root}/tokenize",
        body,
        lambda out: (_tokenized(out), int(out.get("max_model_len") or config.context_window)),
    )
    max_tokens = request.params.max_tokens
    room = check_room(window, len(prompt_ids), max_tokens)
    limit = len(prompt_ids) + (max_tokens or room)
    return RemoteSession(name, config, client, texts, prompt_ids, limit, max_lookahead)


class RemoteSession:
    """One answer decoded step by step through `/v1/completions` (see the module docstring)."""

    def __init__(
        self,
        expert: str,
        config: OpenAIExpertConfig,
        client: aiohttp.ClientSession,
        texts: TokenTexts,
        prompt_ids: list[int],
        limit: int,
        max_lookahead: int = MAX_LOOKAHEAD,
    ) -> None:
        self.expert = expert
        self.prompt_tokens = len(prompt_ids)
        self.config = config
        self.client = client
        self.texts = texts
        self.prompt_ids = prompt_ids
        self.limit = limit  # prompt + the answer's most tokens: no draft runs past it
        self.max_lookahead = max(1, max_lookahead)
        self.segments: list[_Segment] = []
        self.lookahead = 1
        self.draft: _Draft | None = None
        self.completions = 0  # /v1/completions requests (for the benchmark)
        self.closed = False

    # -- text in -----------------------------------------------------------------------------

    async def extend(self, text: str) -> None:
        if text:
            self.segments.append(_Segment(text, None))

    async def extend_ids(self, ids: tuple[int, ...], text: str) -> None:
        self.segments.append(_Segment(text, list(ids)))

    async def _ids(self) -> list[int]:
        """Prompt and answer as token ids; chosen text is tokenized here, with a few tokens
        before it so that a merge across the join comes out as the tokenizer would write it."""
        first = next((i for i, s in enumerate(self.segments) if s.ids is None), None)
        if first is not None:
            start, before = first, 0
            while start > 0 and before < TAIL_TOKENS:
                start -= 1
                before += len(self.segments[start].ids or ())
            text = "".join(s.text for s in self.segments[start:])
            tokens = await self.texts.tokenize(text)
            tail = [_Segment(text, tokens)]
            if len(tokens) > 2 * TAIL_TOKENS:  # freeze the head: the next join reads the tail
                head = await self.texts.detokenize(tokens[:-TAIL_TOKENS])
                if head and REPLACEMENT not in head and text.startswith(head):
                    tail = [
                        _Segment(head, tokens[:-TAIL_TOKENS]),
                        _Segment(text[len(head) :], tokens[-TAIL_TOKENS:]),
                    ]
            self.segments[start:] = tail
        ids = list(self.prompt_ids)
        for segment in self.segments:
            ids += segment.ids or ()
        return ids

    # -- candidates out ----------------------------------------------------------------------

    async def top_k(self, k: int, *, full: bool = False) -> NextTokens:  # noqa: ARG002
        """The `k` most likely next pieces of text, renormalised over those kept; as the
        transformers session, with the entropy estimated from the top logprobs and no whole
        distribution (`full` cannot be honoured remotely)."""
        if self.closed:
            raise ExpertFailed(f"expert {self.expert}: the decode session is closed")
        ids = await self._ids()
        ranked = await self._view(ids, k)
        await self.texts.learn([t for t, _ in ranked])
        mass: dict[str, float] = {}
        paths: dict[str, tuple[int, ...]] = {}
        for rank, (token, lp) in enumerate(ranked):
            if len(mass) >= k:
                break
            kind = self.texts.kinds[token]
            path: tuple[int, ...] = (token,)
            if kind == "end":
                text = ""
            elif kind == "special":
                continue
            else:
                text = self.texts.texts[token]
                if REPLACEMENT in text or not text:
                    completed = await self._complete(ids, token, lp) if rank == 0 else None
                    if completed is None:
                        continue
                    text, path, lp = completed
            mass[text] = mass.get(text, 0.0) + math.exp(lp)
            paths.setdefault(text, path)
        candidates = renormalised(dict(sorted(mass.items(), key=lambda item: -item[1])), paths)
        return NextTokens(candidates, estimated_entropy([lp for _, lp in ranked]))

    async def _view(self, ids: list[int], k: int) -> list[tuple[int, float]]:
        """The top logprobs for the token after `ids`: from the draft when the answer has
        followed it, else from a new request (drafting ahead)."""
        draft = self.draft
        if draft is not None:
            n = len(draft.base)
            on_base = tuple(ids[:n]) == draft.base
            j = len(ids) - n
            if on_base and 0 <= j < len(draft.views) and ids[n:] == draft.tokens[:j]:
                return draft.views[j]
            # Past the draft's end on its own tokens: draft further next time; else start over.
            followed = on_base and ids[n : n + len(draft.tokens)] == draft.tokens
            self.lookahead = min(self.lookahead * 2, self.max_lookahead) if followed else 1
        room = max(1, self.limit - len(ids))
        self.draft = await self._request(ids, min(self.lookahead, room), k)
        return self.draft.views[0]

    async def _request(self, ids: list[int], tokens: int, k: int) -> _Draft:
        body = {
            "model": self.config.model,
            "prompt": ids,
            "max_tokens": tokens,
            "temperature": 0,
            "logprobs": min(k + EXTRA_LOGPROBS, MAX_LOGPROBS),
            "return_tokens_as_token_ids": True,
        }
        self.completions += 1
        chosen, views, ended = await post_json(
            self.client, self.config, self.expert, self.texts.completions_url, body, _drafted
        )
        if ended:
            self.texts.mark_end(chosen[-1])  # the server ended the answer on this token
        return _Draft(tuple(ids), chosen, views)

    async def _complete(
        self, ids: list[int], token: int, lp: float
    ) -> tuple[str, tuple[int, ...], float] | None:
        """Follow the server greedily from a partial-character token until the bytes decode."""
        body = {
            "model": self.config.model,
            "prompt": [*ids, token],
            "max_tokens": MAX_BYTE_LOOKAHEAD - 1,
            "temperature": 0,
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
        }
        self.completions += 1
        following, following_lps = await post_json(
            self.client, self.config, self.expert, self.texts.completions_url, body, _followed
        )
        path, total = [token], lp
        for nxt, nxt_lp in zip([None, *following], [0.0, *following_lps], strict=False):
            if nxt is not None:
                path.append(nxt)
                total += nxt_lp
            text = await self.texts.detokenize(path)
            if text and REPLACEMENT not in text:
                return text, tuple(path), total
        return None

    async def aclose(self) -> None:
        """Nothing is held on the server between requests: closing drops the local state."""
        self.closed = True
        self.draft = None
        self.segments = []


# What is read of each answer, within `post_json`'s `reading`: a missing field or one of the
# wrong kind raises there, and comes out as the expert's failure.


def _tokenized(out: Any) -> list[int]:
    """`/tokenize`: the token ids."""
    tokens = out["tokens"]
    if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
        raise TypeError("`tokens` is not a list of token ids")
    return tokens


def _detokenized(out: Any) -> str:
    """`/detokenize`: the text."""
    text = out["prompt"]
    if not isinstance(text, str):
        raise TypeError(f"`prompt` is a JSON {type(text).__name__}, not text")
    return text


def _first_choice(out: Any) -> dict[str, Any]:
    """`/v1/completions`: its (only) choice."""
    return field_object(out["choices"][0], "a choice")


def _logprobs(out: Any) -> dict[str, Any]:
    return field_object(_first_choice(out).get("logprobs"), "`logprobs`")


def _drafted(out: Any) -> tuple[list[int], list[list[tuple[int, float]]], bool]:
    """`/v1/completions` with top logprobs: the greedy tokens, the top logprobs before each
    (best first), and whether the server ended the answer on the last token."""
    choice, logprobs = _first_choice(out), _logprobs(out)
    chosen = [_token_id(t) for t in logprobs.get("tokens") or []]
    views = [
        sorted(
            (
                (_token_id(t), float(lp))
                for t, lp in field_object(top, "an entry of `top_logprobs`").items()
            ),
            key=_by_logprob,
        )
        for top in logprobs.get("top_logprobs") or []
    ]
    if not views or len(views) != len(chosen):
        raise ValueError("no logprobs for its tokens")
    ended = choice.get("finish_reason") == "stop" and choice.get("stop_reason") in (
        None,
        chosen[-1],
    )
    return chosen, views, ended


def _followed(out: Any) -> tuple[list[int], list[float]]:
    """`/v1/completions` with the chosen tokens' logprobs: those tokens and logprobs."""
    logprobs = _logprobs(out)
    tokens = [_token_id(t) for t in logprobs.get("tokens") or []]
    return tokens, [float(x) for x in logprobs.get("token_logprobs") or []]


def _token_id(token: Any) -> int:
    """`token_id:123` (vLLM's `return_tokens_as_token_ids` form) -> 123."""
    if isinstance(token, str):
        with contextlib.suppress(ValueError):
            return int(token.rsplit(":", 1)[-1])
    raise ValueError(f"not a token id (`return_tokens_as_token_ids`): {str(token)[:40]!r}")


def _by_logprob(item: tuple[int, float]) -> tuple[float, int]:
    return -item[1], item[0]


def estimated_entropy(logprobs: Sequence[float]) -> float:
    """Entropy of a next-token distribution known only by its top logprobs: the kept part
    exactly, the leftover mass r as tokens of probability min(least kept, r) (a lower bound;
    see the module docstring)."""
    probs = [math.exp(lp) for lp in logprobs if lp > -9999.0]
    if not probs:
        return 0.0
    kept = -sum(p * math.log(p) for p in probs if p > 0)
    rest = max(0.0, 1.0 - sum(probs))
    bound = min(min(probs), rest)
    return kept + (rest * -math.log(bound) if bound > 0 else 0.0)
