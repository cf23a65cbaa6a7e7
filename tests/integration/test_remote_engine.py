"""The `openai` engine against real servers on loopback: Chorus behind Chorus, and faults."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import ServerProcess, free_port
from tests.integration.conftest import relay_config

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_chorus_behind_chorus_gives_the_upstream_answer(
    server: ServerProcess, relay: ServerProcess
) -> None:
    upstream = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    through = openai.OpenAI(base_url=f"{relay.url}/v1", api_key="x", max_retries=0)
    direct = upstream.chat.completions.create(
        model="smollm2-135m-instruct", messages=QUESTION, temperature=0, max_tokens=16
    )
    relayed = through.chat.completions.create(
        model="relay", messages=QUESTION, temperature=0, max_tokens=16
    )
    assert relayed.choices[0].message.content == direct.choices[0].message.content
    assert relayed.usage is not None and direct.usage is not None
    assert relayed.usage.completion_tokens == direct.usage.completion_tokens
    assert relayed.usage.prompt_tokens == direct.usage.prompt_tokens
    assert relayed.model_extra["chorus"]["experts"] == ["remote-smollm2"]

    stream = through.chat.completions.create(
        model="relay", messages=QUESTION, temperature=0, max_tokens=16, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == direct.choices[0].message.content
    assert chunks[-1].usage is not None

    two = through.chat.completions.create(model="relay", messages=QUESTION, n=2, max_tokens=4)
    assert [c.index for c in two.choices] == [0, 1]


def test_the_experts_client_errors_pass_through_as_400(relay: ServerProcess) -> None:
    through = openai.OpenAI(base_url=f"{relay.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        through.chat.completions.create(model="relay", messages=QUESTION, max_tokens=99_999_999)
    assert "maximum context length" in info.value.message


def test_an_expert_that_dies_mid_stream_ends_the_stream_with_an_error_event(
    tmp_path: Path,
) -> None:
    upstream_config = tmp_path / "upstream.yaml"
    upstream_config.write_text(
        "experts:\n  smollm2-135m-instruct: {model: bundled:smollm2-135m-instruct}\n"
    )
    upstream = ServerProcess(upstream_config)
    relay = ServerProcess(relay_config(tmp_path, upstream.url))
    try:
        upstream.wait_ready(120)
        relay.wait_ready(60)
        body = {
            "model": "relay",
            "messages": [{"role": "user", "content": "Write a very long story about the sea."}],
            "max_tokens": 400,
            "temperature": 0,
            "stream": True,
        }
        events: list[str] = []
        with httpx.stream("POST", f"{relay.url}/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if len(events) == 4:
                    upstream.proc.kill()  # the expert's server dies mid-answer
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "expert_error"
        assert len(events) < 400  # it did not run to completion
        # The gateway keeps serving: it reports the expert down instead of hanging.
        deadline = time.monotonic() + 10
        while httpx.get(f"{relay.url}/health").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        metrics = httpx.get(f"{relay.url}/metrics").text
        assert 'chorus_expert_healthy{expert="remote-smollm2"} 0.0' in metrics
        refused = httpx.post(f"{relay.url}/v1/chat/completions", json={**body, "stream": False})
        assert refused.status_code == 503
    finally:
        relay.stop()
        upstream.stop()


def test_an_expert_that_never_answers_leaves_the_gateway_unready(tmp_path: Path) -> None:
    relay = ServerProcess(relay_config(tmp_path, f"http://127.0.0.1:{free_port()}"))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"{relay.url}/health", timeout=2)
                if health.json()["status"] == "unavailable":
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert health.status_code == 503 and health.json()["experts"] == {"remote-smollm2": False}
        response = httpx.post(
            f"{relay.url}/v1/chat/completions", json={"model": "relay", "messages": QUESTION}
        )
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "service_unavailable"
    finally:
        relay.stop()
