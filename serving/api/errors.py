"""Errors the gateway raises, each rendered as an OpenAI-shaped error with a matching status.

GatewayError                   500 internal_error
├── InternalError              500 internal_error (a defect; logged, never detailed)
├── InvalidRequestError        400 invalid_request_error
│   └── ContextLengthError     400 invalid_request_error, code context_length_exceeded
├── ModelNotFoundError         404 model_not_found
├── RateLimitError             429 rate_limit_exceeded (per key, with Retry-After)
├── OverloadedError            429 too_many_requests (the wait queue is full, with Retry-After)
├── ServiceUnavailableError    503 service_unavailable (loading, overloaded, shutting down)
├── DeadlineExceededError      504 timeout (the request ran past `request_timeout_s`)
└── ExpertError                502 expert_error (an engine failed)
    └── ExpertTimeoutError     504 timeout, code expert_timeout

Engines and strategies raise `ensemble.errors.EngineError`s; `http_error` maps them here, at
the one seam where a request's stream is read (`serving.gateway.service`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from ensemble import errors as engine


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The OpenAI error object: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class GatewayError(Exception):
    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "internal_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)


class InternalError(GatewayError):
    """A defect in the gateway: no detail reaches the client (it is logged)."""


class InvalidRequestError(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    default_code = "context_length_exceeded"


class ModelNotFoundError(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "model_not_found"


class RateLimitError(GatewayError):
    status_code = 429
    error_type = "rate_limit_exceeded"
    default_code = "rate_limit_exceeded"


class OverloadedError(GatewayError):
    status_code = 429
    error_type = "too_many_requests"
    default_code = "too_many_requests"


class ServiceUnavailableError(GatewayError):
    status_code = 503
    error_type = "service_unavailable"


class DeadlineExceededError(GatewayError):
    status_code = 504
    error_type = "timeout"
    default_code = "request_timeout"


class ExpertError(GatewayError):
    status_code = 502
    error_type = "expert_error"


class ExpertTimeoutError(ExpertError):
    status_code = 504
    error_type = "timeout"
    default_code = "expert_timeout"


def http_error(exc: engine.EngineError) -> GatewayError:
    """The HTTP error a client sees for an engine's error."""
    if isinstance(exc, engine.ExpertTimedOut):
        return ExpertTimeoutError(exc.message)
    if isinstance(exc, engine.ExpertFailed):
        return ExpertError(exc.message)
    if isinstance(exc, engine.PromptTooLong):
        return ContextLengthError(exc.message, param=exc.param or "messages")
    if isinstance(exc, engine.RequestRejected):
        return InvalidRequestError(exc.message, param=exc.param)
    if isinstance(exc, engine.ExpertUnavailable):
        return ServiceUnavailableError(exc.message)
    return ExpertError(exc.message)
