"""One config schema (omegaconf structured dataclasses) for every entry point."""

from megapico.config.load import (
    ConfigError,
    config_to_yaml,
    load_config,
    save_config,
    validate_config,
    validate_model,
)
from megapico.config.presets import MODEL_PRESETS
from megapico.config.schema import (
    ActivationCheckpointingConfig,
    CheckpointingConfig,
    DataConfig,
    EvaluationConfig,
    HfCheckpointConfig,
    LearningDynamicsConfig,
    LoggingConfig,
    MegapicoConfig,
    ModelConfig,
    ParallelConfig,
    TrainingConfig,
)

__all__ = [
    "ActivationCheckpointingConfig", "CheckpointingConfig", "ConfigError", "DataConfig", "EvaluationConfig",
    "HfCheckpointConfig", "LearningDynamicsConfig", "LoggingConfig", "MODEL_PRESETS", "MegapicoConfig", "ModelConfig",
    "ParallelConfig", "TrainingConfig", "config_to_yaml", "load_config", "save_config", "validate_config",
    "validate_model",
]
