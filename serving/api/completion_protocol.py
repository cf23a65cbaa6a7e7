"""The legacy completions API's request wire model (`POST /v1/completions`).

Like the chat request, it accepts unknown fields (as vLLM does); the completions fields Chorus
cannot honour are refused by `serving.api.completion_validation`.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serving.api.protocol import MaxCost, StreamOptions

# OpenAI's legacy API writes 16 tokens unless told otherwise.
DEFAULT_MAX_TOKENS = 16


class CompletionRequestBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    # Text only: token-id prompts are refused by the type (a 400 naming `prompt`).
    prompt: str | Annotated[list[str], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # None: DEFAULT_MAX_TOKENS
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1)] = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Annotated[int, Field(ge=0)] | None = None  # how many alternatives per token
    echo: bool = False
    user: str | None = None
    # Chorus's extensions (the `openai` SDK sends them with `extra_body`).
    quality_weight: Annotated[float, Field(ge=0, le=1)] | None = None
    max_cost: MaxCost | None = None

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequestBody:
        if self.stream_options is not None and not self.stream:
            raise ValueError("`stream_options` is only allowed with `stream: true`")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)
