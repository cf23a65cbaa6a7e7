"""What several integration modules share: Chorus behind Chorus (a `relay` server whose one
expert is the session's real server, through the `openai` engine), and running an engine or a
strategy to the end in process."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from ensemble.cascade import CascadeStrategy
from ensemble.fuse import FusionStrategy
from ensemble.types import EnsembleTrace, GenerationRequest
from serving.config import load_config
from serving.engines.transformers.engine import TransformersEngine
from tests.conftest import DEFAULT_CONFIG, ServerProcess


def relay_config(tmp_path: Path, upstream_url: str, name: str = "relay.yaml") -> Path:
    path = tmp_path / name
    path.write_text(
        "experts:\n"
        "  remote-smollm2:\n"
        "    engine: openai\n"
        f"    base_url: {upstream_url}/v1\n"
        "    model: smollm2-135m-instruct\n"
        "    health_interval_s: 0.5\n"
        "    retries: 1\n"
        "    backoff_s: 0.05\n"
        "pools:\n"
        "  relay: {experts: [remote-smollm2]}\n"
    )
    return path


@pytest.fixture(scope="module")
def relay(
    server: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    downstream = ServerProcess(relay_config(tmp_path_factory.mktemp("relay"), server.url))
    try:
        downstream.wait_ready(60)
        yield downstream
    finally:
        downstream.stop()


@pytest.fixture(scope="module")
def fusion_pair() -> Iterator[list[TransformersEngine]]:
    """SmolLM2 and Gemma in process, for tests that fuse them without a server."""
    config = load_config(DEFAULT_CONFIG)
    engines = [
        TransformersEngine(name, config.experts[name])
        for name in ("smollm2-135m-instruct", "gemma3-270m")
    ]
    for engine in engines:
        asyncio.run(engine.start())
    yield engines
    for engine in engines:
        asyncio.run(engine.aclose())


def greedy(engine: TransformersEngine, req: GenerationRequest) -> str:
    async def go() -> str:
        return "".join([c.text async for c in engine.generate(req)])

    return asyncio.run(go())


def run(
    strategy: FusionStrategy | CascadeStrategy, req: GenerationRequest, engines: list
) -> tuple[str, EnsembleTrace]:
    trace = EnsembleTrace()

    async def go() -> str:
        return "".join([c.text async for c in strategy.run(req, engines, trace)])

    return asyncio.run(go()), trace
