"""The configuration: its typed models (`schema`) and how a file becomes one (`loading`)."""

from serving.config.loading import ConfigError, key_path, load_config
from serving.config.schema import (
    CascadeStrategyConfig,
    Config,
    DlfStrategyConfig,
    ExpertConfig,
    FuseStrategyConfig,
    OpenAIExpertConfig,
    PoolConfig,
    SamplingDefaults,
    ServerConfig,
    SingleStrategyConfig,
    StrategyConfig,
    TracingConfig,
    TransformersExpertConfig,
    VllmExpertConfig,
    VoteStrategyConfig,
)

__all__ = [
    "CascadeStrategyConfig",
    "Config",
    "ConfigError",
    "DlfStrategyConfig",
    "ExpertConfig",
    "FuseStrategyConfig",
    "OpenAIExpertConfig",
    "PoolConfig",
    "SamplingDefaults",
    "ServerConfig",
    "SingleStrategyConfig",
    "StrategyConfig",
    "TracingConfig",
    "TransformersExpertConfig",
    "VllmExpertConfig",
    "VoteStrategyConfig",
    "key_path",
    "load_config",
]
