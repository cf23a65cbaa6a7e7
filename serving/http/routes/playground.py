"""`GET /playground`: a page that streams one prompt to several models side by side.

The page and its two assets are static files shipped inside the package (`serving/http/static`,
no build step, nothing fetched from elsewhere). They hold no data, so the guard lets them through
without a key (`PLAYGROUND_PATHS`); the API calls the page makes carry the key its user types in.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import Response

router = APIRouter()

# URL path -> (file under serving/http/static, content type)
_ASSETS = {
    "/playground": ("playground.html", "text/html; charset=utf-8"),
    "/playground/playground.js": ("playground.js", "text/javascript; charset=utf-8"),
    "/playground/playground.css": ("playground.css", "text/css; charset=utf-8"),
}
PLAYGROUND_PATHS = frozenset(_ASSETS)

# The page talks to this server only: no scripts, styles, fonts or calls from anywhere else.
_POLICY = "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'"


@cache
def _read(name: str) -> bytes:
    return (files("serving.http") / "static" / name).read_bytes()


def _asset(path: str) -> Response:
    name, media_type = _ASSETS[path]
    headers = {"cache-control": "no-cache", "content-security-policy": _POLICY}
    return Response(_read(name), media_type=media_type, headers=headers)


@router.get("/playground", include_in_schema=False)
async def page() -> Response:
    return _asset("/playground")


@router.get("/playground/playground.js", include_in_schema=False)
async def script() -> Response:
    return _asset("/playground/playground.js")


@router.get("/playground/playground.css", include_in_schema=False)
async def style() -> Response:
    return _asset("/playground/playground.css")
