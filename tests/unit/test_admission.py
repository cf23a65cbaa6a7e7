"""Concurrency limit with a bounded queue, and per-key rate limits."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from serving.api.errors import OverloadedError, RateLimitError, ServiceUnavailableError
from serving.config import load_config
from serving.http.admission import ConcurrencyLimit, RateLimit
from serving.http.app import create_app
from tests.fakes import ScriptedSamples


def test_a_waiter_cancelled_as_its_slot_arrives_stays_cancelled_and_passes_it_on() -> None:
    async def scenario() -> int:
        limit = ConcurrencyLimit(limit=1, queue=2, timeout_s=5)
        await limit.acquire()
        waiter = asyncio.create_task(limit.acquire())
        await asyncio.sleep(0)
        limit.release()  # the slot goes to the waiter...
        waiter.cancel()  # ...as its client leaves, in the same turn of the loop
        with pytest.raises(asyncio.CancelledError):
            await waiter
        return limit.active

    assert asyncio.run(scenario()) == 0


def test_waiters_get_slots_in_order_and_a_full_queue_is_refused() -> None:
    async def scenario() -> list[str]:
        limit = ConcurrencyLimit(limit=1, queue=2, timeout_s=5)
        order: list[str] = []
        await limit.acquire()  # the one slot

        async def wait(name: str) -> None:
            await limit.acquire()
            order.append(name)

        first = asyncio.create_task(wait("first"))
        second = asyncio.create_task(wait("second"))
        await asyncio.sleep(0)
        with pytest.raises(OverloadedError) as info:
            await limit.acquire()  # queue of 2 is full
        assert info.value.headers["Retry-After"] == "1"
        limit.release()
        await first
        limit.release()
        await second
        limit.release()
        assert limit.active == 0 and limit.waiting == 0
        return order

    assert asyncio.run(scenario()) == ["first", "second"]


def test_a_wait_that_runs_out_is_a_503_and_frees_its_place() -> None:
    async def scenario() -> None:
        limit = ConcurrencyLimit(limit=1, queue=1, timeout_s=0.05)
        await limit.acquire()
        with pytest.raises(ServiceUnavailableError):
            await limit.acquire()
        assert limit.waiting == 0
        limit.release()
        await limit.acquire()  # the slot is usable again

    asyncio.run(scenario())


def test_a_cancelled_waiter_leaves_the_queue() -> None:
    async def scenario() -> None:
        limit = ConcurrencyLimit(limit=1, queue=1, timeout_s=5)
        await limit.acquire()
        waiter = asyncio.create_task(limit.acquire())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert limit.waiting == 0
        limit.release()
        assert limit.active == 0

    asyncio.run(scenario())


def test_rate_limit_is_a_sliding_minute_per_key() -> None:
    rate = RateLimit(per_minute=2)
    rate.check("a", now=0)
    rate.check("a", now=10)
    rate.check("b", now=10)  # another key has its own budget
    with pytest.raises(RateLimitError) as info:
        rate.check("a", now=20)
    assert info.value.headers["Retry-After"] == "40"
    rate.check("a", now=61)  # the first request left the window


def app(tmp_path: Path, server: str, delay_s: float = 0.0) -> TestClient:
    path = tmp_path / "c.yaml"
    path.write_text(
        f"server: {server}\nexperts:\n  slow: {{model: bundled:smollm2-135m-instruct}}\n"
    )
    engines = {"slow": ScriptedSamples("slow", [("ok", -0.1)], delay_s=delay_s)}
    return TestClient(create_app(load_config(path), engines=engines))


BODY = {"model": "slow", "messages": [{"role": "user", "content": "hi"}]}


def ready(client: TestClient) -> None:
    for _ in range(500):
        if client.get("/health").status_code == 200:
            return
        threading.Event().wait(0.01)


def test_server_answers_429_with_retry_after_past_the_rate(tmp_path: Path) -> None:
    with app(tmp_path, "{rate_limit_per_minute: 2}") as client:
        ready(client)
        headers = {"Authorization": "Bearer k1"}
        assert client.post("/v1/chat/completions", json=BODY, headers=headers).status_code == 200
        assert client.post("/v1/chat/completions", json=BODY, headers=headers).status_code == 200
        limited = client.post("/v1/chat/completions", json=BODY, headers=headers)
        assert limited.status_code == 429
        assert limited.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(limited.headers["retry-after"]) >= 1
        other = {"Authorization": "Bearer k2"}
        assert client.post("/v1/chat/completions", json=BODY, headers=other).status_code == 200


def test_server_queues_then_refuses_when_saturated(tmp_path: Path) -> None:
    config = "{max_concurrent_requests: 1, max_queue: 1, queue_timeout_s: 5}"
    with app(tmp_path, config, delay_s=0.4) as client, ThreadPoolExecutor(3) as pool:
        ready(client)
        calls = [pool.submit(client.post, "/v1/chat/completions", json=BODY) for _ in range(3)]
        statuses = sorted(c.result(timeout=30).status_code for c in calls)
        assert statuses == [200, 200, 429]  # one served, one queued then served, one refused
        metrics = client.get("/metrics").text
        assert "chorus_inflight_requests 0.0" in metrics


def test_the_request_deadline_is_a_504_or_an_sse_error(tmp_path: Path) -> None:
    with app(tmp_path, "{request_timeout_s: 0.3}", delay_s=0.2) as client:
        ready(client)
        slow = {**BODY, "n": 4}  # four samples, 0.2 s apart: past the deadline
        response = client.post("/v1/chat/completions", json=slow)
        assert response.status_code == 504
        assert response.json()["error"]["type"] == "timeout"
        streamed = client.post("/v1/chat/completions", json={**slow, "stream": True})
        events = [e[6:] for e in streamed.text.split("\n\n") if e.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert '"type": "timeout"' in events[-2] or '"type":"timeout"' in events[-2]
