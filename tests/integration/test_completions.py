"""`POST /v1/completions` on the real server (`chorus serve` on loopback, the bundled models),
driven by the official `openai` SDK; Chorus behind Chorus through the `openai` engine."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest

from ensemble.errors import PromptTooLong
from ensemble.types import GenerationRequest, SamplingParams
from tests.conftest import ServerProcess, collect, texts
from tests.loopback import metric

if TYPE_CHECKING:
    from serving.engines.transformers.engine import TransformersEngine

pytestmark = pytest.mark.integration

SMOLLM2, GEMMA = "smollm2-135m-instruct", "gemma3-270m"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@functools.cache
def reference(expert: str, prompt: str, max_new_tokens: int) -> str:
    """transformers' own greedy continuation of the raw prompt: no chat template, the
    tokenizer's special tokens as its `__call__` adds them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serving.models import bundled

    path = bundled.resolve(f"bundled:{expert}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    text: str = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return text


def raw(prompt: str, **params: Any) -> GenerationRequest:
    return GenerationRequest("raw", (), SamplingParams(**params), prompt=prompt)


def test_the_engine_continues_the_raw_prompt_as_transformers_does(
    smollm2: TransformersEngine, gemma: TransformersEngine
) -> None:
    """The engine seam itself, without the server: a raw prompt is not templated, and an
    expert's chat-turn stop (gemma's "\nUser:") does not cut it."""
    for engine in (smollm2, gemma):
        chunks = collect(engine, raw(PROMPT, max_tokens=12, temperature=0))
        assert texts(chunks)[0] == reference(engine.name, PROMPT, 12)
    dialogue = "User: hi\nAssistant: hello\nUser: bye\nAssistant: bye\nUser: hi\nAssistant:"
    chunks = collect(gemma, raw(dialogue, max_tokens=12, temperature=0))
    assert texts(chunks)[0] == reference(GEMMA, dialogue, 12)


def test_a_raw_prompt_too_long_names_prompt(smollm2: TransformersEngine) -> None:
    with pytest.raises(PromptTooLong) as too_long:
        collect(smollm2, raw("word " * 9000, max_tokens=4))
    assert too_long.value.param == "prompt"


@pytest.mark.parametrize("expert", [SMOLLM2, GEMMA])
def test_greedy_output_is_transformers_own_for_the_raw_prompt(
    client: openai.OpenAI, expert: str
) -> None:
    """Fails if a chat template (or an expert's chat-turn stop) touched the prompt."""
    completion = client.completions.create(
        model=expert, prompt=PROMPT, max_tokens=12, temperature=0
    )
    assert completion.object == "text_completion"
    assert completion.choices[0].text == reference(expert, PROMPT, 12)
    assert completion.choices[0].finish_reason in ("length", "stop")
    assert completion.usage is not None and completion.usage.completion_tokens > 0


def test_stream_matches_the_plain_answer_with_usage(client: openai.OpenAI) -> None:
    plain = client.completions.create(model=SMOLLM2, prompt=PROMPT, max_tokens=12, temperature=0)
    stream = client.completions.create(
        model=SMOLLM2,
        prompt=PROMPT,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert plain.usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_a_list_of_prompts_gives_one_choice_each(client: openai.OpenAI) -> None:
    prompts = [PROMPT, "1, 2, 3, 4,"]
    both = client.completions.create(model=SMOLLM2, prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in both.choices] == [0, 1]
    for choice, prompt in zip(both.choices, prompts, strict=True):
        alone = client.completions.create(model=SMOLLM2, prompt=prompt, max_tokens=6, temperature=0)
        assert choice.text == alone.choices[0].text


def test_logprobs_in_the_legacy_shape(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model=SMOLLM2, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2
    )
    choice = completion.choices[0]
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs
    assert logprobs.top_logprobs is not None and logprobs.text_offset is not None
    assert "".join(logprobs.tokens) == choice.text
    assert len(logprobs.token_logprobs) == len(logprobs.tokens) == len(logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    for token, lp, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert lp <= 0 and 1 <= len(top) <= 3 and top[token] == lp
        assert max(top.values()) == lp  # greedy: the chosen token is the likeliest


def test_echo_and_stop(client: openai.OpenAI) -> None:
    plain = client.completions.create(model=SMOLLM2, prompt=PROMPT, max_tokens=12, temperature=0)
    echoed = client.completions.create(
        model=SMOLLM2, prompt=PROMPT, max_tokens=12, temperature=0, echo=True
    )
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    text = plain.choices[0].text
    stop = text.split()[1]  # a word inside the greedy continuation
    stopped = client.completions.create(
        model=SMOLLM2, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].text == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_pools_routed_or_refused_and_counted(server: ServerProcess, client: openai.OpenAI) -> None:
    before = metric(server.url, "chorus_requests_total", pool="auto", status="200")
    tokens = metric(server.url, "chorus_pool_tokens_total", pool="auto", kind="completion")
    routed = client.completions.create(model="auto", prompt=PROMPT, max_tokens=4, temperature=0)
    assert routed.model_extra is not None
    assert routed.model_extra["chorus"]["strategy"] == "single"
    assert isinstance(routed.model_extra["chorus"]["cluster"], int)  # routed on the prompt
    assert metric(server.url, "chorus_requests_total", pool="auto", status="200") == before + 1
    assert routed.usage is not None
    after = metric(server.url, "chorus_pool_tokens_total", pool="auto", kind="completion")
    assert after == tokens + routed.usage.completion_tokens
    for pool in ("vote", "fuse"):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=pool, prompt=PROMPT, max_tokens=4)
        assert refused.value.body["param"] == "model"  # type: ignore[index]
    assert metric(server.url, "chorus_requests_total", pool="fuse", status="400") >= 1


def test_fields_it_cannot_honour_are_refused_on_the_real_server(server: ServerProcess) -> None:
    for body, param in (
        ({"suffix": "!"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"presence_penalty": 1.0}, "presence_penalty"),
    ):
        response = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": SMOLLM2, "prompt": PROMPT, **body},
            timeout=60,
        )
        assert response.status_code == 400
        assert response.json()["error"]["param"] == param
    chat = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "fuse", "messages": [{"role": "user", "content": "hi"}], "verbosity": "low"},
        timeout=60,
    )
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "verbosity"


def test_chorus_behind_chorus_relays_raw_prompts(
    client: openai.OpenAI, relay: ServerProcess
) -> None:
    through = openai.OpenAI(base_url=f"{relay.url}/v1", api_key="x", max_retries=0)
    direct = client.completions.create(
        model=SMOLLM2, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=1
    )
    relayed = through.completions.create(
        model="relay", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=1
    )
    assert relayed.choices[0].text == direct.choices[0].text == reference(SMOLLM2, PROMPT, 8)
    assert relayed.usage is not None and direct.usage is not None
    assert relayed.usage.prompt_tokens == direct.usage.prompt_tokens
    assert relayed.choices[0].logprobs is not None and direct.choices[0].logprobs is not None
    assert relayed.choices[0].logprobs.tokens == direct.choices[0].logprobs.tokens
    stream = through.completions.create(
        model="relay", prompt=PROMPT, max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == direct.choices[0].text
