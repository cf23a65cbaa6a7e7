"""Server behaviour that needs scripted engines: loading, and failures before or after bytes."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from fastapi.testclient import TestClient

from serving.config import load_config
from serving.http.app import create_app
from tests.fakes import FakeEngine, ScriptedSamples

CONFIG = """
experts:
  good: {model: bundled:smollm2-135m-instruct}
  early: {model: bundled:smollm2-135m-instruct}
  late: {model: bundled:smollm2-135m-instruct}
pools:
  auto: {experts: [good, late]}
  fallback: {experts: [early, good]}
  doomed: {experts: [early, late]}
"""
BODY = {"messages": [{"role": "user", "content": "hi"}]}


def app_with(tmp_path: Path, loaded: threading.Event | None = None) -> TestClient:
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG)
    engines = {
        "good": FakeEngine("good", ["Hello", " there"], loaded=loaded),
        "early": FakeEngine("early", ["never"], fail_after=0),
        "late": FakeEngine("late", ["one", " two", " three"], fail_after=2),
    }
    return TestClient(create_app(load_config(path), engines=engines))


def test_health_is_503_while_loading_then_200(tmp_path: Path) -> None:
    loaded = threading.Event()
    with app_with(tmp_path, loaded) as client:
        assert client.get("/health").status_code == 503
        busy = client.post("/v1/chat/completions", json={"model": "auto", **BODY})
        assert busy.status_code == 503
        assert busy.json()["error"]["type"] == "service_unavailable"
        loaded.set()
        for _ in range(200):
            if client.get("/health").status_code == 200:
                break
            threading.Event().wait(0.01)
        assert client.get("/health").status_code == 200
        ok = client.post("/v1/chat/completions", json={"model": "auto", **BODY})
        assert ok.json()["choices"][0]["message"]["content"] == "Hello there"


def test_failure_before_the_first_chunk_is_an_http_error(tmp_path: Path) -> None:
    with app_with(tmp_path) as client:
        for stream in (False, True):
            response = client.post(
                "/v1/chat/completions", json={"model": "early", "stream": stream, **BODY}
            )
            assert response.status_code == 502
            assert response.json()["error"]["type"] == "expert_error"


def test_failure_after_the_first_byte_is_an_sse_error_event(tmp_path: Path) -> None:
    with app_with(tmp_path) as client:
        response = client.post(
            "/v1/chat/completions", json={"model": "late", "stream": True, **BODY}
        )
        assert response.status_code == 200
        events = [line[6:] for line in response.text.split("\n\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["type"] == "expert_error"
        text = "".join(
            json.loads(e)["choices"][0]["delta"].get("content", "")
            for e in events[:-2]
            if json.loads(e)["choices"]
        )
        assert text == "one two"


def test_non_streamed_failure_midway_is_an_http_error(tmp_path: Path) -> None:
    with app_with(tmp_path) as client:
        response = client.post("/v1/chat/completions", json={"model": "late", **BODY})
        assert response.status_code == 502
        metrics = client.get("/metrics").text
        assert 'chorus_requests_total{pool="late",status="502",strategy="single"} 1.0' in metrics
        assert "chorus_inflight_requests 0.0" in metrics


VOTE_CONFIG = """
experts:
  top: {model: bundled:smollm2-135m-instruct}
  next: {model: bundled:smollm2-135m-instruct}
pools:
  vote:
    experts: [top, next]
    strategy: {type: vote, samples: 3, keepalive_s: 0.05}
"""


def vote_app(tmp_path: Path) -> TestClient:
    path = tmp_path / "v.yaml"
    path.write_text(VOTE_CONFIG)
    engines = {
        "top": ScriptedSamples("top", [("42", -0.1), ("41", -0.5), ("42", -0.2)], delay_s=0.1),
        "next": ScriptedSamples("next", [("42", -0.1), ("7", -0.2), ("8", -0.3)]),
    }
    return TestClient(create_app(load_config(path), engines=engines))


def test_vote_pool_streams_keepalives_then_the_winner(tmp_path: Path) -> None:
    with vote_app(tmp_path) as client:
        wait_ready(client)
        body = {"model": "vote", "stream": True, "stream_options": {"include_usage": True}, **BODY}
        response = client.post("/v1/chat/completions", json=body)
        events = response.text.split("\n\n")
        assert ": keep-alive" in events
        data = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in data if c["choices"])
        assert text == "42"
        usage = data[-1]["usage"]
        # 2 of 3 top samples agree (< 0.8): the next expert votes too; usage counts all six.
        assert usage["completion_tokens"] == 12
        assert data[-1]["chorus"]["vote"]["answers"] == {"42": 3, "41": 1, "7": 1, "8": 1}
        assert data[-1]["chorus"]["experts"] == ["top", "next"]
        metrics = client.get("/metrics").text
        assert 'chorus_vote_agreement_ratio_count{pool="vote"} 1.0' in metrics
        assert 'chorus_vote_escalations_total{pool="vote"} 1.0' in metrics  # 2/3 < 0.8


def test_vote_pool_refuses_n_above_one(tmp_path: Path) -> None:
    with vote_app(tmp_path) as client:
        wait_ready(client)
        response = client.post("/v1/chat/completions", json={"model": "vote", "n": 2, **BODY})
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "n"


def wait_ready(client: TestClient) -> None:
    for _ in range(500):
        if client.get("/health").status_code == 200:
            return
        threading.Event().wait(0.01)
    raise TimeoutError("app did not become ready")


def test_single_falls_back_to_the_next_expert_before_the_first_byte(tmp_path: Path) -> None:
    with app_with(tmp_path) as client:
        wait_ready(client)
        for stream in (False, True):
            response = client.post(
                "/v1/chat/completions", json={"model": "fallback", "stream": stream, **BODY}
            )
            assert response.status_code == 200
            assert "Hello" in response.text and "there" in response.text
            assert response.headers["x-chorus-experts"] == "early,good"  # routed, best first
        plain = client.post("/v1/chat/completions", json={"model": "fallback", **BODY}).json()
        assert plain["chorus"]["failed"] == ["early"] and plain["chorus"]["experts"] == ["good"]
        metrics = client.get("/metrics").text
        assert 'chorus_expert_failures_total{expert="early"} 3.0' in metrics
        assert 'chorus_fallbacks_total{pool="fallback"} 3.0' in metrics


def test_a_failure_after_output_is_not_retried_on_another_expert(tmp_path: Path) -> None:
    with app_with(tmp_path) as client:
        wait_ready(client)
        # `early` fails at once, so `late` answers; `late` then fails after its first words.
        response = client.post("/v1/chat/completions", json={"model": "doomed", **BODY})
        assert response.status_code == 502
        streamed = client.post(
            "/v1/chat/completions", json={"model": "doomed", "stream": True, **BODY}
        )
        assert streamed.status_code == 200
        events = [e[6:] for e in streamed.text.split("\n\n") if e.startswith("data: ")]
        assert json.loads(events[-2])["error"]["type"] == "expert_error"
        text = "".join(
            json.loads(e)["choices"][0]["delta"].get("content", "")
            for e in events[:-2]
            if json.loads(e)["choices"]
        )
        assert text == "one two"  # what `late` said before failing; nobody else was tried


def test_while_draining_health_is_503_and_new_requests_are_refused(tmp_path: Path) -> None:
    with app_with(tmp_path) as client:
        wait_healthy(client)
        client.app.state.chorus.runtime.draining = True  # what SIGTERM sets
        health = client.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "draining"
        refused = client.post("/v1/chat/completions", json={"model": "auto", **BODY})
        assert refused.status_code == 503
        assert "shutting down" in refused.json()["error"]["message"]


def wait_healthy(client: TestClient) -> None:
    for _ in range(500):
        if client.get("/health").status_code == 200:
            return
        threading.Event().wait(0.01)
    raise AssertionError("never healthy")


def test_a_token_level_pool_over_engines_without_sessions_is_refused_at_start(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG + "  fused: {experts: [good, late], strategy: fuse}\n")
    engines = {name: FakeEngine(name, ["x"]) for name in ("good", "early", "late")}
    with TestClient(create_app(load_config(path), engines=engines)) as client:  # type: ignore[arg-type]
        wait_ready(client)
        reason = "`fuse` needs engines with decode sessions; ['good', 'late'] have none"
        assert client.get("/health").json()["errors"] == {"fused": reason}
        response = client.post("/v1/chat/completions", json={"model": "fused", **BODY})
        assert response.status_code == 503 and reason in response.json()["error"]["message"]


def test_fields_chorus_cannot_honour_are_refused_naming_them(tmp_path: Path) -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}
    with app_with(tmp_path) as client:
        wait_ready(client)
        for field, value in [
            ("tools", [tool]),
            ("tool_choice", "required"),
            ("response_format", schema),
            ("presence_penalty", 0.5),
            ("logit_bias", {"42": 5}),
        ]:
            body = {"model": "auto", **BODY, field: value}
            response = client.post("/v1/chat/completions", json=body)
            assert response.status_code == 400, field
            assert response.json()["error"]["param"] == field
        # The values that ask for nothing are fine, and so are fields nobody defines.
        harmless = {"tools": [], "response_format": {"type": "text"}, "presence_penalty": 0}
        body = {"model": "auto", **BODY, **harmless, "metadata": {"a": "b"}}
        assert client.post("/v1/chat/completions", json=body).status_code == 200
