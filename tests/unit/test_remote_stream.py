"""The `openai` engine reads each upstream stream to its end, so its connection is reused."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx

from ensemble.types import ChatMessage, GenerationRequest, SamplingParams
from serving.config import OpenAIExpertConfig
from serving.engines.remote import RemoteOpenAIEngine


class Body(httpx.AsyncByteStream):
    """An SSE body that records whether the client read it to the end."""

    def __init__(self, events: list[bytes]) -> None:
        self.events = events
        self.finished = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for event in self.events:
            yield event
        self.finished = True


def test_stream_is_read_past_done_to_its_end() -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop"}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
    bodies: list[Body] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":  # the health probe
            return httpx.Response(200, json={"data": []})
        body = Body(
            [
                f"data: {json.dumps(chunk)}\n\n".encode(),
                f"data: {json.dumps(usage)}\n\n".encode(),
                b"data: [DONE]\n\n",
                b"",  # the end of the body arrives after [DONE]
            ]
        )
        bodies.append(body)
        return httpx.Response(200, stream=body, headers={"content-type": "text/event-stream"})

    config = OpenAIExpertConfig(engine="openai", base_url="http://upstream/v1", model="m")
    engine = RemoteOpenAIEngine("up", config, transport=httpx.MockTransport(handler))
    request = GenerationRequest("r", (ChatMessage("user", "hello"),), SamplingParams(max_tokens=4))

    async def run() -> list[str]:
        await engine.start()
        try:
            return [c.text async for c in engine.generate(request)]
        finally:
            await engine.aclose()

    assert "".join(asyncio.run(run())) == "Hi"
    assert len(bodies) == 1 and bodies[0].finished
