"""The shipped recipes load, validate at their GPU count, and keep pico's global batch."""

from pathlib import Path

import pytest
from conftest import REPO

from megapico.config import load_config, validate_config
from megapico.training.deepspeed_config import build_deepspeed_config, resolve_precision


@pytest.mark.parametrize("size", ["tiny", "small", "medium", "large"])
def test_16xA100_recipes(size, monkeypatch):
    monkeypatch.chdir(REPO)
    config = load_config(REPO / "examples" / f"pico_{size}_16xA100.yaml")
    validate_config(config, world_size=16)
    dp = 16 // config.parallel.tensor_parallel_size
    train = config.training
    assert train.micro_batch_size * train.gradient_accumulation_steps * dp == train.global_batch_size == 1024
    assert (train.max_steps, train.lr, train.lr_warmup_steps, train.weight_decay, config.data.seq_len) == (
        200_000, 3e-4, 2500, 0.01, 2048)
    ds = build_deepspeed_config(config, dp)
    assert resolve_precision(config) == "bf16-mixed" and not ds["bf16"]["enabled"]  # fp32 engine + autocast
    assert ds["train_batch_size"] == 1024 and ds["zero_optimization"]["stage"] == 2
    assert (config.data.samples, config.evaluation.perplexity) == ("pretokenized", "pico")  # pico parity
    assert config.checkpointing.learning_dynamics.eval_data_path
    published = load_config(REPO / "examples" / f"pico_{size}_16xA100.yaml",
                            ["training.precision=lightning-deepspeed-bf16"])  # the published run: one override
    ds = build_deepspeed_config(published, dp)
    assert ds["bf16"]["enabled"] and not ds["torch_autocast"]["enabled"] and "data_types" not in ds


def test_cpu_demo_config(monkeypatch):
    monkeypatch.chdir(REPO)
    config = load_config(REPO / "examples" / "cpu_demo.yaml", ["parallel.tensor_parallel_size=2"])
    validate_config(config, world_size=2)
    assert config.training.precision == "fp32"


def test_memory_table_tool(capsys):
    from estimate_memory import main

    assert main(["--table", "--gpus", "16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("| tiny | 1 | 16 | 64 |") and lines[5].startswith("| large | 2 (SP) | 8 | 32 |")


@pytest.mark.parametrize("size", ["tiny", "large"])
def test_recipe_layout_trains_on_cpu(size, sample_prefix, tmp_path, monkeypatch):
    """A recipe as written (tiny: TP=1, DP=2; large: TP=2 with sequence parallelism; both bf16-mixed through
    DeepSpeed's autocast, torch.compile, zero2_a100.json, learning dynamics, eval, a checkpoint), only scaled down
    to a 2-layer tiny model on the shipped sample in 2 CPU processes: the layout a 16-GPU run starts with trains,
    evaluates and saves."""
    from conftest import training_overrides
    from distributed import train

    monkeypatch.chdir(REPO)  # the recipe names ds_configs/zero2_a100.json from the repository root
    scaled_down = {key: value for key, value in (item.split("=", 1) for item in training_overrides(
        sample_prefix, tmp_path, **{"training.max_steps": 2, "checkpointing.save_interval": 2,
                                    "checkpointing.learning_dynamics.enabled": True,
                                    "checkpointing.learning_dynamics.batch_size": 2,
                                    "training.global_batch_size": 4 if size == "large" else 8,
                                    "training.gradient_accumulation_steps": 1,
                                    "evaluation.interval": 2, "data.eval_data_path": "[]",
                                    "data.samples": "megatron", "evaluation.perplexity": "tokens",
                                    "checkpointing.learning_dynamics.eval_data_path": "''"}))
                   if not key.startswith(("parallel.", "training.precision", "training.deepspeed_config"))}
    config_path = REPO / "examples" / f"pico_{size}_16xA100.yaml"
    result = train(2, [f"{key}={value}" for key, value in scaled_down.items()], tmp_path, config_path=str(config_path))
    assert sorted(result["losses"]) == [1, 2] and all(loss == loss for loss in result["losses"].values())
    assert sorted(result["perplexities"]) == [2]
    run = tmp_path / "runs" / f"pico-decoder-{size}"
    assert (run / "checkpoints" / "step_2").is_dir()
    assert (run / "checkpoints" / "step_2" / "learning_dynamics" / "train_activations.pt").is_file()


TOOLS = sorted(path.stem for path in (REPO / "tools").glob("*.py"))
COMMAND_STARTS = ("python ", "bash ", "deepspeed ", "sbatch ", "hf ", "PYTHON=", "PRECISIONS=", ".venv/bin/")
REPO_DIRS = ("data/", "examples/", "ds_configs/", "tools/", "scripts/", "benchmarks/")


class _Parsed(Exception):
    def __init__(self, parser, method):
        self.parser, self.method = parser, method


def _tool_parser(name, monkeypatch):
    """The tool's ArgumentParser, as its main() builds it, and the parse method it calls (nothing runs)."""
    import argparse
    import importlib

    def capture(method):
        def stop(self, *args, **kwargs):
            raise _Parsed(self, method)
        return stop

    for method in ("parse_args", "parse_intermixed_args"):
        monkeypatch.setattr(argparse.ArgumentParser, method, capture(method))
    with pytest.raises(_Parsed) as parsed:
        importlib.import_module(name).main([])
    monkeypatch.undo()
    return parsed.value.parser, parsed.value.method


def _help_commands():
    """(where, command) for every command line the tools' help texts and the shell scripts' header comments show;
    a line ending in a backslash continues on the next."""
    texts = {f"tools/{name}.py": __import__(name).__doc__ for name in TOOLS}
    for path in [*(REPO / "examples").glob("*.sh"), *(REPO / "examples").glob("*.slurm"),
                 *(REPO / "scripts").glob("*.sh")]:
        header = []
        for line in path.read_text().splitlines()[1:]:
            if not line.startswith("#"):
                break
            header.append(line.lstrip("#"))
        texts[str(path.relative_to(REPO))] = "\n".join(header)
    commands = []
    for where, text in texts.items():
        pending = None
        for line in text.splitlines():
            stripped = line.strip()
            if pending is not None:
                pending += " " + stripped.rstrip("\\")
            elif stripped.startswith(COMMAND_STARTS):
                pending = stripped.rstrip("\\")
            if pending is not None and not stripped.endswith("\\"):
                commands.append((where, pending))
                pending = None
    return commands


def test_every_tool_option_has_help(monkeypatch):
    missing = []
    for name in TOOLS:
        parser, _ = _tool_parser(name, monkeypatch)
        missing += [f"tools/{name}.py {action.option_strings or action.dest}" for action in parser._actions
                    if not action.help]
    assert missing == []


def test_help_commands_name_real_files_and_parse(monkeypatch):
    """Every command in a help text names files the repository has (outputs go under runs/), uses `hf download`
    (huggingface_hub >= 1.0 has no huggingface-cli), and a tool's command parses with that tool's parser."""
    import shlex

    commands = _help_commands()
    assert len(commands) > 20
    problems = []
    for where, command in commands:
        words = [word for word in shlex.split(command, comments=True) if "=" not in word or word.startswith("-")]
        for word in words:
            path = word.split("=", 1)[-1]
            if path.startswith(REPO_DIRS) and not (REPO / path).exists():
                problems.append(f"{where}: {path} does not exist ({command})")
        if words[0] == "python" and words[1].startswith("tools/"):
            parser, method = _tool_parser(Path(words[1]).stem, monkeypatch)
            try:
                getattr(parser, method)(words[2:])
            except SystemExit:
                problems.append(f"{where}: does not parse: {command}")
    assert problems == []
    for path in [*(REPO / "tools").glob("*.py"), *(REPO / "examples").glob("*.sh"), *(REPO / "scripts").glob("*.sh")]:
        assert "huggingface-cli" not in path.read_text(), path
