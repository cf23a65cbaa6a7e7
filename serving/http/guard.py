"""The gate in front of every route: API keys and request body size, as ASGI middleware.

Middleware rather than per-route dependencies, so that no route, present or future, can be
reached without passing it. Keys are compared as SHA-256 digests in constant time and never
logged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.api.errors import error_body
from serving.config import ServerConfig
from serving.http.routes.playground import PLAYGROUND_PATHS

# The playground's page and assets are static and hold no data; the calls it makes need the key.
OPEN_PATHS = frozenset({"/health"}) | PLAYGROUND_PATHS


def key_digests(config: ServerConfig) -> frozenset[str]:
    """Every accepted key as a SHA-256 hex digest: the config's, and those in its variable."""
    digests = set(config.auth.api_key_hashes)
    env = config.auth.api_keys_env
    for key in (os.environ.get(env, "") if env else "").split(","):
        if key.strip():
            digests.add(hashlib.sha256(key.strip().encode()).hexdigest())
    return frozenset(digests)


def _bearer(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _accepted(token: str | None, digests: frozenset[str]) -> bool:
    if token is None:
        return False
    digest = hashlib.sha256(token.encode()).hexdigest()
    # Compare against every digest (no short circuit), so timing does not tell which matched.
    matches = [hmac.compare_digest(digest, d) for d in digests]
    return any(matches)


async def _error(send: Send, status: int, message: str, code: str, **headers: str) -> None:
    raw = json.dumps(error_body(message, "invalid_request_error", code=code)).encode()
    extra = [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(raw)).encode()),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": raw})


class Guard:
    def __init__(self, app: ASGIApp, config: ServerConfig) -> None:
        self.app = app
        self.max_body = config.max_body_bytes
        self.digests = key_digests(config)
        self.open_paths = OPEN_PATHS | (set() if config.auth.protect_metrics else {"/metrics"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        guarded = self.digests and scope["path"] not in self.open_paths
        if guarded and not _accepted(_bearer(scope["headers"]), self.digests):
            await _error(
                send, 401, "Incorrect or missing API key.", "invalid_api_key",
                www_authenticate="Bearer",
            )  # fmt: skip
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_body:
                await _error(send, 413, self._too_large(), "request_too_large")
                return
            await self.app(scope, receive, send)
            return
        # No declared length (chunked): read it here, up to the limit, then hand it on whole.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message]), send)  # a disconnect: pass it on
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body:
                await _error(send, 413, self._too_large(), "request_too_large")
                return
        body: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], then=receive), send)

    def _too_large(self) -> str:
        return f"The request body is larger than {self.max_body} bytes."


def _replay(messages: list[Message], then: Receive | None = None) -> Receive:
    """A `receive` that gives back what was already read, then defers to the real one."""
    queue = list(messages)

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        if then is None:
            return {"type": "http.disconnect"}
        return await then()

    return receive
