"""Request spans with scripted engines: the tree of a request that fell back, a stream, sampling,
and tracing off (no span, no SDK loaded). The tree of a real `fuse` request is in
tests/integration/test_tracing_real.py."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import StatusCode

from serving.config import load_config
from serving.gateway.tracing import Tracing
from serving.http.app import create_app
from tests.fakes import FakeEngine

CONFIG = """
experts:
  good: {model: bundled:smollm2-135m-instruct}
  early: {model: bundled:smollm2-135m-instruct}
pools:
  fallback: {experts: [early, good]}
"""
BODY = {"model": "fallback", "messages": [{"role": "user", "content": "hi"}]}


def client_with(tmp_path: Path, provider: TracerProvider) -> TestClient:
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG)
    engines = {
        "good": FakeEngine("good", ["Hello", " there"]),
        "early": FakeEngine("early", ["never"], fail_after=0),
    }
    return TestClient(create_app(load_config(path), engines=engines, tracing=Tracing(provider)))


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def client(tmp_path: Path, exporter: InMemorySpanExporter) -> Iterator[TestClient]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with client_with(tmp_path, provider) as c:
        yield c


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        out.setdefault(span.name, []).append(span)
    return out


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


@pytest.mark.parametrize("stream", [False, True])
def test_a_fallback_is_a_tree_of_request_route_strategy_and_expert_calls(
    client: TestClient, exporter: InMemorySpanExporter, stream: bool
) -> None:
    reply = client.post("/v1/chat/completions", json={**BODY, "stream": stream})
    assert reply.status_code == 200
    spans = by_name(exporter.get_finished_spans())
    assert sorted(spans) == [
        "chorus.expert.generate",
        "chorus.request",
        "chorus.route",
        "chorus.strategy",
    ]
    (root,) = spans["chorus.request"]
    (route,) = spans["chorus.route"]
    (strategy,) = spans["chorus.strategy"]
    assert root.parent is None
    assert parent_of(route) == parent_of(strategy) == root.context.span_id
    assert {s.context.trace_id for g in spans.values() for s in g} == {root.context.trace_id}

    assert root.attributes is not None
    assert root.attributes["chorus.pool"] == "fallback"
    assert root.attributes["chorus.strategy"] == "single"
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["chorus.experts"] == ("good",)
    assert root.attributes["gen_ai.usage.output_tokens"] == 2
    assert route.attributes is not None
    assert route.attributes["chorus.experts"] == ("early", "good")
    assert strategy.attributes is not None
    assert strategy.attributes["chorus.failed"] == ("early",)

    calls = {s.attributes["chorus.expert"]: s for s in spans["chorus.expert.generate"]}  # type: ignore[index]
    assert set(calls) == {"early", "good"}
    assert all(parent_of(s) == strategy.context.span_id for s in calls.values())
    assert calls["early"].status.status_code is StatusCode.ERROR
    assert calls["good"].status.status_code is StatusCode.UNSET
    assert calls["good"].attributes is not None
    assert calls["good"].attributes["gen_ai.usage.output_tokens"] == 2


def test_a_refused_request_is_one_span_with_its_status(
    client: TestClient, exporter: InMemorySpanExporter
) -> None:
    reply = client.post("/v1/chat/completions", json={**BODY, "model": "nowhere"})
    assert reply.status_code == 404
    (root,) = exporter.get_finished_spans()
    assert root.name == "chorus.request"
    assert root.attributes is not None
    assert root.attributes["http.response.status_code"] == 404


def test_unsampled_requests_make_no_spans(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with client_with(tmp_path, provider) as client:
        assert client.post("/v1/chat/completions", json=BODY).status_code == 200
    assert exporter.get_finished_spans() == ()


def test_tracing_off_loads_no_sdk_and_makes_no_spans() -> None:
    # Without a `tracing` section the hot path sees `None`, and the SDK is never imported.
    code = (
        "import sys;"
        "from serving.http.app import create_app;"
        "from serving.gateway.tracing import Tracing;"
        "t = Tracing.from_config(None);"
        "assert t.request() is None;"
        "bad = [m for m in sys.modules if m.startswith('opentelemetry.sdk')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
