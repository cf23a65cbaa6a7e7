"""The `chorus_pieces` stream extension: which expert chose each piece of text.

The stepper's own account (held back and cut by stop strings like the text it describes), and
the wire format with scripted engines; the real models through the SDK are in
tests/integration/test_chorus_pieces_real.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from ensemble.stepwise import Stepper
from ensemble.types import (
    Candidate,
    ChatMessage,
    GenerationChunk,
    GenerationRequest,
    SamplingParams,
)
from serving.config import load_config
from serving.http.app import create_app
from tests.fakes import FakeEngine, ScriptedSessionEngine

STOP = "\nUser:"


def _steps(pieces: list[tuple[str, str]], max_tokens: int) -> list[GenerationChunk]:
    """Choose `pieces` (text, producer) one step each, then the end, through a real Stepper."""

    async def go() -> list[GenerationChunk]:
        engines = [ScriptedSessionEngine("a", ""), ScriptedSessionEngine("b", "")]
        request = GenerationRequest("r", (ChatMessage("user", "hi"),), SamplingParams(stop=(STOP,)))
        stepper = await Stepper.open(engines, request, max_tokens)
        out = []
        choices = [Candidate(text, 0.0) for text, _ in pieces] + [Candidate("", 0.0, end=True)]
        producers = [p for _, p in pieces] + ["a"]
        for chosen, producer in zip(choices, producers, strict=True):
            weights = {"a": float(producer == "a"), "b": float(producer == "b")}
            chunk = stepper.choose(
                chosen, [None, None], producer=producer, weights=weights, gated=False, started=0
            )
            if chunk is not None:
                out.append(chunk)
            if stepper.finished:
                break
        await stepper.aclose()
        return out

    return asyncio.run(go())


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["\n", "U", "ser", ":", "Hi", " there", "s"]), st.sampled_from("ab")
        ),
        max_size=12,
    ),
    st.integers(1, 14),
)
def test_pieces_join_to_each_chunks_text_and_name_who_chose_each_character(
    pieces: list[tuple[str, str]], max_tokens: int
) -> None:
    chunks = _steps(pieces, max_tokens)
    # Who chose each character of the whole chosen text, in order.
    owners = "".join(producer * len(text) for text, producer in pieces)
    streamed = ""
    for chunk in chunks:
        assert "".join(p.text for p in chunk.pieces) == chunk.text
        for piece in chunk.pieces:
            start = len(streamed)
            assert set(owners[start : start + len(piece.text)]) <= {piece.expert}
            assert piece.weights[piece.expert] == 1.0
            streamed += piece.text
    chosen = "".join(text for text, _ in pieces)
    assert chosen.startswith(streamed) and STOP not in streamed


def test_a_piece_a_stop_string_held_back_is_cut_where_the_text_is() -> None:
    chunks = _steps([("Hi", "a"), ("\nUs", "b"), ("ed", "a"), ("\nUser:", "b")], 10)
    assert [(p.text, p.expert) for c in chunks for p in c.pieces] == [
        ("Hi", "a"),
        ("\nUs", "b"),  # held while it might start the stop string, released with "ed"
        ("ed", "a"),
    ]


# -- the wire ----------------------------------------------------------------------------------

CONFIG = """
experts:
  good: {model: bundled:smollm2-135m-instruct}
  pair-a: {model: bundled:smollm2-135m-instruct}
  pair-b: {model: bundled:smollm2-135m-instruct}
pools:
  fuse: {experts: [pair-a, pair-b], strategy: {type: fuse, gate: 0.95}}
"""
BODY = {"messages": [{"role": "user", "content": "hi"}]}


def client(tmp_path: Path) -> TestClient:
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG)
    engines = {
        "good": FakeEngine("good", ["Hello", " there"]),
        "pair-a": ScriptedSessionEngine("pair-a", "hello"),
        "pair-b": ScriptedSessionEngine("pair-b", "help!"),
    }
    return TestClient(create_app(load_config(path), engines=engines))


def events(response_text: str) -> list[dict[str, object]]:
    data = [e[6:] for e in response_text.split("\n\n") if e.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def deltas(response_text: str) -> list[dict[str, object]]:
    return [
        c["choices"][0]["delta"]  # type: ignore[index]
        for c in events(response_text)
        if c["choices"]
    ]


def wait_ready(app: TestClient) -> None:
    for _ in range(500):
        if app.get("/health").status_code == 200:
            return
        asyncio.run(asyncio.sleep(0.01))
    raise TimeoutError


def test_off_by_default_the_chunks_keep_the_standard_shape(tmp_path: Path) -> None:
    with client(tmp_path) as app:
        wait_ready(app)
        for model in ("good", "fuse"):
            body = {"model": model, "stream": True, **BODY}
            streamed = app.post("/v1/chat/completions", json=body)
            assert all(set(d) <= {"role", "content"} for d in deltas(streamed.text)), model
            plain = app.post("/v1/chat/completions", json={"model": model, **BODY}).json()
            assert set(plain["choices"][0]["message"]) == {"role", "content"}


def test_on_every_piece_names_its_expert_for_fused_and_single_answers(tmp_path: Path) -> None:
    with client(tmp_path) as app:
        wait_ready(app)
        for model, experts in (("good", {"good"}), ("fuse", {"pair-a", "pair-b"})):
            body = {"model": model, "stream": True, "chorus_pieces": True, **BODY}
            streamed = deltas(app.post("/v1/chat/completions", json=body).text)
            content = "".join(str(d.get("content", "")) for d in streamed)
            pieces = [p for d in streamed for p in d.get("chorus_pieces", [])]  # type: ignore[attr-defined]
            assert content and "".join(p["text"] for p in pieces) == content
            assert {p["expert"] for p in pieces} <= experts
            assert all(sum(p["weights"].values()) > 0.99 for p in pieces)
            plain = app.post(
                "/v1/chat/completions", json={"model": model, "chorus_pieces": True, **BODY}
            ).json()
            message = plain["choices"][0]["message"]
            assert "".join(p["text"] for p in message["chorus_pieces"]) == message["content"]
