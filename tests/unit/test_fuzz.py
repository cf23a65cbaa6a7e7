"""Property-based fuzzing of /v1/chat/completions: whatever arrives, no 5xx and no hang."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.config import load_config
from serving.http.app import create_app
from tests.fakes import FakeEngine, ScriptedSamples

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
ROLES = st.sampled_from(["system", "developer", "user", "assistant", "tool", "wizard", ""])
CONTENT = (
    st.text(max_size=60)
    | st.none()
    | st.integers()
    | st.lists(
        st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "image_url"])},
            optional={"text": st.text(max_size=20)},
        ),
        max_size=3,
    )
)
MESSAGE = st.fixed_dictionaries(
    {"role": ROLES}, optional={"content": CONTENT, "name": st.text(max_size=5)}
)
FIELDS = {
    "max_tokens": st.integers(-5, 10**9) | JSON,
    "max_completion_tokens": st.integers(-5, 50),
    "temperature": st.floats(-1, 5, allow_nan=False) | JSON,
    "top_p": st.floats(-1, 2, allow_nan=False),
    "n": st.integers(-2, 20),
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=12) | JSON,
    "seed": st.integers() | JSON,
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}) | JSON,
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(-1, 30),
    "user": JSON,
    "tools": JSON,
}
BODY = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["good", "vote", "auto", "missing"]) | JSON,
        "messages": st.lists(MESSAGE, max_size=5) | JSON,
    },
    optional=FIELDS,
)

WORKER = ThreadPoolExecutor(max_workers=1)

CONFIG = """
server: {max_body_bytes: 65536}
experts:
  good: {model: bundled:smollm2-135m-instruct}
  other: {model: bundled:smollm2-135m-instruct}
pools:
  auto: {experts: [good, other]}
  vote: {experts: [good, other], strategy: {type: vote, samples: 3, keepalive_s: 0.01}}
"""


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(CONFIG)
    engines = {
        "good": FakeEngine("good", ["Hello", " there"]),
        "other": ScriptedSamples("other", [("4", -0.1), ("5", -0.3)]),
    }
    with TestClient(create_app(load_config(path), engines=engines)) as test_client:
        for _ in range(500):
            if test_client.get("/health").status_code == 200:
                break
            threading.Event().wait(0.01)
        yield test_client


def check(client: TestClient, content: bytes) -> None:
    call = WORKER.submit(
        client.post,
        "/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json"},
    )
    response = call.result(timeout=10)  # a hang fails the example instead of the whole run
    assert response.status_code < 500, (content[:200], response.text[:300])
    if response.status_code != 200:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]")
        assert '"error"' not in response.text


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=BODY)
def test_structured_bodies_never_5xx(client: TestClient, body: dict[str, object]) -> None:
    check(client, json.dumps(body).encode())


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=JSON.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=200))
def test_arbitrary_json_and_bytes_never_5xx(client: TestClient, raw: bytes) -> None:
    check(client, raw)


VALID_FIELDS = {
    "max_tokens": st.integers(1, 64),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "n": st.integers(1, 3),
    "stop": st.lists(st.text(min_size=1, max_size=3), max_size=3),
    "seed": st.integers(0, 2**31),
    "stream": st.booleans(),
    "logprobs": st.booleans(),
}
VALID_BODY = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["good", "other", "auto", "vote"]),
        "messages": st.lists(
            st.fixed_dictionaries(
                {
                    "role": st.sampled_from(["system", "user", "assistant"]),
                    "content": st.text(max_size=40),
                }
            ),
            min_size=1,
            max_size=4,
        ),
    },
    optional=VALID_FIELDS,
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=VALID_BODY)
def test_well_formed_bodies_are_served_or_refused_cleanly(
    client: TestClient, body: dict[str, object]
) -> None:
    check(client, json.dumps(body).encode())
