"""Decode sessions through an OpenAI-compatible server: fusion with a `vllm serve` expert.

The server owns the chat template, so a session asks it for the prompt once: `POST /tokenize`
with the messages and `add_generation_prompt` (vLLM's tokenizer endpoints sit beside `/v1`, at
the server root) gives the very token ids `/v1/chat/completions` would feed the model. From then
on the session holds token ids: the prompt's, then the answer's, and every view of the next step
is `POST /v1/completions` with those ids as the prompt, `temperature: 0`, `logprobs: L` and
`return_tokens_as_token_ids` (so two tokens with the same text stay two, and each comes back with
its id). The server's prefix cache makes the repeated prompt cheap; each step still costs one
HTTP round trip and one scheduled request.

Drafting (`common.drafts`): a view asks for up to `max_lookahead` greedy tokens at once, with the
top-L logprobs at every position. While the answer follows this expert's own greedy tokens (its
proposal was chosen, or a gated step took it), the next views are read off that draft with no
request; when the answer leaves the draft, the rest is dropped. The draft length adapts: the
first is of one token (an answer arrives whole, so a longer draft delays the first view), it
doubles after a draft was used to its end and is cut to the views used after one that was left
early, so an expert that keeps being overruled costs one decode step per view, not
`max_lookahead`.

What a remote view cannot give, and what stands in for it:

- The whole next-token distribution. `top_k(full=True)` returns `distribution=None`, and the
  config refuses `kl_centroid` weighting and `dlf` (whole distributions over a shared
  vocabulary) for pools with an `openai` expert.
- The entropy of that distribution (what cascades read): every engine's estimate from the top
  L = 20 logprobs (`common.entropy`), a lower bound on it, exact when those hold all the mass.
- Which tokens end the sequence. A token's text is the server's `/detokenize` of it alone
  (cached per engine). A token whose text looks like a special token (`<...>`) is asked about
  once, by forcing it (`allowed_token_ids`, one token): the server ends with `finish_reason:
  stop` and no text on an end-of-sequence token (the tokenizer's or the generation config's), and
  returns no text for another special token, which is then dropped, as every session drops
  special tokens. A greedy step that the server itself ends the same way marks its token as
  end-of-sequence too.

Text chosen by another expert (`extend`) is appended as text and tokenized by the server
(`POST /tokenize`) just before the next view, together with the tokens before it from a known
token boundary up to 8 back (`common.retokenize`: a merge across the join, " Par" + "is",
re-tokenizes as in process); a long stretch tokenized so is split where the server detokenizes
its head back to a prefix of the text, so the next join reads only the tail. A candidate that is
only part of a UTF-8 character is completed greedily when it is the top one (one request for up
to 4 more tokens), else dropped (`common.candidates`).

Connection errors and 5xx answers are retried with the engine's backoff (`openai.http.post_json`;
every request here is idempotent); 4xx answers are errors at once. An answer that is not JSON or
lacks a field this module reads is the expert's failure (`ExpertFailed`), named with the request
it answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import aiohttp

from ensemble.errors import ExpertFailed
from ensemble.types import GenerationRequest, NextTokens
from serving.config import OpenAIExpertConfig
from serving.engines.common.candidates import (
    MAX_BYTE_LOOKAHEAD,
    Completion,
    TokenKind,
    character_prefixes,
    is_whole,
    next_tokens,
    partial_top,
    ranked,
    view_size,
)
from serving.engines.common.drafts import Draft, View, next_lookahead
from serving.engines.common.prompts import check_room
from serving.engines.common.retokenize import TAIL_TOKENS, AnswerTokens
from serving.engines.openai.http import field_object, post_json

logger = logging.getLogger(__name__)

MAX_LOGPROBS = 20  # vLLM's default `--max-logprobs`
MAX_LOOKAHEAD = 8  # most greedy tokens drafted in one request
SEPARATOR = "\u241e"  # ␞, between tokens detokenized together


def server_root(base_url: str) -> str:
    """vLLM serves /tokenize and /detokenize at the root, beside `/v1`."""
    base = base_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


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

    def kind(self, token: int) -> TokenKind:
        """A learnt token's kind (`common.candidates.TokenPieces`)."""
        return self.kinds[token]

    def text(self, token: int) -> str:
        """A learnt token's text alone."""
        return self.texts[token]

    async def detokenize(self, ids: Sequence[int]) -> str:
        self.requests += 1
        body = {"model": self.config.model, "tokens": list(ids)}
        url = f"{self.root}/detokenize"
        return await post_json(self.client, self.config, self.name, url, body, _detokenized)

    async def tokenize(self, text: str) -> list[int]:
        self.requests += 1
        body = {"model": self.config.model, "prompt": text, "add_special_tokens": False}
        url = f"{self.root}/tokenize"
        return await post_json(self.client, self.config, self.name, url, body, tokenized)


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
        lambda out: (tokenized(out), int(out.get("max_model_len") or config.context_window)),
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
        self.answer = AnswerTokens(prompt_ids)
        self.lookahead = 1  # a draft arrives whole: the first is short (`common.drafts`)
        self.draft: Draft | None = None
        self.completions = 0  # /v1/completions requests (for the benchmark)
        self.closed = False

    # -- text in -----------------------------------------------------------------------------

    async def extend(self, text: str) -> None:
        self.answer.add_text(text)

    async def extend_ids(self, ids: tuple[int, ...], text: str) -> None:
        self.answer.add_ids(ids, text)

    async def _ids(self) -> list[int]:
        """Prompt and answer as token ids; chosen text is tokenized here, with a few tokens
        before it so that a merge across the join comes out as the tokenizer would write it."""
        if self.answer.pending:
            tail = self.answer.tail()
            tokens = await self.texts.tokenize(tail.text)
            starts: list[int | None] = [0, *[None] * (len(tokens) - 1)]
            if len(tokens) > 2 * TAIL_TOKENS:  # freeze the head: the next join reads the tail
                head = await self.texts.detokenize(tokens[:-TAIL_TOKENS])
                if is_whole(head) and tail.text.startswith(head):
                    starts[-TAIL_TOKENS] = len(head)
            self.answer.settle(tail, tokens, starts)
        return list(self.answer.ids)

    # -- candidates out ----------------------------------------------------------------------

    async def top_k(self, k: int, *, full: bool = False) -> NextTokens:  # noqa: ARG002
        """The `k` most likely next pieces of text, renormalised over those kept (the rules of
        `common.candidates`), with no whole distribution (`full` cannot be honoured remotely)."""
        if self.closed:
            raise ExpertFailed(f"expert {self.expert}: the decode session is closed")
        ids = await self._ids()
        entries = ranked(await self._view(ids, k))
        await self.texts.learn([t for t, _ in entries])
        partial = partial_top(entries, self.texts)
        completed = await self._complete(ids, *partial) if partial else None
        return next_tokens(entries, k, self.texts, completed)

    async def _view(self, ids: list[int], k: int) -> View:
        """The top logprobs for the token after `ids`: from the draft when the answer has
        followed it, else from a new request (drafting ahead)."""
        draft = self.draft
        if draft is not None:
            view = await draft.view_for(ids)
            if view is not None:
                return view
            self.lookahead = next_lookahead(draft, ids, self.lookahead, self.max_lookahead)
        room = max(1, self.limit - len(ids))
        draft = self.draft = await self._request(ids, min(self.lookahead, room), k)
        draft.used = 1
        return draft.views[0]  # `_drafted` gives one token at least, and a view for each

    async def _request(self, ids: list[int], tokens: int, k: int) -> Draft:
        body = {
            "model": self.config.model,
            "prompt": ids,
            "max_tokens": tokens,
            "temperature": 0,
            "logprobs": min(view_size(k), MAX_LOGPROBS),
            "return_tokens_as_token_ids": True,
        }
        self.completions += 1
        chosen, views, ended = await post_json(
            self.client, self.config, self.expert, self.texts.completions_url, body, _drafted
        )
        if ended:
            self.texts.mark_end(chosen[-1])  # the server ended the answer on this token
        return Draft.done(ids, chosen, views)

    async def _complete(self, ids: list[int], token: int, lp: float) -> Completion | None:
        """Follow the server greedily from a partial-character token until the bytes decode."""
        body = {
            "model": self.config.model,
            "prompt": [*ids, token],
            "max_tokens": MAX_BYTE_LOOKAHEAD,
            "temperature": 0,
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
        }
        self.completions += 1
        following, following_lps = await post_json(
            self.client, self.config, self.expert, self.texts.completions_url, body, _followed
        )
        path = [(token, lp), *zip(following, following_lps, strict=False)]
        for prefix, logprob in character_prefixes(path):
            text = await self.texts.detokenize(prefix)
            if is_whole(text):
                return Completion(text, prefix, logprob)
        return None

    async def aclose(self) -> None:
        """Nothing is held on the server between requests: closing drops the local state."""
        self.closed = True
        self.draft = None
        self.answer = AnswerTokens(self.prompt_ids)


# What is read of each answer, within `post_json`'s `reading`: a missing field or one of the
# wrong kind raises there, and comes out as the expert's failure.


def tokenized(out: Any) -> list[int]:
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


def _drafted(out: Any) -> tuple[list[int], list[View], bool]:
    """`/v1/completions` with top logprobs: the greedy tokens, the top logprobs before each,
    and whether the server ended the answer on the last token."""
    choice, logprobs = _first_choice(out), _logprobs(out)
    chosen = [_token_id(t) for t in logprobs.get("tokens") or []]
    views: list[View] = [
        {
            _token_id(t): float(lp)
            for t, lp in field_object(top, "an entry of `top_logprobs`").items()
        }
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
