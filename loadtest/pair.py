"""The bundled fusion pair of `configs/default.yaml`, SmolLM2 then Gemma, as the fusion
benchmarks load it: in-process transformers engines, started."""

from __future__ import annotations

from loadtest import ROOT
from serving.config import TransformersExpertConfig, load_config
from serving.engines.transformers.engine import TransformersEngine

PAIR = ("smollm2-135m-instruct", "gemma3-270m")  # the primary first, the slower expert second


def pair_configs() -> dict[str, TransformersExpertConfig]:
    config = load_config(ROOT / "configs" / "default.yaml", check_artifacts=False)
    configs = {}
    for name in PAIR:
        expert = config.experts[name]
        assert isinstance(expert, TransformersExpertConfig)
        configs[name] = expert
    return configs


async def start_pair() -> list[TransformersEngine]:
    engines = [TransformersEngine(name, expert) for name, expert in pair_configs().items()]
    for engine in engines:
        await engine.start()
    return engines
