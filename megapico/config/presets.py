"""The four pico-decoder sizes (pico-lm model cards). Only width changes; depth, heads and vocab are shared."""

from megapico.config.schema import ModelConfig

MODEL_PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(d_model=96, activation_hidden_dim=384),
    "small": ModelConfig(d_model=384, activation_hidden_dim=1536),
    "medium": ModelConfig(d_model=768, activation_hidden_dim=3072),
    "large": ModelConfig(d_model=1536, activation_hidden_dim=6144),
}
