"""The span tree of a real `fuse` request: the default config's bundled models, routed by its
fitted router, with the app built in-process so that an in-memory exporter sees its spans."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from serving.config import load_config
from serving.gateway.tracing import Tracing
from serving.http.app import create_app
from tests.conftest import DEFAULT_CONFIG

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def traced() -> Iterator[tuple[TestClient, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(load_config(DEFAULT_CONFIG), tracing=Tracing(provider))
    with TestClient(app) as client:
        deadline = time.monotonic() + 600
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the experts did not load"
            time.sleep(0.5)
        yield client, exporter


def tree(spans: tuple[ReadableSpan, ...]) -> str:
    """The spans as an indented tree, with their attributes (shown when the test fails)."""
    children: dict[int | None, list[ReadableSpan]] = {}
    for span in spans:
        children.setdefault(span.parent.span_id if span.parent else None, []).append(span)

    def lines(parent: int | None, depth: int) -> list[str]:
        out = []
        for span in sorted(children.get(parent, []), key=lambda s: s.start_time or 0):
            out.append(f"{'  ' * depth}{span.name} {dict(span.attributes or {})}")
            out += lines(span.context.span_id, depth + 1)
        return out

    return "\n".join(lines(None, 0))


def test_a_fuse_request_is_one_span_tree_with_a_span_per_expert_session(
    traced: tuple[TestClient, InMemorySpanExporter],
) -> None:
    client, exporter = traced
    exporter.clear()
    reply = client.post(
        "/v1/chat/completions",
        json={
            "model": "fuse",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 8,
            "temperature": 0,
        },
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    chorus = body["chorus"]
    spans = exporter.get_finished_spans()
    shown = tree(spans)
    print(shown)  # the tree, with -s

    roots = [s for s in spans if s.parent is None]
    assert [s.name for s in roots] == ["chorus.request"], shown
    root = roots[0]
    assert {s.context.trace_id for s in spans} == {root.context.trace_id}
    under_root = {s.name: s for s in spans if s.parent and s.parent.span_id == root.context.span_id}
    assert set(under_root) == {"chorus.route", "chorus.strategy"}, shown
    route, strategy = under_root["chorus.route"], under_root["chorus.strategy"]
    sessions = [s for s in spans if s.parent and s.parent.span_id == strategy.context.span_id]
    # One span per expert session, none per token: the steps are counted on the session spans.
    assert len(spans) == 3 + len(sessions), shown
    assert sorted(s.name for s in sessions) == ["chorus.expert.session"] * 2, shown

    attrs = dict(root.attributes or {})
    assert attrs["chorus.pool"] == "fuse"
    assert attrs["chorus.strategy"] == "fuse"
    assert attrs["http.response.status_code"] == 200
    assert list(attrs["chorus.experts"]) == chorus["experts"]
    assert attrs["chorus.cluster"] == chorus["cluster"]
    assert attrs["gen_ai.usage.input_tokens"] == body["usage"]["prompt_tokens"]
    assert attrs["gen_ai.usage.output_tokens"] == body["usage"]["completion_tokens"]

    route_attrs = dict(route.attributes or {})
    assert route_attrs["chorus.pool"] == "fuse"
    assert route_attrs["chorus.cluster"] == chorus["cluster"]
    assert list(route_attrs["chorus.experts"])[:2] == chorus["experts"]

    strategy_attrs = dict(strategy.attributes or {})
    assert strategy_attrs["chorus.strategy"] == "fuse"
    assert strategy_attrs["chorus.fusion.steps"] == chorus["fusion"]["steps"] > 0
    assert strategy_attrs["chorus.fusion.gate_skip_rate"] == chorus["fusion"]["gate_skip_rate"]

    by_expert = {
        dict(s.attributes or {})["chorus.expert"]: dict(s.attributes or {}) for s in sessions
    }
    assert sorted(by_expert) == sorted(chorus["experts"])
    for expert, session in by_expert.items():
        assert session["gen_ai.usage.input_tokens"] == chorus["usage"][expert]["prompt_tokens"]
    # The primary is asked every step; the other only on the steps the gate did not skip.
    steps, skipped = chorus["fusion"]["steps"], chorus["fusion"]["gate_skip_rate"]
    primary, other = chorus["experts"]
    assert by_expert[primary]["chorus.session.views"] == steps
    assert by_expert[other]["chorus.session.views"] == steps - round(skipped * steps)
