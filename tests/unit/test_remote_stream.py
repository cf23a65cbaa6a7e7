"""The `openai` engine reads each upstream stream to its end, so its connection is reused."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from ensemble.types import ChatMessage, GenerationRequest, SamplingParams
from serving.config import OpenAIExpertConfig
from serving.engines.remote import RemoteOpenAIEngine
from tests.upstream import serve


def test_stream_is_read_past_done_and_its_connection_reused() -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop"}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
    peers: set[object] = set()

    async def handler(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        peers.add(request.transport.get_extra_info("peername"))
        if request.method == "GET":  # the health probe
            return web.json_response({"data": []})
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for event in (chunk, usage):
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await asyncio.sleep(0.05)  # the end of the body arrives after [DONE]
        await response.write_eof()
        return response

    request = GenerationRequest("r", (ChatMessage("user", "hello"),), SamplingParams(max_tokens=4))

    async def run() -> list[str]:
        async with serve(handler) as url:
            config = OpenAIExpertConfig(engine="openai", base_url=f"{url}/v1", model="m")
            engine = RemoteOpenAIEngine("up", config)
            await engine.start()
            try:
                return ["".join([c.text async for c in engine.generate(request)]) for _ in range(3)]
            finally:
                await engine.aclose()

    assert asyncio.run(run()) == ["Hi"] * 3
    assert len(peers) == 1  # the probe and three streams over one connection
