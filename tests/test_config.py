"""One config schema: YAML + dotted overrides, presets, and one clear error per bad input."""

import re
import subprocess
import sys

import pytest
from conftest import REPO
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
    (["training.lrr=1"], "unknown config key 'training.lrr' (did you mean 'training.lr'?)"),
    (["trainingg.lr=1"], "unknown config key 'trainingg' (did you mean 'training'?)"),
    (["training.activation_checkpointing.mod=full"], "unknown config key 'training.activation_checkpointing.mod' "
                                                     "(did you mean 'training.activation_checkpointing.mode'?)"),
    (["model.zzzz=1"], "unknown config key 'model.zzzz' (check the spelling against megapico/config/schema.py)"),
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
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
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


INTERPOLATED = "${oc.env:HF_TOKEN}"


@pytest.mark.parametrize("yaml_text, overrides, key", [
    (f"logging:\n  wandb_project: {INTERPOLATED}\n", [], "logging.wandb_project"),
    (f"model_preset: {INTERPOLATED}\n", [], "model_preset"),  # read before the merge: its error quoted the value
    ("training:\n  lr: ${training.max_steps}\n", [], "training.lr"),  # another key, not the environment
    (f"data:\n  train_data_path: [a, '{INTERPOLATED}']\n", [], "data.train_data_path.1"),
    ("", [f"logging.wandb_project={INTERPOLATED}"], "logging.wandb_project"),
    ("", [f"model_preset={INTERPOLATED}"], "model_preset"),
    ("", [f"data.train_data_path={INTERPOLATED}"], "data.train_data_path"),  # [${...}] is not even valid YAML
    ("", ['data.train_data_path=[a,"\\x24{oc.env:HF_TOKEN}"]'], "data.train_data_path.1"),  # escaped: $ after YAML
])
def test_no_value_is_interpolated(tmp_path, monkeypatch, yaml_text, overrides, key):
    """Any config a user is handed (or types) is plain values: `${...}` would copy HF_TOKEN into config.yaml, every
    checkpoint and the Hub. Refused in one line naming the key, the secret in no message."""
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
    path = tmp_path / "given.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(path if yaml_text else None, overrides)
    message = str(info.value)
    assert f"'{key}' is an interpolation" in message and "write the value itself" in message
    assert "\n" not in message and "hf_secret_token" not in message


def test_an_interpolated_config_writes_nothing(tmp_path):
    """pretrain.py given a config with ${oc.env:HF_TOKEN}: one line, exit 1, no run directory, no token anywhere."""
    config = tmp_path / "given.yaml"
    config.write_text(f"checkpointing:\n  runs_dir: {tmp_path / 'runs'}\nlogging:\n  wandb_project: {INTERPOLATED}\n")
    done = subprocess.run([sys.executable, str(REPO / "pretrain.py"), "--config", str(config)], cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "HF_TOKEN": "hf_secret_token"}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == (f"error: {config}: 'logging.wandb_project' is an interpolation (${{...}}); megapico "
                                   f"reads configs as plain values, never resolved from the environment or other "
                                   f"keys: write the value itself")
    assert "hf_secret_token" not in done.stdout + done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["given.yaml"]


def test_shipped_configs_use_no_interpolation():
    shipped = [*REPO.glob("examples/*.yaml"), *REPO.glob("tests/**/*.yaml")]
    assert shipped
    for path in shipped:
        assert "${" not in path.read_text(), path
