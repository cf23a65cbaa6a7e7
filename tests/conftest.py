from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ensemble.types import ChatMessage, GenerationChunk, GenerationRequest, SamplingParams

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(prompt: str, **params: object) -> GenerationRequest:
    return GenerationRequest(
        "test",
        (ChatMessage("user", prompt),),
        SamplingParams(**params),  # type: ignore[arg-type]
    )


def collect(engine: object, req: GenerationRequest) -> list[GenerationChunk]:
    async def run() -> list[GenerationChunk]:
        return [c async for c in engine.generate(req)]  # type: ignore[attr-defined]

    return asyncio.run(run())


def texts(chunks: list[GenerationChunk]) -> dict[int, str]:
    out: dict[int, str] = {}
    for c in chunks:
        out[c.index] = out.get(c.index, "") + c.text
    return out


class ServerProcess:
    """`chorus serve` as a real process on loopback, as an operator would start it."""

    def __init__(self, config: Path, *, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(ROOT / ".pytest-server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "serving",
                "serve",
                "--config",
                str(config),
                "--port",
                str(self.port),
            ],
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def wait_ready(self, timeout_s: float = 180) -> list[int]:
        """Poll /health until 200; return every status seen on the way."""
        seen: list[int] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                status = httpx.get(f"{self.url}/health", timeout=2).status_code
                seen.append(status)
                if status == 200:
                    return seen
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError("server did not become healthy")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    srv = ServerProcess(DEFAULT_CONFIG)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()
