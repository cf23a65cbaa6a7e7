"""What engines and strategies raise. No HTTP here: `serving.api.errors.http_error` maps each
kind to the status and OpenAI error object a client sees.

EngineError
├── ExpertFailed          the expert could not answer; another expert may (fallback applies)
│   └── ExpertTimedOut    it went silent past its first-token or per-token timeout
├── RequestRejected       the request itself cannot be served by this expert (names `param`)
│   ├── PromptTooLong     the prompt (plus max_tokens) does not fit the context window
│   └── OverBudget        no call the request needs fits its `max_cost` (`ensemble.budget`)
└── ExpertUnavailable     the expert is not loaded or started
"""

from __future__ import annotations


class EngineError(Exception):
    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ExpertFailed(EngineError):
    """An expert could not produce its answer (it crashed, timed out, its server went away, or
    answered something that is not a valid response).

    Unlike a problem with the request itself, another expert may still answer: strategies catch
    this to fall back or continue with the experts left.
    """


class ExpertTimedOut(ExpertFailed):
    """The expert produced nothing for longer than its configured timeout."""


class RequestRejected(EngineError):
    """The request is invalid for this expert (a parameter it cannot honour): the client's
    problem, so no other expert is tried."""


class PromptTooLong(RequestRejected):
    """The prompt, with the tokens asked for, does not fit the expert's context window."""


class ExpertUnavailable(EngineError):
    """The expert is not loaded (yet) or was closed."""


class OverBudget(RequestRejected):
    """No call the request needs fits its `max_cost`: refused before any model call."""
