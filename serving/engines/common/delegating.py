"""A wrapper around an engine that adds behaviour to some calls and passes the rest through:
the base of the per-expert timeouts (`supervised.py`) and of a traced request's engines
(`serving.gateway.traced_engines`), so a property an engine gains passes through both."""

from __future__ import annotations

from ensemble.engine import Engine, SessionEngine
from ensemble.toolcalls import ToolCallReader, tool_reader
from ensemble.types import GenerationRequest


class DelegatingEngine:
    """`engine`'s name, readiness, window, honoured fields, tool-call reader, prompt counts and
    lifecycle, as they are."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.name = engine.name

    @property
    def ready(self) -> bool:
        return self.engine.ready

    @property
    def context_window(self) -> int:
        return self.engine.context_window

    @property
    def honours(self) -> frozenset[str]:
        """The structured fields the engine honours (`serving.gateway.capabilities`)."""
        value: frozenset[str] = getattr(self.engine, "honours", frozenset())
        return value

    def tool_reader(self, request: GenerationRequest) -> ToolCallReader:
        """How the engine reads tool calls (`ensemble.toolcalls`)."""
        return tool_reader(self.engine, request)

    async def count_prompt_tokens(self, request: GenerationRequest) -> int | None:
        """The engine's count of a prompt's tokens before answering (`ensemble.budget`); None
        where it has no way to count."""
        count = getattr(self.engine, "count_prompt_tokens", None)
        if count is None:
            return None
        tokens: int | None = await count(request)
        return tokens

    async def start(self) -> None:
        await self.engine.start()

    async def aclose(self) -> None:
        await self.engine.aclose()


class DelegatingSessionEngine(DelegatingEngine):
    """The same for a `SessionEngine`: its vocabulary and default stop strings too."""

    engine: SessionEngine

    def __init__(self, engine: SessionEngine) -> None:
        super().__init__(engine)
        self.engine = engine

    @property
    def vocabulary(self) -> str:
        return self.engine.vocabulary

    @property
    def default_stop(self) -> tuple[str, ...]:
        return self.engine.default_stop
