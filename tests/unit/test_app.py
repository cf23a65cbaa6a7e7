"""Server behaviour that needs scripted engines: loading, and failures before or after bytes."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from fastapi.testclient import TestClient

from serving.app import create_app
from serving.config import load_config
from tests.fakes import FakeEngine

CONFIG = """
experts:
  good: {model: bundled:smollm2-135m-instruct}
  early: {model: bundled:smollm2-135m-instruct}
  late: {model: bundled:smollm2-135m-instruct}
pools:
  auto: {experts: [good, late]}
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
