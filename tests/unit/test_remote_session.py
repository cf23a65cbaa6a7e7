"""The `openai` engine's decode sessions against a scripted vLLM-like server (no model)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from ensemble.errors import ExpertFailed, PromptTooLong
from ensemble.types import ChatMessage, GenerationRequest, SamplingParams
from serving.config import OpenAIExpertConfig
from serving.engines.common.entropy import estimated_entropy
from serving.engines.openai.engine import RemoteOpenAIEngine
from serving.engines.openai.session import SEPARATOR, RemoteSession
from tests.upstream import serve

# A toy tokenizer: one character per token, 0 ends the sequence, 9 is another special token.
VOCAB = {0: "<eos>", 9: "<pad>", 99: SEPARATOR, **{i: "abcdefgh"[i - 1] for i in range(1, 9)}}
PROMPT = [50, 51]
WINDOW = 64


class ToyServer:
    """Greedy next token: the last one plus 1 (after 8: end), probability 0.6; then two others."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.tokenized: list[str] = []

    async def handler(self, request: web.Request) -> web.Response:
        if request.method == "GET":  # the health probe
            return web.json_response({"data": []})
        body = await request.json()
        path = request.path
        self.calls.append(path)
        if path == "/tokenize":
            if "messages" in body:
                return web.json_response({"tokens": PROMPT, "max_model_len": WINDOW})
            self.tokenized.append(body["prompt"])
            ids = [next(i for i, t in VOCAB.items() if t == c) for c in body["prompt"]]
            return web.json_response({"tokens": ids, "max_model_len": WINDOW})
        if path == "/detokenize":
            return web.json_response({"prompt": "".join(VOCAB[t] for t in body["tokens"])})
        assert path == "/v1/completions"
        ids = list(body["prompt"])
        if body.get("allowed_token_ids"):
            (token,) = body["allowed_token_ids"]
            text = "" if token in (0, 9) else VOCAB[token]
            finish = "stop" if token == 0 else "length"
            choice = {"text": text, "finish_reason": finish, "stop_reason": None}
            return web.json_response({"choices": [choice]})
        tokens, tops, finish = [], [], "length"
        for _ in range(body["max_tokens"]):
            last = ids[-1] if ids[-1] in range(1, 9) else 0
            nxt = last + 1 if last < 8 else 0
            top = {nxt: math.log(0.6), (nxt + 3) % 9: math.log(0.2), 9: math.log(0.1)}
            tokens.append(f"token_id:{nxt}")
            tops.append({f"token_id:{t}": lp for t, lp in top.items()})
            ids.append(nxt)
            if nxt == 0:
                finish = "stop"
                break
        logprobs = {"tokens": tokens, "top_logprobs": tops, "token_logprobs": [-0.5] * len(tokens)}
        choice = {"text": "", "logprobs": logprobs, "finish_reason": finish, "stop_reason": None}
        return web.json_response({"choices": [choice]})


@contextlib.asynccontextmanager
async def started(server: ToyServer) -> AsyncIterator[RemoteOpenAIEngine]:
    """An engine pointed at the toy server, over real loopback HTTP."""
    async with serve(server.handler) as url:
        config = OpenAIExpertConfig(engine="openai", base_url=f"{url}/v1", model="toy")
        engine = RemoteOpenAIEngine("toy", config)
        await engine.start()
        try:
            yield engine
        finally:
            await engine.aclose()


def request(max_tokens: int | None = 16) -> GenerationRequest:
    return GenerationRequest("t", (ChatMessage("user", "hi"),), SamplingParams(max_tokens))


async def follow(session: Any, steps: int = 16) -> str:
    text = ""
    for _ in range(steps):
        top = (await session.top_k(3)).candidates[0]
        if top.end:
            return text + "|"
        text += top.text
        await session.extend_ids(top.token_ids, top.text)
    return text


def test_views_follow_the_servers_greedy_path_from_drafts() -> None:
    async def go() -> None:
        server = ToyServer()
        async with started(server) as toy:
            session = await toy.open_session(request())
            assert isinstance(session, RemoteSession) and session.prompt_tokens == 2
            view = await session.top_k(3, full=True)
            assert [c.text for c in view.candidates] == ["a", "d"]  # "<pad>" is dropped
            assert sum(math.exp(c.logprob) for c in view.candidates) == pytest.approx(1.0)
            assert view.distribution is None
            assert await follow(session) == "abcdefgh|"  # the top one each step, to the end
            assert session.completions == 4  # drafts of 1, 2, 4, 8 tokens for 9 views
            # each token's text learnt once, with one probe per special-looking token
            probes = server.calls.count("/v1/completions") - session.completions
            assert probes == 2 and toy._token_texts is not None
            assert toy._token_texts.kinds[0] == "end" and toy._token_texts.kinds[9] == "special"
            await session.aclose()

    asyncio.run(go())


def test_text_chosen_elsewhere_is_tokenized_and_the_draft_dropped() -> None:
    async def go() -> None:
        server = ToyServer()
        async with started(server) as toy:
            session = await toy.open_session(request())
            await session.top_k(3)
            await session.extend("d")  # not the expert's "a": another expert's piece
            assert await follow(session, 2) == "ef"
            assert server.calls.count("/tokenize") == 3  # the prompt, the separator, then "d"
            assert isinstance(session, RemoteSession)
            assert session.completions == 3  # the draft after "a" was of no use after "d"

    asyncio.run(go())


def test_a_prompt_that_leaves_no_room_is_a_context_length_error() -> None:
    async def go() -> None:
        async with started(ToyServer()) as toy:
            with pytest.raises(PromptTooLong):
                await toy.open_session(request(WINDOW))

    asyncio.run(go())


class MalformedServer(ToyServer):
    """The toy server, but with one kind of answer replaced by `answer` (raw bytes)."""

    def __init__(self, where: str, answer: bytes) -> None:
        super().__init__()
        self.where, self.answer = where, answer

    async def handler(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            body = await request.json()
            if request.path == "/tokenize":
                kind = "prompt" if "messages" in body else "tokenize"
            elif request.path == "/detokenize":
                kind = "detokenize"
            else:
                kind = "probe" if body.get("allowed_token_ids") else "draft"
            if kind == self.where:
                return web.Response(body=self.answer, content_type="application/json")
        return await super().handler(request)


def _draft(**logprobs: Any) -> bytes:
    lp = {"tokens": ["token_id:1"], "top_logprobs": [{"token_id:1": -0.5}], **logprobs}
    return json.dumps(
        {"choices": [{"text": "", "logprobs": lp, "finish_reason": "length"}]}
    ).encode()


@pytest.mark.parametrize(
    ("where", "answer", "path", "wrong"),
    [
        ("prompt", b"<html>oops</html>", "/tokenize", "not JSON"),
        ("prompt", b'{"ids": [1, 2]}', "/tokenize", "no 'tokens' field"),
        ("prompt", b'{"tokens": "ab"}', "/tokenize", "`tokens` is not a list of token ids"),
        ("prompt", b'{"tokens": [1], "max_model_len": "big"}', "/tokenize", "invalid literal"),
        ("draft", b'{"choices": [', "/v1/completions", "not JSON"),
        ("draft", b'{"choices": []}', "/v1/completions", "list index out of range"),
        ("draft", b'{"choices": ["a"]}', "/v1/completions", "a choice is a JSON str"),
        ("draft", _draft(tokens=["a"]), "/v1/completions", "not a token id"),
        (
            "draft",
            _draft(top_logprobs=[[1]]),
            "/v1/completions",
            "an entry of `top_logprobs` is a JSON list",
        ),
        ("draft", _draft(top_logprobs=[]), "/v1/completions", "no logprobs for its tokens"),
        ("tokenize", b"[]", "/tokenize", "list indices must be integers"),
        ("detokenize", b'{"prompt": 5}', "/detokenize", "`prompt` is a JSON int, not text"),
        ("probe", b'{"choices": null}', "/v1/completions", "not subscriptable"),
    ],
)
def test_a_malformed_answer_is_a_failed_expert_naming_the_request_and_what_was_wrong(
    where: str, answer: bytes, path: str, wrong: str
) -> None:
    async def go() -> None:
        async with started(MalformedServer(where, answer)) as toy:
            with pytest.raises(ExpertFailed) as failed:
                session = await toy.open_session(request())
                await follow(session)
            message = failed.value.message
            assert f"expert toy sent a malformed answer to POST {path}: " in message
            assert wrong in message

    asyncio.run(go())


def test_the_entropy_estimate_is_exact_on_a_whole_distribution_and_a_lower_bound_on_part() -> None:
    probs = [0.5, 0.25, 0.125, 0.0625, 0.0625]
    exact = -sum(p * math.log(p) for p in probs)
    assert estimated_entropy([math.log(p) for p in probs]) == pytest.approx(exact)
    top3 = estimated_entropy([math.log(p) for p in probs[:3]])
    assert -sum(p * math.log(p) for p in probs[:3]) < top3 <= exact
    assert estimated_entropy([]) == 0.0


def test_a_long_answer_of_text_from_elsewhere_is_retokenized_only_at_its_tail() -> None:
    async def go() -> None:
        server = ToyServer()
        async with started(server) as toy:
            session = await toy.open_session(request(48))
            for piece in "abcdefgh" * 5:
                await session.top_k(3)
                await session.extend(piece)
            await session.top_k(3)
            assert isinstance(session, RemoteSession)
            assert max(len(t) for t in server.tokenized) <= 17  # 8 back, then the head freezes
            assert len(await session._ids()) == 2 + 40

    asyncio.run(go())
