"""One config schema: YAML + dotted overrides, presets, and one clear error per bad input."""

import pytest
from omegaconf import OmegaConf

from megapico.config import MODEL_PRESETS, ConfigError, ModelConfig, load_config, save_config, validate_config


def test_presets_match_the_spec():
    sizes = {name: (c.d_model, c.activation_hidden_dim) for name, c in MODEL_PRESETS.items()}
    assert sizes == {"tiny": (96, 384), "small": (384, 1536), "medium": (768, 3072), "large": (1536, 6144)}
    for preset in MODEL_PRESETS.values():
        assert (preset.n_layers, preset.attention_n_heads, preset.attention_n_kv_heads) == (12, 12, 4)
        assert (preset.vocab_size, preset.max_seq_len, preset.norm_eps, preset.position_emb_theta) == (
            50304, 2048, 1e-6, 10000.0)
    assert ModelConfig(d_model=96).d_model == 96


def test_yaml_then_overrides_then_round_trip(tmp_path):
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text("model_preset: small\nmodel:\n  max_seq_len: 512\ntraining:\n  lr: 1.0e-3\n"
                         "  activation_checkpointing:\n    mode: full\n")
    config = load_config(yaml_path, ["training.lr=1e-4", "data.seq_len=256", "parallel.tensor_parallel_size=2"])
    assert config.model.d_model == 384 and config.model.max_seq_len == 512  # preset, then YAML
    assert config.training.lr == 1e-4  # the command line wins over YAML
    assert config.training.activation_checkpointing.mode == "full"
    saved = tmp_path / "resolved.yaml"
    save_config(config, saved)
    assert load_config(saved) == config
    assert OmegaConf.load(saved).model.d_model == 384


@pytest.mark.parametrize("overrides, message", [
    (["training.lrr=1"], "unknown config key 'training.lrr'"),
    (["trainingg.lr=1"], "unknown config key 'trainingg"),
    (["training.lr=fast"], "bad value for 'training.lr'"),
    (["training.max_steps=1.5"], "bad value for 'training.max_steps'"),
    (["parallel.tensor_parallel_size=5"], "not divisible by parallel.tensor_parallel_size=5"),
    (["parallel.tensor_parallel_size=6"], "attention_n_kv_heads=4 is not divisible"),
    (["model.d_model=100"], "d_model=100 is not divisible by model.attention_n_heads=12"),
    (["model.attention_n_kv_heads=5"], "not a multiple of model.attention_n_kv_heads=5"),
    (["training.lr_decay_style=step"], "training.lr_decay_style='step' is not one of"),
    (["data.seq_len=4096"], "exceeds model.max_seq_len"),
    (["model_preset=huge"], "model_preset 'huge' is unknown"),
    (["lr"], "not of the form section.key=value"),
])
def test_bad_config_is_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("training: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(broken)
    typo = tmp_path / "typo.yaml"
    typo.write_text("training:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown config key 'training.learning_rate'"):
        load_config(typo)


def test_batch_arithmetic_is_checked_against_the_world_size():
    config = load_config(None, ["training.micro_batch_size=4", "training.gradient_accumulation_steps=2",
                                "training.global_batch_size=16", "parallel.tensor_parallel_size=2"])
    validate_config(config, world_size=4)  # 4 x 2 x DP 2 = 16
    with pytest.raises(ConfigError, match="global_batch_size=16 != micro_batch_size 4 x"):
        validate_config(config, world_size=8)
    with pytest.raises(ConfigError, match="world size 3 is not divisible"):
        validate_config(config, world_size=3)


def test_resume_values_from_the_command_line():
    assert load_config(None, ["checkpointing.resume=false"]).checkpointing.resume == "false"
    assert load_config(None, ["checkpointing.resume=true"]).checkpointing.resume == "true"
    assert load_config(None, ["checkpointing.resume=step_40"]).checkpointing.resume == "step_40"
    with pytest.raises(ConfigError, match="checkpointing.resume='latest' is not one of auto, true, false or step_N"):
        load_config(None, ["checkpointing.resume=latest"])
