"""`GET /playground`: the page and its assets, served from the package without a key."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from fastapi.testclient import TestClient

from serving.config import load_config
from serving.http.app import create_app
from serving.http.routes.playground import PLAYGROUND_PATHS
from tests.fakes import FakeEngine

KEY = "sk-play"
CONFIG = f"""
server:
  auth: {{api_key_hashes: ['{hashlib.sha256(KEY.encode()).hexdigest()}']}}
experts:
  good: {{model: bundled:smollm2-135m-instruct}}
"""


def keyed(tmp_path: Path) -> TestClient:
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG)
    engines = {"good": FakeEngine("good", ["Hello"])}
    return TestClient(create_app(load_config(path), engines=engines))


def test_the_page_and_its_assets_load_without_a_key_and_the_api_still_needs_one(
    tmp_path: Path,
) -> None:
    with keyed(tmp_path) as client:
        kinds = {}
        for path in PLAYGROUND_PATHS:
            response = client.get(path)
            assert response.status_code == 200, path
            assert response.headers["cache-control"] == "no-cache"
            assert "default-src 'self'" in response.headers["content-security-policy"]
            kinds[path] = response.headers["content-type"].split(";")[0]
        assert kinds == {
            "/playground": "text/html",
            "/playground/playground.js": "text/javascript",
            "/playground/playground.css": "text/css",
        }
        assert client.get("/playground/other.js").status_code == 401  # only the listed files
        assert client.get("/v1/models").status_code == 401
        headers = {"Authorization": f"Bearer {KEY}"}
        assert client.get("/v1/models", headers=headers).status_code == 200


def test_the_page_refers_only_to_its_own_assets(tmp_path: Path) -> None:
    with keyed(tmp_path) as client:
        page = client.get("/playground").text
        refs = set(re.findall(r'(?:src|href)="([^"]+)"', page))
        # "data:," is an empty icon, so the browser asks for no /favicon.ico either.
        assert refs == {"/playground/playground.js", "/playground/playground.css", "data:,"}
        for path in PLAYGROUND_PATHS:  # no CDN, no web fonts, no other origin
            assert "http://" not in client.get(path).text.replace("http://www.w3.org", "")
            assert "https://" not in client.get(path).text
