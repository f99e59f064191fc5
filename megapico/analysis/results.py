"""One capture's analysis results on disk and in the logs, as pico-analyze's scripts/analyze.py writes them.

Files: `{run_dir}/analysis_results/{analysis_name}/step_{N}/{metric}_{split}.json`, each `json.dump` of
{component key: value} (NaN and Infinity written as Python's json writes them). Each file is written to a
temporary name and renamed, so a stop leaves either the whole file or none: a resumed run finds what is missing
with existing_results and writes it once. wandb (and metrics.jsonl) keys: `{metric}_{split}/{component key}`.
"""

import json
from collections.abc import Mapping
from pathlib import Path

from megapico.checkpoint.paths import inside, write_text

RESULTS_DIR = "analysis_results"


def results_directory(run_dir: Path, analysis_name: str, step: int) -> Path:
    """step_N/ of the analysis inside the run directory (a link planted there that leads out is refused)."""
    return inside(run_dir, run_dir / RESULTS_DIR / analysis_name / f"step_{step}")


def existing_results(run_dir: Path, analysis_name: str, step: int) -> set[str]:
    """The `<metric>_<split>` results already written for a step."""
    directory = results_directory(Path(run_dir), analysis_name, step)
    return {path.stem for path in directory.glob("*.json")} if directory.is_dir() else set()


def write_results(run_dir: Path, analysis_name: str, step: int, results: Mapping[str, Mapping[str, float]]
                  ) -> list[Path]:
    """Write analyze()'s results for one step, each file atomically; returns the paths written."""
    directory = results_directory(Path(run_dir), analysis_name, step)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, values in results.items():
        path = directory / f"{name}.json"
        write_text(path, json.dumps(dict(values)))
        written.append(path)
    return written


def flat_scalars(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """pico-analyze's wandb keys: `<metric>_<split>/<component key>` -> value."""
    return {f"{name}/{key}": value for name, values in results.items() for key, value in values.items()}
