"""pico-analyze itself (github pico-lm/pico-analyze), run in its own venv on a pico run directory: the reference
megapico's analysis is held to. None of its code is in this repository.

Its source is a checkout (PICO_ANALYZE_SRC, default /tmp/pico-analyze) of commit COMMIT; the tests that need it
skip when it is not there (CI reaches package registries only). Its venv, .venv-pico-analyze at the repository root,
is made on first use with pip from the registry (REQUIREMENTS: pico-analyze's pyproject ranges, pinned to what was
tested; torch is the build this machine keeps on disk) and holds a .gitignore of its own. One departure: datasets
4.0.0, not its ^3.2: pico-analyze loads train_data/ (load_from_disk), which megapico writes with datasets >= 4,
whose 'List' feature type datasets 3 cannot read.

Run as a script, it writes tests/data/pico_analyze_golden.json: pico-analyze's results on synthetic_run(), so CI
checks megapico's numbers without pico-analyze:
    PICO_ANALYZE_SRC=/tmp/pico-analyze .venv/bin/python tests/pico_analyze_reference.py
"""

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
SOURCE = Path(os.environ.get("PICO_ANALYZE_SRC", "/tmp/pico-analyze"))
COMMIT = "c4a4e844abfec54908a10aa12a5b3a002d8945df"  # pico-analyze main, 2025-04-06
VENV = REPO / ".venv-pico-analyze"
REQUIREMENTS = ["torch==2.13.0", "numpy==2.4.6", "pyyaml==6.0.4", "click==8.5.1", "rich==13.9.4", "datasets==4.0.0",
                "huggingface-hub==0.36.2", "wandb==0.19.11"]
GOLDEN = REPO / "tests" / "data" / "pico_analyze_golden.json"
SUFFIXES = ("attention.v_proj", "attention.o_proj", "swiglu.w_2")
OV = {"value_layer": "attention.v_proj", "output_layer": "attention.o_proj"}


def missing_reason() -> str | None:
    """Why pico-analyze cannot run here, or None."""
    if not (SOURCE / "scripts" / "analyze.py").is_file() or not (SOURCE / "src" / "metrics" / "cka.py").is_file():
        return (f"pico-analyze's source is not at {SOURCE} (set PICO_ANALYZE_SRC to a checkout of pico-lm/pico-analyze "
                f"{COMMIT[:8]}); the golden values in {GOLDEN.relative_to(REPO)} still hold megapico to it")
    return None


def python() -> Path:
    """The reference venv's interpreter, created (pip, from the registry) the first time."""
    interpreter = VENV / "bin" / "python"
    marker = VENV / "requirements.txt"
    if not interpreter.exists() or not marker.exists() or marker.read_text().split() != REQUIREMENTS:
        venv.create(VENV, with_pip=True, clear=True)
        (VENV / ".gitignore").write_text("*\n")  # never part of the repository
        subprocess.run([str(interpreter), "-m", "pip", "install", "-q", *REQUIREMENTS], check=True)
        marker.write_text("\n".join(REQUIREMENTS))
    return interpreter


def every_metric_configs(layers: list[int], split: str, target: int, comparative_split: str = "val") -> list[dict]:
    """pico-analyze metrics configs covering every metric x component x data type it allows. pico-analyze keys its
    metrics by name, so each norm type needs a config of its own: three configs."""
    def components(data_types):
        out = []
        for data_type in data_types:
            out.append({"component_name": "simple", "data_type": data_type, "layer_suffixes": "swiglu.w_2",
                        "layers": layers})
            out.append({"component_name": "simple", "data_type": data_type, "layer_suffixes": "attention.v_proj",
                        "layers": layers})
            out.append({"component_name": "ov_circuit", "data_type": data_type, "layer_suffixes": dict(OV),
                        "layers": layers})
        return out

    every = ["activations", "weights", "gradients"]
    base = [
        {"metric_name": "cka", "data_split": comparative_split, "target_checkpoint": target,
         "components": components(["activations"])},
        {"metric_name": "pwcca", "data_split": comparative_split, "target_checkpoint": target,
         "components": components(["activations"])},
        {"metric_name": "per", "data_split": split, "components": components(["weights", "gradients"])},
        {"metric_name": "condition_number", "data_split": split, "components": components(every)},
        {"metric_name": "gini", "data_split": split, "components": components(every)},
        {"metric_name": "hoyer", "data_split": split, "components": components(every)},
    ]
    return [{"analysis_name": f"every-{norm}", "metrics": (base if norm == "frobenius" else []) + [
        {"metric_name": "norm", "data_split": split, "norm_type": norm, "components": components(every)}]}
        for norm in ("frobenius", "nuclear", "inf")]


def run_pico_analyze(run_path: Path, configs: list[dict], steps: list[int], work: Path) -> dict:
    """pico-analyze's scripts/analyze.py on a pico run directory, once per config (wandb off): {analysis_name:
    {step: {"<metric>_<split>": its JSON}}} read back from the files it wrote."""
    interpreter = python()
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for config in configs:
        full = {**config, "steps": steps, "monitoring": {"output_dir": str(work / "analysis_results"),
                                                          "save_to_wandb": False}}
        path = work / f"{config['analysis_name']}.yaml"
        path.write_text(yaml.safe_dump(full, sort_keys=False))
        done = subprocess.run([str(interpreter), "-m", "scripts.analyze", "--config_path", str(path), "--run_path",
                               str(run_path)], cwd=SOURCE, capture_output=True, text=True,
                              env={**os.environ, "WANDB_MODE": "disabled"})
        if done.returncode:
            raise RuntimeError(f"pico-analyze failed on {path}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        out = work / "analysis_results" / config["analysis_name"]
        results[config["analysis_name"]] = {str(step): {
            file.stem: json.loads(file.read_text()) for file in sorted((out / f"step_{step}").glob("*.json"))}
            for step in steps}
    return results


# The synthetic run of the goldens: pico-decoder's layout at a small size, with GQA (2 heads share one kv head),
# activations of correlated features so that CKA/PWCCA see structure.
SYNTHETIC_MODEL = {"d_model": 16, "n_layers": 2, "attention_n_heads": 2, "attention_n_kv_heads": 1,
                   "activation_hidden_dim": 32}
SYNTHETIC_SEQUENCES = 48  # > every pwcca component's neurons (ov_circuit: heads x d_model = 32)
SYNTHETIC_SEED = 20260601


def synthetic_run(seed: int = SYNTHETIC_SEED) -> dict[int, dict[str, dict[str, dict[str, torch.Tensor]]]]:
    """{step (0 and 2): {split: {kind: {"layers.{i}.{suffix}": fp32 tensor}}}}, from numpy's PCG64 stream; step 2
    is step 0 moved a little, as training moves it."""
    rng = np.random.default_rng(seed)
    m = SYNTHETIC_MODEL
    d, head_dim = m["d_model"], m["d_model"] // m["attention_n_heads"]
    kv, hidden = head_dim * m["attention_n_kv_heads"], m["activation_hidden_dim"]
    shapes = {"attention.v_proj": (kv, d), "attention.o_proj": (d, d), "swiglu.w_2": (d, hidden)}
    steps = {}
    for step in (0, 2):
        splits = {}
        for split in ("train", "val"):
            kinds = {"activations": {}, "weights": {}, "gradients": {}}
            for layer in range(m["n_layers"]):
                for suffix in SUFFIXES:
                    key = f"layers.{layer}.{suffix}"
                    out = shapes[suffix][0]
                    mixed = (rng.standard_normal((SYNTHETIC_SEQUENCES, 6)) @ rng.standard_normal((6, out))
                             + 0.3 * rng.standard_normal((SYNTHETIC_SEQUENCES, out)))
                    if step:  # the later step: the earlier one moved
                        mixed = steps[0][split]["activations"][key].double().numpy() + 0.5 * mixed
                    kinds["activations"][key] = mixed
                    kinds["weights"][key] = rng.standard_normal(shapes[suffix]) * 0.2
                    kinds["gradients"][key] = rng.standard_normal(shapes[suffix]) * 1e-3
            splits[split] = {kind: {key: torch.from_numpy(np.asarray(value, dtype=np.float32))
                                    for key, value in tensors.items()} for kind, tensors in kinds.items()}
        steps[step] = splits
    return steps


def checksum(run: dict) -> float:
    """A sum over every synthetic tensor: the goldens' inputs, to catch a change in numpy's stream."""
    return float(sum(t.double().sum() for step in run.values() for split in step.values()
                     for kind in split.values() for t in kind.values()))


def write_pico_run(run: dict, model: dict, target: Path) -> Path:
    """A pico run directory holding `run`'s learning dynamics (what pico-analyze reads of one)."""
    for step, splits in run.items():
        directory = target / "checkpoints" / f"step_{step}" / "learning_dynamics"
        directory.mkdir(parents=True)
        for split, kinds in splits.items():
            for kind, tensors in kinds.items():
                torch.save(dict(tensors), directory / f"{split}_{kind}.pt")
    (target / "training_config.yaml").write_text(yaml.safe_dump({"checkpointing": {"run_name": "synthetic"},
                                                                 "model": model}))
    return target


def make_golden(work: Path) -> dict:
    run = synthetic_run()
    steps = sorted(run)
    results = run_pico_analyze(write_pico_run(run, SYNTHETIC_MODEL, work / "run"),
                               every_metric_configs(list(range(SYNTHETIC_MODEL["n_layers"])), "train", steps[-1]),
                               steps, work)
    return {"how": "tests/pico_analyze_reference.py run as a script: pico-analyze's scripts/analyze.py on "
                   "synthetic_run() written as a pico run directory, configs from every_metric_configs",
            "pico_analyze_commit": COMMIT, "requirements": REQUIREMENTS, "model": SYNTHETIC_MODEL,
            "seed": SYNTHETIC_SEED, "input_checksum": checksum(run), "results": results}


if __name__ == "__main__":
    import tempfile

    reason = missing_reason()
    if reason:
        sys.exit(reason)
    with tempfile.TemporaryDirectory() as tmp:
        golden = make_golden(Path(tmp))
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
