"""Draw a run's record: loss, learning rate, grad norm, tokens/s and eval perplexity against the step, into a PNG;
and its learning-dynamics analysis, where it has one, into a second.

    python tools/plot_run.py runs/cpu-demo             # -> runs/cpu-demo/metrics.png (after examples/cpu_demo.sh)
    python tools/plot_run.py runs/RUN --output run.png --analysis-output analysis.png
Reads runs/RUN/metrics.jsonl, which pretrain.py writes (one JSON object per logged step and per eval; steps re-run
after a fall-back replace their old records; each launch adds {"step", "event": "start" | "resume", "layout",
"global_batch"}). Every resume is a dashed vertical line labelled with its layout, drawn red where the layout or
the global batch changed. The eval curve is named after what it measured, from runs/RUN/config.yaml: the
evaluation.name of a separate held-out set (data.eval_data_path), else the valid split of the training data.
The run directory may be someone else's: its files are read only where they resolve inside it, and the PNG is
written under a temporary name and renamed, so a link at metrics.png is replaced, never written through.

The analysis (runs/RUN/analysis.png): one panel per pico-analyze result, `<metric>_<split>` (prefixed with the
analysis name where the run has several), a line per component key (a layer, or an ov_circuit head) over the steps.
It is read from runs/RUN/analysis_results/<analysis_name>/step_N/<metric>_<split>.json, the files pico-analyze and
training write, rather than from metrics.jsonl's `<metric>_<split>/<key>` copies: each file is written once and whole,
holds a step's final values (cka and pwcca of earlier steps arrive when their target step is captured, after those
steps' log records), and is what a converted pico run directory and pico-analyze's own output keep. Each file is
checked as the converter checks it (received.checked_analysis_result); a run without results draws no analysis.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from matplotlib.transforms import offset_copy  # noqa: E402

from megapico.analysis.results import RESULTS_DIR  # noqa: E402
from megapico.checkpoint.paths import CheckpointError, inside, refuse_links, replacing  # noqa: E402
from megapico.config import ConfigError, load_config  # noqa: E402
from megapico.convert.received import analysis_files, analysis_steps, checked_analysis_result  # noqa: E402

PANELS = (("train/loss", "train loss"), ("trainer/learning_rate", "learning rate"), ("trainer/grad_norm", "grad norm"),
          ("trainer/tokens_per_second", "tokens/s"))
VALID_SPLIT = "valid split of the training data"
RESUME_COLOR, CHANGED_COLOR = "0.45", "tab:red"


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics record (is this a megapico run directory?)")
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: line {err.lineno} is not JSON") from None


def eval_set_names(config_path: Path) -> dict[str, str]:
    """{eval metric key: the set it measured} from the run's saved config (ConfigError when it cannot be read)."""
    config = load_config(config_path)
    name = config.evaluation.name
    return {f"eval/{name}": name if config.data.eval_data_path else VALID_SPLIT}


def launches(records: list[dict]) -> list[dict]:
    """The launch records in file order, each with `previous` (the launch before it, or None) and `changed`: its
    layout or global batch differs from the previous launch's (False for the first)."""
    found, previous = [], None
    for record in records:
        if record.get("event") not in ("start", "resume"):
            continue
        changed = previous is not None and (record.get("layout"), record.get("global_batch")) != (
            previous.get("layout"), previous.get("global_batch"))
        found.append({**record, "changed": changed, "previous": previous})
        previous = record
    return found


def _layout_text(launch: dict) -> str:
    return f"{launch.get('layout', '?')}, batch {launch.get('global_batch', '?')}"


def _launch_text(launch: dict) -> str:
    """"resume TP=2 x DP=1, batch 8", and below it "(was TP=1 x DP=2, batch 16)" where that changed."""
    text = f"resume {_layout_text(launch)}"
    return f"{text}\n(was {_layout_text(launch['previous'])})" if launch["changed"] else text


def plot(records: list[dict], title: str, eval_names: dict[str, str] | None = None) -> Figure:
    """The figure: one panel per metric, resumes as vertical lines (labelled on the top panel), eval panels titled
    with the set they measured (`eval_names`: metric key -> set; a key not in it is named after itself)."""
    eval_names = eval_names or {}
    eval_keys = sorted({key for record in records for key in record if key.startswith("eval/")})
    panels = [*PANELS, *((key, "perplexity") for key in eval_keys)]
    figure, axes = plt.subplots(len(panels), 1, figsize=(8, 2.2 * len(panels)), sharex=True, squeeze=False)
    axes = axes[:, 0]
    runs = launches(records)
    resumes = [launch for launch in runs if launch["event"] == "resume"]
    for axis, (key, label) in zip(axes, panels, strict=True):
        points = [(record["step"], record[key]) for record in records if key in record]
        if points:
            steps, values = zip(*points, strict=True)
            axis.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3)
        if key.startswith("eval/"):
            axis.set_title(f"eval perplexity: {eval_names.get(key, key.removeprefix('eval/'))}", fontsize=9)
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        for launch in resumes:
            axis.axvline(launch["step"], color=CHANGED_COLOR if launch["changed"] else RESUME_COLOR,
                         linestyle="--", linewidth=1.5 if launch["changed"] else 1.0, gid=f"resume@{launch['step']}")
    for launch in resumes:  # along its line, from the top of the first panel
        beside = offset_copy(axes[0].get_xaxis_transform(), figure, x=-2, units="points")  # left of the line
        axes[0].text(launch["step"], 0.97, _launch_text(launch), transform=beside,
                     rotation=90, fontsize=6.5, ha="right", va="top", linespacing=1.1,
                     color=CHANGED_COLOR if launch["changed"] else RESUME_COLOR,
                     bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 1})
    axes[-1].set_xlabel("step")
    first = runs[0] if runs and runs[0]["event"] == "start" else None
    figure.suptitle(f"{title} (started at {first.get('layout', '?')}, global batch {first.get('global_batch', '?')})"
                    if first else title)
    figure.tight_layout()
    return figure


Series = dict[tuple[str, str], dict[str, list[tuple[int, float]]]]  # (analysis, result) -> key -> [(step, value)]


def read_analysis(run_dir: Path) -> Series:
    """Every step's analysis results of a run, by step ({} where it has none); a null value is NaN (a gap). A link in
    analysis_results/ or a file that is not pico-analyze's is a one-line CheckpointError."""
    source = inside(run_dir, run_dir / RESULTS_DIR)
    refuse_links(source)
    series: Series = {}
    for step, directories in analysis_steps(source).items():
        for directory in directories:
            for path in analysis_files(directory):
                lines = series.setdefault((directory.parent.name, path.stem), {})
                for key, value in checked_analysis_result(path).items():
                    lines.setdefault(key, []).append((step, math.nan if value is None else value))
    return series


def plot_analysis(series: Series, title: str) -> Figure | None:
    """The analysis figure: a panel per (analysis, result), sorted, titled `<metric>_<split>` (`<analysis> /
    <metric>_<split>` where there are several analyses), a line per component key labelled with it; None when
    there is nothing to draw."""
    if not series:
        return None
    panels = sorted(series)
    several = len({analysis for analysis, _ in panels}) > 1
    figure, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True, squeeze=False)
    for axis, (analysis, result) in zip(axes[:, 0], panels, strict=True):
        for key, points in series[(analysis, result)].items():
            steps, values = zip(*points, strict=True)
            axis.plot(steps, values, label=key, marker="o" if len(points) < 30 else None, markersize=3)
        axis.set_title(f"{analysis} / {result}" if several else result, fontsize=9)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    axes[-1, 0].set_xlabel("step")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))  # captures are steps
    names = sorted({analysis for analysis, _ in panels})
    figure.suptitle(f"{title}: {', '.join(names)}")
    figure.tight_layout()
    return figure


def save(figure: Figure, output: Path) -> bool:
    """Write the figure as a PNG (a link planted at the name is replaced, never written through); False with one
    error line if that fails."""
    try:
        with replacing(output) as tmp:
            figure.savefig(tmp, dpi=100, format="png")
    except OSError as err:
        print(f"error: {output}: cannot write it ({err.strerror or err})", file=sys.stderr)
        return False
    finally:
        plt.close(figure)
    print(f"wrote {output}")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="the run directory, runs/RUN (holding metrics.jsonl and config.yaml)")
    parser.add_argument("--output", help="PNG path (default: RUN_DIR/metrics.png)")
    parser.add_argument("--analysis-output", help="PNG path of the analysis, where the run has one (default: "
                                                  "RUN_DIR/analysis.png)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    output = Path(args.output) if args.output else run_dir / "metrics.png"
    analysis_output = Path(args.analysis_output) if args.analysis_output else run_dir / "analysis.png"
    try:
        records = read_records(inside(run_dir, run_dir / "metrics.jsonl"))
    except (FileNotFoundError, ValueError) as err:  # CheckpointError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 1
    try:
        eval_names = eval_set_names(inside(run_dir, run_dir / "config.yaml"))
    except (ConfigError, CheckpointError) as err:
        print(f"warning: {err}; eval curves are named by their metric keys", file=sys.stderr)
        eval_names = {}
    if not save(plot(records, run_dir.name, eval_names), output):
        return 1
    try:
        analysis = plot_analysis(read_analysis(run_dir), run_dir.name)
    except CheckpointError as err:
        print(f"error: {err}; {analysis_output.name} not drawn", file=sys.stderr)
        return 1
    return 0 if analysis is None or save(analysis, analysis_output) else 1


if __name__ == "__main__":
    sys.exit(main())
