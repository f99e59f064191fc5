"""Draw a run's record: loss, learning rate, grad norm, tokens/s and eval perplexity against the step, into a PNG.

    python tools/plot_run.py runs/RUN                  # -> runs/RUN/metrics.png
    python tools/plot_run.py runs/RUN --output run.png
Reads runs/RUN/metrics.jsonl, which pretrain.py writes (one JSON object per logged step and per eval; steps re-run
after a fall-back replace their old records).
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (("train/loss", "train loss"), ("trainer/learning_rate", "learning rate"), ("trainer/grad_norm", "grad norm"),
          ("trainer/tokens_per_second", "tokens/s"))


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics record (is this a megapico run directory?)")
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: line {err.lineno} is not JSON") from None


def plot(records: list[dict], output: Path, title: str) -> None:
    eval_keys = sorted({key for record in records for key in record if key.startswith("eval/")})
    panels = [*PANELS, *((key, f"{key.removeprefix('eval/')} perplexity") for key in eval_keys)]
    figure, axes = plt.subplots(len(panels), 1, figsize=(8, 2.2 * len(panels)), sharex=True)
    for axis, (key, label) in zip(axes, panels, strict=True):
        points = [(record["step"], record[key]) for record in records if key in record]
        if points:
            steps, values = zip(*points, strict=True)
            axis.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3)
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="runs/RUN")
    parser.add_argument("--output", help="PNG path (default: RUN_DIR/metrics.png)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    output = Path(args.output) if args.output else run_dir / "metrics.png"
    try:
        plot(read_records(run_dir / "metrics.jsonl"), output, run_dir.name)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
