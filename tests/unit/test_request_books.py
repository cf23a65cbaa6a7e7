"""Every chat request's books on a real server on loopback: counted once with its final status,
its deadline from arrival, its work stopped when the client leaves, its slot always given back.

The engines are scripted (this is the gateway's own logic, not a model's); the server, the
HTTP client and the Prometheus text parser are the real ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ensemble.errors import ExpertFailed
from ensemble.types import GenerationChunk, GenerationRequest
from serving.config import load_config
from serving.http.app import create_app
from tests.loopback import metric, metric_samples, serve_in_thread

CONFIG = """
server:
  request_timeout_s: 1.5
  max_concurrent_requests: 4
  max_queue: 1
experts:
  steady: {model: bundled:smollm2-135m-instruct}
  silent: {model: bundled:smollm2-135m-instruct}
  stalls: {model: bundled:smollm2-135m-instruct}
  crashes: {model: bundled:smollm2-135m-instruct}
  breaks: {model: bundled:smollm2-135m-instruct}
pools:
  auto: {experts: [steady]}
  voted:
    experts: [steady]
    strategy: {type: vote, samples: 3, keepalive_s: 0.2}
"""


class Engine:
    """Words at `pace_s` each. `stall_at`: hang before that word (0: before any output, as a
    long queue or prefill would); `crash_at`: raise a defect there; `fail_at`: an expert
    failure there. Counts generations running now and those cancelled."""

    def __init__(
        self,
        name: str,
        *,
        words: int = 6,
        pace_s: float = 0.01,
        stall_at: int | None = None,
        crash_at: int | None = None,
        fail_at: int | None = None,
    ) -> None:
        self.name = name
        self.words = words
        self.pace_s = pace_s
        self.stall_at = stall_at
        self.crash_at = crash_at
        self.fail_at = fail_at
        self.active = 0
        self.cancelled = 0

    ready = True
    context_window = 1024

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        self.active += 1
        try:
            for n in range(request.params.n):
                for i in range(self.words):
                    if i == self.stall_at:
                        await asyncio.sleep(3600)
                    if i == self.crash_at:
                        raise KeyError("a defect")
                    if i == self.fail_at:
                        raise ExpertFailed(f"expert {self.name} failed: scripted")
                    await asyncio.sleep(self.pace_s)
                    last = i == self.words - 1
                    yield GenerationChunk(
                        self.name, n, f" w{i}", 1, 5, finish_reason="stop" if last else None
                    )
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1


ENGINES = {
    "steady": {},
    "silent": {"stall_at": 0},
    "stalls": {"stall_at": 2},
    "crashes": {"crash_at": 2},
    "breaks": {"crash_at": 0},
}


class Server:
    def __init__(self, tmp_path: Path, stack: contextlib.ExitStack) -> None:
        path = tmp_path / "c.yaml"
        path.write_text(CONFIG)
        self.engines = {name: Engine(name, **kw) for name, kw in ENGINES.items()}  # type: ignore[arg-type]
        self.app = create_app(load_config(path), engines=self.engines)  # type: ignore[arg-type]
        self.url = stack.enter_context(serve_in_thread(self.app))
        self.port = int(self.url.rpartition(":")[2])
        deadline = time.monotonic() + 10
        while httpx.get(f"{self.url}/health", timeout=1).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError("the experts did not load")
            time.sleep(0.02)

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        return metric_samples(self.url, name)

    def value(self, name: str, **labels: str) -> float:
        return metric(self.url, name, **labels)

    def statuses(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for labels, value in self.samples("chorus_requests_total"):
            out[labels["status"]] = out.get(labels["status"], 0) + value
        return out

    def settled(self) -> None:
        """Wait until nothing is in flight and no engine works; fail if that never happens."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            idle = not any(e.active for e in self.engines.values())
            if idle and self.value("chorus_inflight_requests") == 0:
                return
            time.sleep(0.05)
        working = {n: e.active for n, e in self.engines.items() if e.active}
        raise AssertionError(f"still in flight after the clients left: {working}")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with contextlib.ExitStack() as stack:
        yield Server(tmp_path, stack)


def body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def post(srv: Server, model: str, timeout: float = 10, **extra: Any) -> httpx.Response:
    return httpx.post(f"{srv.url}/v1/chat/completions", json=body(model, **extra), timeout=timeout)


def events(response: httpx.Response) -> list[str]:
    return [line[6:] for line in response.text.split("\n\n") if line.startswith("data: ")]


def test_answers_and_client_errors_are_counted_once_each(server: Server) -> None:
    assert post(server, "auto").status_code == 200
    assert post(server, "auto", stream=True).status_code == 200
    assert post(server, "voted", stream=True).status_code == 200
    assert post(server, "nope").status_code == 404
    assert post(server, "voted", n=2).status_code == 400
    server.settled()
    assert server.statuses() == {"200": 3, "404": 1, "400": 1}
    durations = server.value("chorus_request_duration_seconds_count")
    assert durations == 5
    # The vote pool's experts are counted too, once its answer is decided.
    assert server.value("chorus_expert_selected_total", pool="voted", expert="steady") == 1
    assert server.value("chorus_expert_selected_total", pool="auto", expert="steady") == 2
    assert server.value("chorus_tokens_total", expert="steady", kind="prompt") == 15


@pytest.mark.parametrize("stream", [False, True])
def test_the_deadline_bounds_the_wait_for_the_first_chunk(server: Server, stream: bool) -> None:
    started = time.monotonic()
    response = post(server, "silent", timeout=10, stream=stream)
    elapsed = time.monotonic() - started
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "request_timeout"
    assert 1.4 < elapsed < 3
    server.settled()
    assert server.engines["silent"].cancelled == 1
    assert server.statuses() == {"504": 1}
    assert server.value("chorus_request_duration_seconds_count") == 1


@pytest.mark.parametrize("stream", [False, True])
def test_the_deadline_runs_from_arrival_mid_answer(server: Server, stream: bool) -> None:
    started = time.monotonic()
    response = post(server, "stalls", stream=stream)
    assert time.monotonic() - started < 3
    if stream:
        assert response.status_code == 200
        sent = events(response)
        assert sent[-1] == "[DONE]"
        assert json.loads(sent[-2])["error"]["code"] == "request_timeout"
    else:
        assert response.status_code == 504
    server.settled()
    assert server.statuses() == {"504": 1}
    assert server.value("chorus_tokens_total", expert="stalls", kind="prompt") == 5
    assert server.value("chorus_tokens_total", expert="stalls", kind="completion") == 2


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_before_the_first_chunk_stops_the_work(
    server: Server, stream: bool
) -> None:
    with pytest.raises(httpx.ReadTimeout):
        post(server, "silent", timeout=0.5, stream=stream)
    server.settled()
    assert server.engines["silent"].cancelled == 1
    assert server.statuses() == {"499": 1}
    assert server.value("chorus_request_duration_seconds_count") == 1


def test_a_client_that_leaves_mid_stream_is_499_with_its_tokens(server: Server) -> None:
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=body("stalls", stream=True), timeout=10
    ) as response:
        for line in response.iter_lines():
            if '"content":" w1"' in line:
                break  # leave
    server.settled()
    assert server.engines["stalls"].cancelled == 1
    assert server.statuses() == {"499": 1}
    assert server.value("chorus_tokens_total", expert="stalls", kind="prompt") == 5


def test_a_defect_mid_stream_is_an_internal_error_event_and_a_500(server: Server) -> None:
    response = post(server, "crashes", stream=True)
    assert response.status_code == 200
    sent = events(response)
    assert sent[-1] == "[DONE]"
    error = json.loads(sent[-2])["error"]
    assert error["type"] == "internal_error" and "defect" not in error["message"]
    text = "".join(
        json.loads(e)["choices"][0]["delta"].get("content", "")
        for e in sent[:-2]
        if json.loads(e).get("choices")
    )
    assert text == " w0 w1"
    server.settled()
    assert server.statuses() == {"500": 1}


@pytest.mark.parametrize("stream", [False, True])
def test_a_defect_before_the_first_chunk_is_a_500(server: Server, stream: bool) -> None:
    response = post(server, "breaks", stream=stream)
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "internal_error"
    server.settled()
    assert server.statuses() == {"500": 1}


def test_queued_requests_keep_their_deadline_and_a_full_queue_is_429(server: Server) -> None:
    async def crowd() -> list[int]:
        async with httpx.AsyncClient(timeout=10) as client:
            url = f"{server.url}/v1/chat/completions"
            busy = [asyncio.create_task(client.post(url, json=body("silent"))) for _ in range(5)]
            await asyncio.sleep(0.5)  # four hold the slots, one waits in the queue
            refused = await client.post(url, json=body("auto"))
            return [refused.status_code] + [r.status_code for r in await asyncio.gather(*busy)]

    assert asyncio.run(crowd()) == [429, 504, 504, 504, 504, 504]
    server.settled()
    assert server.statuses() == {"429": 1, "504": 5}
    # The queued one reaches the engine only if a slot frees before its own deadline.
    assert server.engines["silent"].cancelled in (4, 5)


def test_the_slot_is_released_when_the_body_is_never_read(server: Server) -> None:
    """The connection breaks as the response starts: the server never iterates the body."""

    async def call() -> None:
        payload = json.dumps(body("stalls", stream=True)).encode()
        messages = [{"type": "http.request", "body": payload, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                raise OSError("connection reset by peer")

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json")],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", server.port),
        }
        with pytest.raises(OSError):
            await server.app(scope, receive, send)

    asyncio.run(call())
    server.settled()
    assert server.engines["stalls"].active == 0
    assert server.statuses() == {"499": 1}
    assert server.app.state.chorus.runtime.gateway.inflight == 0
