"""The real server on loopback, driven by the official `openai` SDK and plain HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import DEFAULT_CONFIG, ServerProcess
from tests.loopback import metric

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
SMOLLM2, GEMMA, QWEN = "smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-0.5b-instruct"


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_plain_completion(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=SMOLLM2, messages=QUESTION, temperature=0, max_tokens=20
    )
    assert "Paris" in (completion.choices[0].message.content or "")
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    chorus = completion.model_extra["chorus"]
    assert chorus["pool"] == SMOLLM2 and chorus["experts"] == [SMOLLM2]
    assert chorus["cluster"] is None  # an expert addressed directly is not routed


def test_routed_pool_shows_its_decision_in_body_headers_and_metrics(
    server: ServerProcess, client: openai.OpenAI
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=QUESTION, temperature=0, max_tokens=20
    )
    completion = raw.parse()
    assert completion.choices[0].message.content
    chorus = completion.model_extra["chorus"]
    assert chorus["pool"] == "auto" and chorus["strategy"] == "single"
    assert len(chorus["experts"]) == 1 and chorus["experts"][0] in (SMOLLM2, GEMMA, QWEN)
    assert isinstance(chorus["cluster"], int) and chorus["ood"] is False
    assert chorus["weights"] == [1.0]
    assert chorus["timings"]["total_ms"] >= chorus["timings"]["route_ms"] > 0
    assert raw.headers["x-chorus-pool"] == "auto"
    assert raw.headers["x-chorus-strategy"] == "single"
    assert raw.headers["x-chorus-experts"].split(",")[0] == chorus["experts"][0]  # routed first
    assert raw.headers["x-chorus-cluster"] == str(chorus["cluster"])
    assert raw.headers["x-chorus-ood"] == "false"
    assert float(raw.headers["x-chorus-overhead-ms"]) >= chorus["timings"]["route_ms"]

    # The default router's clusters are broad (public benchmarks of every kind), so nothing
    # short of a query unlike any text is out of distribution there; OOD routing is tested
    # with a tight artifact in test_router_real.py.
    client.chat.completions.create(model="auto", messages=QUESTION, max_tokens=2)

    text = httpx.get(f"{server.url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    routed = [s for s in families["chorus_routing_duration_seconds"].samples
              if s.name.endswith("_count") and s.labels["pool"] == "auto"]  # fmt: skip
    assert routed and routed[0].value >= 2
    assert "chorus_route_ood" in families


def test_stream_with_usage_matches_the_plain_answer(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(
        model=SMOLLM2, messages=QUESTION, temperature=0, max_tokens=20
    )
    stream = client.chat.completions.create(
        model=SMOLLM2,
        messages=QUESTION,
        temperature=0,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    ids = {c.id for c in chunks}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert len(ids) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text == plain.choices[0].message.content
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens  # type: ignore[union-attr]
    assert chunks[-1].model_extra["chorus"]["experts"] == [SMOLLM2]


def test_gemma_streams_too(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="gemma3-270m", messages=QUESTION, temperature=0, max_tokens=12, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.strip()


def test_n_two(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="auto", messages=QUESTION, n=2, max_tokens=8, seed=5, temperature=1.0
    )
    assert [c.index for c in completion.choices] == [0, 1]
    assert all(c.message.content for c in completion.choices)


def test_n_two_streamed_keeps_choices_apart(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="auto", messages=QUESTION, n=2, max_tokens=8, temperature=0, stream=True
    )
    out = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            out[choice.index] += choice.delta.content or ""
    assert out[0] == out[1] != ""


def test_stop(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=SMOLLM2, messages=QUESTION, temperature=0, stop=["Paris"], max_tokens=20
    )
    assert completion.choices[0].message.content == "The capital of France is "
    assert completion.choices[0].finish_reason == "stop"


def test_max_tokens_one_finishes_with_length(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="auto", messages=QUESTION, max_tokens=1)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 1


def test_max_completion_tokens_is_honoured(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="auto", messages=QUESTION, max_completion_tokens=2, temperature=0
    )
    assert completion.usage is not None and completion.usage.completion_tokens == 2


def test_logprobs(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="auto", messages=QUESTION, temperature=0, max_tokens=5, logprobs=True, top_logprobs=2
    )
    content = completion.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == completion.usage.completion_tokens  # type: ignore[union-attr]
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert "".join(t.token for t in content).startswith(completion.choices[0].message.content or "")
    assert completion.model_extra["chorus"]["experts"][0] in (SMOLLM2, GEMMA, QWEN)


def test_tools_are_refused_through_the_sdk_not_ignored(client: openai.OpenAI) -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    with pytest.raises(openai.BadRequestError) as info:  # SmolLM2's template has no tools
        client.chat.completions.create(model=SMOLLM2, messages=QUESTION, tools=[tool])  # type: ignore[list-item]
    assert info.value.body["param"] == "tools"  # type: ignore[index]


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-17", messages=QUESTION)
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"
    assert "gpt-17" in info.value.message


def test_empty_messages_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="auto", messages=[])
    assert info.value.param == "messages"


def test_models_lists_experts_and_pools(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert ids == {"auto", "vote", "fuse", SMOLLM2, GEMMA, QWEN}


HOSTILE = [
    b"not json",
    b"[]",
    b"{}",
    b'{"model": "auto"}',
    b'{"model": "auto", "messages": "hello"}',
    b'{"model": "auto", "messages": [{"role": "wizard", "content": "hi"}]}',
    b'{"model": "auto", "messages": [{"role": "user", "content": 42}]}',
    b'{"model": "auto", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
    b'{"model": "auto", "messages": [{"role": "user", "content": "hi"}], "n": 0}',
    b'{"model": "auto", "messages": [{"role": "user", "content": "hi"}], "n": 1000000}',
    b'{"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}',
    b'{"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 99999999}',
    b'{"model": "auto", "messages": [{"role": "user", "content": "hi"}], "temperature": 9}',
    b'{"model": "auto", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}',
    b'{"model": "auto", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 5}',
    b'{"model": "auto", "messages": [{"role": "user", "content": "hi"}], "logprobs": true,'
    b' "top_logprobs": 500}',
    b'{"model": "auto", "messages": [{"role": "user", "content": "hi"}], "stop": ["a","b","c",'
    b'"d","e","f","g","h","i"]}',
    b'{"model": "auto", "messages": [{"role": "user", "content": "hi"}], "stream_options": {}}',
    b'{"model": ["auto"], "messages": [{"role": "user", "content": "hi"}]}',
    # Longer than every expert's context window (Qwen2.5-Coder's is 32,768 tokens).
    b'{"model": "auto", "messages": [{"role": "user", "content": "' + b"x " * 40000 + b'"}]}',
    b"\xff\xfe\x00garbage",
]


def test_hostile_requests_get_openai_shaped_4xx_and_the_server_keeps_serving(
    server: ServerProcess, client: openai.OpenAI
) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for body in HOSTILE:
            response = http.post(
                "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
            )
            assert 400 <= response.status_code < 500, (body[:80], response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["message"]
        assert http.get("/v1/nowhere").json()["error"]["type"] == "not_found_error"
        assert http.put("/v1/chat/completions").status_code == 405
    completion = client.chat.completions.create(model="auto", messages=QUESTION, max_tokens=2)
    assert completion.choices[0].message.content


def test_metrics_parse_and_count_requests(server: ServerProcess, client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="auto", messages=QUESTION, max_tokens=2)
    expert = reply.model_extra["chorus"]["experts"][0]
    text = httpx.get(f"{server.url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in [
        "chorus_requests",
        "chorus_request_duration_seconds",
        "chorus_time_to_first_token_seconds",
        "chorus_tokens",
        "chorus_inflight_requests",
        "chorus_expert_selected",
        "chorus_expert_healthy",
        "chorus_routing_duration_seconds",
        "chorus_route_ood",
    ]:
        assert name in families, name

    def value(family: str, sample: str, **labels: str) -> float:
        return sum(
            s.value
            for s in families[family].samples
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
        )

    requests, tokens, selected = "chorus_requests", "chorus_tokens", "chorus_expert_selected"
    assert value(requests, f"{requests}_total", pool="auto", status="200") >= 1
    assert value(requests, f"{requests}_total", status="404") >= 1
    assert value(tokens, f"{tokens}_total", expert=expert, kind="completion") >= 2
    assert value(tokens, f"{tokens}_total", expert=expert, kind="prompt") >= 1
    assert value(selected, f"{selected}_total", pool="auto", expert=expert) >= 1
    assert value("chorus_expert_healthy", "chorus_expert_healthy", expert=GEMMA) == 1
    assert value("chorus_inflight_requests", "chorus_inflight_requests") == 0
    duration = "chorus_request_duration_seconds"
    assert value(duration, f"{duration}_count", pool="auto") >= 1


def test_health_is_ok_once_loaded(server: ServerProcess) -> None:
    response = httpx.get(f"{server.url}/health")
    assert response.status_code == 200
    assert json.loads(response.text)["experts"] == {SMOLLM2: True, GEMMA: True, QWEN: True}


def test_vote_pool_through_the_sdk_plain_and_streamed(client: openai.OpenAI) -> None:
    question = [{"role": "user", "content": "What is the capital of Italy? Answer with the city."}]
    completion = client.chat.completions.create(model="vote", messages=question, max_tokens=12)
    vote = completion.model_extra["chorus"]["vote"]
    assert sum(vote["answers"].values()) >= 1 and 0 <= vote["agreement"] <= 1
    assert completion.model_extra["chorus"]["strategy"] == "vote"
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens >= 5

    stream = client.chat.completions.create(
        model="vote", messages=question, max_tokens=12, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert chunks[-1].usage is not None
    assert "vote" in chunks[-1].model_extra["chorus"]

    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="vote", messages=question, n=2)


def test_eval_command_writes_report_chart_and_results(server: ServerProcess, tmp_path) -> None:
    data = tmp_path / "labeled.jsonl"
    data.write_text(
        '{"question": "What is the capital of France?", "answers": ["Paris"], "category": "geo"}\n'
        '{"question": "What is 2 + 3?", "answers": ["5"], "category": "math"}\n'
    )
    out = tmp_path / "eval"
    done = subprocess.run(
        [sys.executable, "-m", "serving", "eval", "--config", str(DEFAULT_CONFIG),
         "--data", str(data), "--models", "smollm2-135m-instruct,auto", "--out", str(out),
         "--url", server.url, "--max-tokens", "16"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(results) == 4 and {r["model"] for r in results} == {"smollm2-135m-instruct", "auto"}
    assert all(r["latency_s"] > 0 and "reply" in r for r in results)
    report = (out / "report.md").read_text()
    assert "| smollm2-135m-instruct |" in report and "| geo (1) |" in report
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fuse_pool_streams_through_the_sdk(server: ServerProcess, client: openai.OpenAI) -> None:
    question = [{"role": "user", "content": "What is 8 times 5?"}]
    plain = client.chat.completions.create(model="fuse", messages=question, max_tokens=16)
    fusion = plain.model_extra["chorus"]["fusion"]
    assert plain.model_extra["chorus"]["strategy"] == "fuse"
    fused = set(fusion["share"])  # the two routed experts (top_k 2) of the three
    assert len(fused) == 2 and fused <= {SMOLLM2, GEMMA, QWEN}
    assert 0 <= fusion["gate_skip_rate"] <= 1
    assert plain.usage is not None and plain.usage.completion_tokens == fusion["steps"]

    stream = client.chat.completions.create(
        model="fuse", messages=question, max_tokens=16, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(pieces) > 1  # fused tokens stream as they are chosen
    assert "".join(pieces) == plain.choices[0].message.content  # greedy both times
    assert chunks[-1].usage is not None
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert set(finishing[0].model_extra["chorus"]["experts"]) == fused

    text = httpx.get(f"{server.url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    steps = [s.value for s in families["chorus_fusion_steps"].samples
             if s.name == "chorus_fusion_steps_total" and s.labels["pool"] == "fuse"]  # fmt: skip
    assert steps and steps[0] >= 2 * fusion["steps"]
    selected = {s.labels["expert"]: s.value for s in families["chorus_expert_selected"].samples
                if s.name.endswith("_total") and s.labels["pool"] == "fuse"}  # fmt: skip
    assert all(selected.get(e, 0) >= 2 for e in fused)  # both requests
    assert "chorus_fusion_gate_skips" in families and "chorus_fusion_step_seconds" in families


def _completion_tokens(server: ServerProcess) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        if f.name == "chorus_tokens"
        for s in f.samples
        if s.labels.get("expert") == SMOLLM2 and s.labels.get("kind") == "completion"
    )


def _settles(server: ServerProcess) -> tuple[float, float]:
    """Completion tokens 1.5 s and 3 s after a client left: equal when engine work stopped."""
    time.sleep(1.5)
    first = _completion_tokens(server)
    time.sleep(1.5)
    return first, _completion_tokens(server)


LONG = {
    "model": SMOLLM2,
    "messages": [{"role": "user", "content": "Write a very long story about the sea."}],
    "max_tokens": 400,
    "temperature": 0,
}


def test_a_client_leaving_a_plain_request_stops_the_engine(server: ServerProcess) -> None:
    before = _completion_tokens(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=LONG, timeout=1.5)
    first, later = _settles(server)
    assert first == later, "the engine kept generating for a client that left"
    assert before < later < before + 200  # it had started, and stopped well before 400 tokens
    inflight = httpx.get(f"{server.url}/metrics").text
    assert "chorus_inflight_requests 0.0" in inflight


def test_a_client_leaving_a_stream_stops_the_engine(server: ServerProcess) -> None:
    before = _completion_tokens(server)
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json={**LONG, "stream": True}, timeout=30
    ) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i > 10:
                break  # closing the response here drops the connection
    first, later = _settles(server)
    assert first == later, "the engine kept generating for a client that left"
    assert before < later < before + 200


@pytest.mark.parametrize("model", [SMOLLM2, "auto", "vote", "fuse"])
def test_cost_in_body_header_and_metric_agree(
    server: ServerProcess, client: openai.OpenAI, model: str
) -> None:
    before = metric(server.url, "chorus_cost_total", pool=model)
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=QUESTION, max_tokens=8
    )
    completion = raw.parse()
    chorus = completion.model_extra["chorus"]
    assert chorus["cost_unit"] == "seconds"  # no prices: what calibration measured here
    per_expert = chorus["usage"]
    assert completion.usage is not None
    assert sum(u["prompt_tokens"] for u in per_expert.values()) == completion.usage.prompt_tokens
    assert (
        sum(u["completion_tokens"] for u in per_expert.values())
        == completion.usage.completion_tokens
    )
    assert chorus["cost"] == pytest.approx(sum(u["cost"] for u in per_expert.values()))
    assert chorus["cost"] > 0
    assert float(raw.headers["x-chorus-cost"]) == pytest.approx(chorus["cost"], rel=1e-5)
    spent = metric(server.url, "chorus_cost_total", pool=model) - before
    assert spent == pytest.approx(chorus["cost"], rel=1e-9)
    for expert, usage in per_expert.items():
        tokens = metric(server.url, "chorus_pool_tokens_total", pool=model, expert=expert)
        assert tokens >= usage["prompt_tokens"] + usage["completion_tokens"]
    if model == "fuse":  # every fused expert is paid for, not only the one whose tokenizer won
        assert len(per_expert) >= 2


def test_quality_weight_per_request_body_or_header(client: openai.OpenAI) -> None:
    cheap = client.chat.completions.create(
        model="auto", messages=QUESTION, max_tokens=4, extra_body={"quality_weight": 0.0}
    )
    by_header = client.chat.completions.create(
        model="auto", messages=QUESTION, max_tokens=4,
        extra_headers={"x-chorus-quality-weight": "0"},
    )  # fmt: skip
    # At alpha 0 only cost counts: the routed expert is the cheapest one the router knows.
    assert cheap.model_extra["chorus"]["experts"] == by_header.model_extra["chorus"]["experts"]
    models = {m.id: m.model_extra["chorus"] for m in client.models.list().data}
    costs = {e: models[e]["cost"]["per_million_completion_tokens"] for e in (SMOLLM2, GEMMA, QWEN)}
    assert cheap.model_extra["chorus"]["experts"][0] != QWEN and costs[QWEN] == max(costs.values())
    assert models["auto"]["cost_aware"] and models["auto"]["quality_weight"] == 1.0
    assert models["auto"]["cost_scale"] == "pool"  # configs/default.yaml
    assert models[SMOLLM2]["cost"]["source"] == "measured by calibration"
    for bad, param in (
        ({"extra_body": {"quality_weight": 1.5}}, "quality_weight"),
        ({"extra_headers": {"x-chorus-quality-weight": "cheap"}}, "x-chorus-quality-weight"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="auto", messages=QUESTION, max_tokens=2, **bad)
        assert refused.value.body["param"] == param  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as refused:  # an expert is not routed at all
        client.chat.completions.create(
            model=SMOLLM2, messages=QUESTION, max_tokens=2, extra_body={"quality_weight": 0.5}
        )
    assert refused.value.body["param"] == "quality_weight"  # type: ignore[index]


def test_a_vote_reads_answers_in_the_format_the_request_names(client: openai.OpenAI) -> None:
    question = [{"role": "user", "content": "Which is a fruit?\nA. stone\nB. apple\nC. car\n"
                 "Answer with the letter of the correct option only."}]  # fmt: skip
    voted = client.chat.completions.create(
        model="vote", messages=question, max_tokens=1, extra_body={"answer_format": "choice"}
    )
    counted = voted.model_extra["chorus"]["vote"]["answers"]
    # Option letters only (A-J: the format does not know the options), whatever else was said.
    assert counted and all(len(k) == 1 and k in "ABCDEFGHIJ" for k in counted)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="auto", messages=question, max_tokens=1, extra_body={"answer_format": "choice"}
        )
    assert refused.value.body["param"] == "answer_format"  # type: ignore[index]
