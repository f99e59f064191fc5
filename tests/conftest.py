import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DOCUMENTS = REPO / "data" / "sample" / "documents"
TOKENIZER = REPO / "data" / "tokenizers" / "olmo-gpt-neox-dolma-v1_5.json"


def slurm_cluster_up(command: str) -> bool:
    """Whether a SLURM cluster with an idle node answers here and `command` (srun, sbatch) is installed: the SLURM
    tests run where scripts/ci_launchers.sh could set one up, and skip elsewhere."""
    if shutil.which(command) is None or shutil.which("sinfo") is None:
        return False
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%a %T"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return any(line.startswith("up ") and "idle" in line for line in states.splitlines())


@pytest.fixture(scope="session")
def sample_prefix(tmp_path_factory):
    """The shipped Dolma sample tokenized once with pico's tokenizer (+ EOD) for the whole session."""
    from megapico.data.preprocess import PreprocessOptions, preprocess

    out = tmp_path_factory.mktemp("sample-data") / "sample"
    preprocess(PreprocessOptions(input=str(SAMPLE_DOCUMENTS), output_prefix=str(out),
                                 tokenizer_model=str(TOKENIZER), append_eod=True))
    return f"{out}_text_document"


def training_overrides(sample_prefix, tmp_path, **changes):
    """A tiny 2-layer pico trained 5 steps on the sample, fp32, CPU DeepSpeed config; changes override."""
    base = {
        "model_preset": "tiny", "model.n_layers": 2, "model.max_seq_len": 64, "data.seq_len": 32,
        "data.train_data_path": f"[{sample_prefix}]", "data.split": "95,5,0", "data.tokenizer": str(TOKENIZER),
        "training.max_steps": 5, "training.micro_batch_size": 4, "training.gradient_accumulation_steps": 1,
        "training.lr": 3e-3, "training.lr_warmup_steps": 2, "training.precision": "fp32",
        "training.deepspeed_config": str(REPO / "ds_configs" / "zero2_cpu.json"),
        "evaluation.interval": 0, "evaluation.max_sequences": 8, "checkpointing.runs_dir": str(tmp_path / "runs"),
        "checkpointing.save_interval": 1000, "checkpointing.learning_dynamics.enabled": False,
        "logging.wandb_mode": "disabled", "logging.log_interval": 1,
    }
    base.update(changes)
    return [f"{key}={value}" for key, value in base.items()]


# The `slow` marker, for a change's inner loop (`bash scripts/test.sh -m "not slow"`; the full suite runs it all):
# every test of a module that starts training processes: through tests/distributed.py (found by the module's
# imports), or named here (it launches pretrain.py, or imports tests/distributed.py inside a test).
SLOW_MODULES = {"test_examples", "test_launch", "test_preemption", "test_resume_rules", "test_security",
                "test_training"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module
        if module.__name__ in SLOW_MODULES or any(getattr(value, "__module__", None) == "distributed"
                                                  for value in vars(module).values()):
            item.add_marker(pytest.mark.slow)
