"""The `chorus_pieces` stream extension through the official `openai` SDK (`extra_body`), against
the real server on loopback with the real bundled models."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.conftest import ServerProcess

pytestmark = pytest.mark.integration

# Greedy, the routed pair (SmolLM2 and Gemma) both choose pieces of this answer.
SKY = [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _read(
    client: openai.OpenAI, model: str, **extra: Any
) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """A streamed answer: its content, its pieces, every delta's extra fields, the last
    `chorus` object."""
    stream = client.chat.completions.create(
        model=model, messages=SKY, max_tokens=24, stream=True,
        stream_options={"include_usage": True}, **extra,
    )  # fmt: skip
    content, pieces, extras, chorus = "", [], [], {}
    for chunk in stream:
        chorus = (chunk.model_extra or {}).get("chorus", chorus)
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        extras.append(dict(delta.model_extra or {}))
        pieces += (delta.model_extra or {}).get("chorus_pieces", [])
    return content, pieces, extras, chorus


def test_off_by_default_the_chunks_have_the_standard_shape(client: openai.OpenAI) -> None:
    content, pieces, extras, _ = _read(client, "fuse")
    assert content and not pieces
    assert extras and all(extra == {} for extra in extras)  # no field the SDK does not know


def test_fused_pieces_name_experts_of_the_pool_and_join_to_the_content(
    client: openai.OpenAI,
) -> None:
    content, pieces, _, chorus = _read(client, "fuse", extra_body={"chorus_pieces": True})
    fused = set(chorus["fusion"]["share"])  # the two routed experts of the three
    assert len(fused) == 2
    assert pieces and "".join(p["text"] for p in pieces) == content
    assert {p["expert"] for p in pieces} == fused  # both experts chose some of this answer
    for piece in pieces:
        assert set(piece["weights"]) == fused
        assert sum(piece["weights"].values()) == pytest.approx(1, abs=1e-3)

    plain = client.chat.completions.create(
        model="fuse", messages=SKY, max_tokens=24, extra_body={"chorus_pieces": True}
    )
    message = plain.choices[0].message
    assert message.content == content  # greedy both times
    assert message.model_extra is not None
    assert message.model_extra["chorus_pieces"] == pieces


def test_a_routed_answer_names_the_expert_that_answered(client: openai.OpenAI) -> None:
    content, pieces, _, chorus = _read(client, "auto", extra_body={"chorus_pieces": True})
    assert "".join(p["text"] for p in pieces) == content
    assert {p["expert"] for p in pieces} == {chorus["experts"][0]}
    assert all(p["weights"] == {chorus["experts"][0]: 1.0} for p in pieces)
