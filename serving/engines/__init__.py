"""Engines run expert models. Heavy imports stay inside `build_engine`."""

from __future__ import annotations

from ensemble.engine import Engine
from serving.config import ExpertConfig


def build_engine(name: str, config: ExpertConfig) -> Engine:
    if config.engine == "transformers":
        from serving.engines.transformers.engine import TransformersEngine

        return TransformersEngine(name, config)
    if config.engine == "vllm":
        from serving.engines.vllm.engine import VllmEngine  # imports vLLM only when it starts

        return VllmEngine(name, config)
    from serving.engines.openai.engine import RemoteOpenAIEngine

    return RemoteOpenAIEngine(name, config)
