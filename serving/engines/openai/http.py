"""The `openai` engine's HTTP side, shared by its streams (`engine`) and its decode sessions
(`session`): the pooled client, the retry policy, and what an answer that is an error, or not
what the API writes, becomes.

The client is aiohttp rather than httpx: it costs a fraction of httpx's CPU per request, which
with httpx was most of the gateway's CPU per request (the figures: loadtest/RESULTS.md, "the
`openai` engine's HTTP client: httpx against aiohttp").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp

from ensemble.errors import EngineError, ExpertFailed, RequestRejected
from serving.config import OpenAIExpertConfig

T = TypeVar("T")


class Retryable(Exception):
    """A 5xx answer: tried again, like a server that could not be reached."""


# Failures before any output: the server could not be reached, or answered 5xx. Retried.
RETRYABLE = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError, Retryable)


def open_client(config: OpenAIExpertConfig, headers: dict[str, str]) -> aiohttp.ClientSession:
    """One pooled client per expert. No pool limit: the gateway's own `max_concurrent_requests`
    bounds how many connections are open at once (a limit here would queue requests unseen)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=config.connect_timeout_s, sock_read=config.read_timeout_s
        ),
        headers=headers,
        read_bufsize=1 << 20,  # an SSE line with 20 top logprobs per token stays well inside
    )


class NotServed(ExpertFailed):
    """The server has no such endpoint (404, 405): e.g. `/tokenize` on a server that is not
    vLLM."""


def client_error(name: str, status: int, text: str) -> EngineError:
    """A 4xx answer as the error to raise: 400 is the client's request, as the expert judged it."""
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text[:500]
    if status == 400:
        return RequestRejected(message)
    if status in (404, 405):
        return NotServed(f"expert {name} refused the request (HTTP {status}): {message}")
    return ExpertFailed(f"expert {name} refused the request (HTTP {status}): {message}")


@contextlib.contextmanager
def reading(name: str, what: str) -> Iterator[None]:
    """Around the reading of an expert's answer: one that is not JSON, lacks a field or holds one
    of the wrong kind is the expert's failure (`ExpertFailed`, so another expert may answer),
    never a bare ValueError, KeyError or TypeError."""
    try:
        yield
    except (ValueError, LookupError, TypeError, AttributeError) as exc:
        raise ExpertFailed(f"expert {name} sent a malformed {what}: {_wrong(exc)}") from exc


def _wrong(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"no {exc.args[0]!r} field"
    if isinstance(exc, json.JSONDecodeError):
        return f"not JSON ({exc})"
    return str(exc) or type(exc).__name__


def field_object(value: Any, what: str) -> dict[str, Any]:
    """`value` as a JSON object (None, for an optional one left out: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"{what} is a JSON {type(value).__name__}, not an object")
    return value


def _as_is(answer: Any) -> Any:
    return answer


async def post_json(
    client: aiohttp.ClientSession,
    config: OpenAIExpertConfig,
    name: str,
    url: str,
    body: dict[str, Any],
    read: Callable[[Any], T] = _as_is,
) -> T:
    """POST with the engine's retry policy: connection errors and 5xx, with backoff. The JSON
    answer is passed through `read`, which takes out what the caller needs: an answer that is
    not JSON, or that `read` cannot take apart (a missing field, a wrong kind), raises
    `ExpertFailed`."""
    for attempt in range(config.retries + 1):
        try:
            async with client.post(url, json=body) as response:
                if response.status >= 500:
                    raise Retryable(f"HTTP {response.status}")
                raw = await response.read()
                if response.status >= 400:
                    raise client_error(name, response.status, raw.decode(errors="replace"))
                break
        except RETRYABLE as exc:
            if attempt == config.retries:
                raise ExpertFailed(f"expert {name} failed: {exc}") from exc
            await asyncio.sleep(config.backoff_s * 2**attempt)
        except aiohttp.ClientError as exc:  # cut off
            raise ExpertFailed(f"expert {name} failed: {exc!r}") from exc
    else:
        raise AssertionError("unreachable")
    with reading(name, f"answer to POST {urlsplit(url).path}"):
        return read(json.loads(raw))
