"""API keys and body limits, in front of every route."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from starlette.routing import Route

from serving.config import load_config
from serving.http.app import create_app
from serving.http.routes.playground import PLAYGROUND_PATHS
from tests.fakes import FakeEngine

KEY = "sk-test-123"
DIGEST = hashlib.sha256(KEY.encode()).hexdigest()
BODY = {"model": "good", "messages": [{"role": "user", "content": "hi"}]}


def app(tmp_path: Path, auth: str = "", extra: str = "") -> TestClient:
    path = tmp_path / "c.yaml"
    path.write_text(
        f"server:\n  max_body_bytes: 2048\n  max_messages: 3\n{auth}{extra}"
        "experts:\n  good: {model: bundled:smollm2-135m-instruct}\n"
    )
    engines = {"good": FakeEngine("good", ["Hello"])}
    return TestClient(create_app(load_config(path), engines=engines))


def keyed(tmp_path: Path, protect_metrics: bool = False) -> TestClient:
    auth = f"  auth:\n    api_key_hashes: ['{DIGEST}']\n    api_keys_env: CHORUS_TEST_KEYS\n"
    if protect_metrics:
        auth += "    protect_metrics: true\n"
    return app(tmp_path, auth)


def test_no_route_is_reachable_without_a_key(tmp_path: Path) -> None:
    with keyed(tmp_path, protect_metrics=True) as client:
        routes = [r for r in client.app.routes if isinstance(r, Route)]  # type: ignore[attr-defined]
        assert len(routes) >= 5
        for route in routes:
            for method in route.methods or {"GET"}:
                response = client.request(method, route.path)
                expected = 200 if route.path == "/health" else 401
                if route.path == "/health":
                    assert response.status_code in (200, 503)
                    continue
                if route.path in PLAYGROUND_PATHS:  # static, no data: the calls need the key
                    assert response.status_code == 200, route.path
                    continue
                assert response.status_code == expected, (method, route.path)
                if method == "HEAD":
                    continue  # no body to read
                error = response.json()["error"]
                assert error["code"] == "invalid_api_key"
                assert response.headers["www-authenticate"] == "Bearer"
        assert client.get("/nowhere").status_code == 401  # unknown paths give nothing away


def test_keys_from_the_config_hash_and_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHORUS_TEST_KEYS", "sk-env-1, sk-env-2")
    with keyed(tmp_path) as client:
        for key in (KEY, "sk-env-1", "sk-env-2"):
            headers = {"Authorization": f"Bearer {key}"}
            response = client.post("/v1/chat/completions", json=BODY, headers=headers)
            assert response.status_code in (200, 503), key  # 503 only while loading
        for bad in ("Bearer wrong", f"Basic {KEY}", KEY, f"Bearer {DIGEST}"):
            response = client.post(
                "/v1/chat/completions", json=BODY, headers={"Authorization": bad}
            )
            assert response.status_code == 401, bad
        assert client.get("/metrics").status_code == 200  # open unless protect_metrics
        assert client.get("/health").status_code in (200, 503)


def test_without_keys_the_server_is_open(tmp_path: Path) -> None:
    with app(tmp_path) as client:
        assert client.get("/v1/models").status_code == 200


def test_bodies_over_the_limit_get_413(tmp_path: Path) -> None:
    with app(tmp_path) as client:
        big = {**BODY, "messages": [{"role": "user", "content": "x" * 4096}]}
        response = client.post("/v1/chat/completions", json=big)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"

        def chunks():  # no content-length: the limit is enforced while reading
            yield b'{"model": "good", "messages": [{"role": "user", "content": "'
            for _ in range(10):
                yield b"y" * 512
            yield b'"}]}'

        response = client.post(
            "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert response.status_code == 413
        assert client.get("/v1/models").status_code == 200  # and the server keeps serving


def test_too_many_messages_is_a_400(tmp_path: Path) -> None:
    with app(tmp_path) as client:
        for _ in range(500):
            if client.get("/health").status_code == 200:
                break
        many = {**BODY, "messages": [{"role": "user", "content": "hi"}] * 4}
        response = client.post("/v1/chat/completions", json=many)
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "messages"
