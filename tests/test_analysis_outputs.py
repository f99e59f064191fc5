"""The learning-dynamics analysis seen and carried: tools/plot_run.py draws analysis_results/ (a panel per metric and
split, a line per component key over the steps), tools/convert_to_hf.py --run-dir carries it into the pico run
directory with every file checked and dumped again, and a hostile file (a leaf that is not a number, a huge or deep
file, a link, a name that is not pico-analyze's) is refused in one line or ignored, never copied. The tree is crafted
here as training and pico-analyze write it; publishing it is tested in test_publish.py."""

import json
import math
import os
import shutil

import matplotlib.pyplot as plt
import pytest
from conftest import training_overrides
from convert_to_hf import main as to_hf_main
from distributed import train
from plot_run import main as plot_main
from plot_run import plot_analysis, read_analysis

from megapico.checkpoint.paths import CheckpointError
from megapico.convert.received import write_checked_analysis_results

ANALYSIS = "tiny-dynamics"
STEPS = (0, 2, 4)
SIMPLE = ["layers.0.swiglu.w_2.weights", "layers.1.swiglu.w_2.weights"]
OV = ["layers.0.ov_circuit.activations.heads.0", "layers.0.ov_circuit.activations.heads.1",
      "layers.0.ov_circuit.activations"]


def results(step):
    """pico-analyze's results at a step: {<metric>_<split>: {component key: value}}; cka against step 4 (1.0 there),
    a null where a value is missing and a NaN as Python's json writes one."""
    return {"norm_train": {key: 10.0 + step + layer for layer, key in enumerate(SIMPLE)},
            "gini_val": {key: (math.nan if step == 2 and head == 0 else 0.1 * head + step / 100)
                         for head, key in enumerate(OV)},
            "cka_val": {key: (1.0 if step == 4 else None if step == 0 else 0.5) for key in OV[2:]}}


def write_analysis(run_dir, name=ANALYSIS, steps=STEPS):
    """runs/RUN/analysis_results/<name>/step_N/<metric>_<split>.json as training (and pico-analyze) write them, with
    pico-analyze's own log beside them; returns the files' texts by path relative to analysis_results/."""
    written = {}
    for step in steps:
        for result, values in results(step).items():
            relative = f"{name}/step_{step}/{result}.json"
            path = run_dir / "analysis_results" / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
            written[relative] = path.read_text()
    (run_dir / "analysis_results" / name / "analysis.log").write_text("pico-analyze's log: not a result\n")
    return written


def write_records(run_dir):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": step, "train/loss": 10.0 - step}) + "\n"
                                                   for step in range(1, 5)))


def tree(root):
    return {str(path.relative_to(root)): path.read_text() for path in sorted(root.rglob("*")) if path.is_file()}


def errors(capsys):
    """The error lines of stderr (a run without config.yaml also warns that its eval curves keep their keys' names)."""
    return "".join(line for line in capsys.readouterr().err.splitlines(keepends=True) if line.startswith("error"))


def one_line(err):
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_plot_draws_a_panel_per_result_and_a_line_per_key(tmp_path, capsys):
    run = tmp_path / "run"
    write_records(run)
    write_analysis(run)
    figure = plot_analysis(read_analysis(run), "run")
    assert [axis.get_title() for axis in figure.axes] == ["cka_val", "gini_val", "norm_train"]
    lines = {axis.get_title(): {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                                for line in axis.get_lines()} for axis in figure.axes}
    assert lines["norm_train"] == {key: (list(STEPS), [10.0 + step + layer for step in STEPS])
                                   for layer, key in enumerate(SIMPLE)}
    assert set(lines["gini_val"]) == set(OV) and lines["gini_val"][OV[1]] == (list(STEPS), [0.1 + step / 100
                                                                                            for step in STEPS])
    assert math.isnan(lines["gini_val"][OV[0]][1][1])
    steps, values = lines["cka_val"][OV[2]]
    assert steps == [0, 2, 4] and math.isnan(values[0]) and values[1:] == [0.5, 1.0]  # null: a gap
    assert [text.get_text() for text in figure.axes[0].get_legend().get_texts()] == OV[2:]
    assert figure._suptitle.get_text() == f"run: {ANALYSIS}"
    plt.close(figure)

    write_analysis(run, "second", steps=(4,))  # several analyses: panels named after theirs too
    titles = [axis.get_title() for axis in plot_analysis(read_analysis(run), "run").axes]
    assert titles[:3] == ["second / cka_val", "second / gini_val", "second / norm_train"]
    assert titles[3:] == [f"{ANALYSIS} / cka_val", f"{ANALYSIS} / gini_val", f"{ANALYSIS} / norm_train"]
    plt.close("all")

    outside = tmp_path / "outside.txt"
    outside.write_text("not yours to overwrite")
    (run / "analysis.png").symlink_to(outside)
    assert plot_main([str(run)]) == 0
    assert capsys.readouterr().out == f"wrote {run / 'metrics.png'}\nwrote {run / 'analysis.png'}\n"
    assert not (run / "analysis.png").is_symlink() and (run / "analysis.png").read_bytes()[:4] == b"\x89PNG"
    assert outside.read_text() == "not yours to overwrite"  # the link was replaced, not written through


def test_plot_without_analysis_draws_none_and_with_a_hostile_file_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    write_records(run)
    assert plot_analysis(read_analysis(run), "run") is None
    assert plot_main([str(run)]) == 0
    assert capsys.readouterr().out == f"wrote {run / 'metrics.png'}\n"
    assert not (run / "analysis.png").exists()

    write_analysis(run)
    bad = run / "analysis_results" / ANALYSIS / "step_2" / "norm_train.json"
    bad.write_text(json.dumps({SIMPLE[0]: "import os"}))
    assert plot_main([str(run)]) == 1
    err = one_line(errors(capsys))
    assert err == f"error: {bad}: '{SIMPLE[0]}' is a str, not a number; refusing it; analysis.png not drawn\n"
    assert not (run / "analysis.png").exists() and (run / "metrics.png").is_file()


HOSTILE = {
    "a text leaf": (lambda path: path.write_text(json.dumps({SIMPLE[0]: "1.0"})), r"is a str, not a number"),
    "a nested leaf": (lambda path: path.write_text(json.dumps({SIMPLE[0]: {"x": 1.0}})), r"is a dict, not a number"),
    "a list": (lambda path: path.write_text("[1.0]"), r"holds a list, not pico-analyze's \{component key: number\}"),
    "a key that is a path": (lambda path: path.write_text(json.dumps({"../../x": 1.0})), r"is not a component key"),
    "a huge file": (lambda path: path.write_text(json.dumps({f"layers.{i}.x": 1.0 for i in range(60_000)})),
                    r"larger than the 1,048,576 bytes a file of its kind holds"),
    "deep nesting": (lambda path: path.write_text("[" * 200_000), r"not JSON"),
    "an integer of 5000 digits": (lambda path: path.write_text('{"a": ' + "9" * 5000 + "}"), r"not JSON"),
    "an integer beyond any float": (lambda path: path.write_text('{"a": ' + "9" * 400 + "}"),
                                    r"'a' is an integer beyond any float"),
    "a link to a file outside": (lambda path: (path.unlink(), path.symlink_to(path.parents[4] / "secret.json")),
                                 r"a symbolic link \(to .*secret.json\); a run directory holds plain files"),
    "a link to a directory outside": (lambda path: (shutil.rmtree(path.parent), path.parent.symlink_to(
        path.parents[4])), r"step_2: a symbolic link"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_result_is_refused_in_one_line(tmp_path, name):
    make, message = HOSTILE[name]
    (tmp_path / "secret.json").write_text(json.dumps({"hf_token": 1.0}))
    run = tmp_path / "run"
    write_analysis(run)
    make(run / "analysis_results" / ANALYSIS / "step_2" / "norm_train.json")
    with pytest.raises(CheckpointError, match=message) as caught:
        write_checked_analysis_results(run / "analysis_results", tmp_path / "out")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out" / ANALYSIS / "step_2" / "norm_train.json").exists()


def test_files_that_are_not_results_are_ignored(tmp_path):
    """Only <analysis_name>/step_N/<metric>_<split>.json of pico-analyze's metrics and splits are read and written;
    pico-analyze's log, other names, a leading-zero step, a FIFO are left behind."""
    run = tmp_path / "run"
    written = write_analysis(run)
    root = run / "analysis_results"
    for extra in ("notes.txt", f"{ANALYSIS}/step_2/norm_test.json", f"{ANALYSIS}/step_2/evil.json",
                  f"{ANALYSIS}/step_02/norm_train.json", f"{ANALYSIS}/step_x/norm_train.json",
                  f"{ANALYSIS}/step_2/norm_train.json.bak", "bad name/step_2/norm_train.json",
                  ".hidden/step_2/cka_val.json"):
        (root / extra).parent.mkdir(parents=True, exist_ok=True)
        (root / extra).write_text(json.dumps({"x": 1.0}))
    os.mkfifo(root / ANALYSIS / "step_4" / "hoyer_val.json")
    write_checked_analysis_results(root, tmp_path / "out")
    assert tree(tmp_path / "out") == written


@pytest.fixture(scope="module")
def trained(sample_prefix, tmp_path_factory):
    """A one-step run with its checkpoint at step 1."""
    tmp = tmp_path_factory.mktemp("analysis")
    train(1, training_overrides(sample_prefix, tmp, **{"training.max_steps": 1, "training.lr_warmup_steps": 0,
                                                        "checkpointing.save_interval": 1}), tmp)
    return tmp / "runs" / "megapico-run"


def test_convert_carries_the_analysis_dumped_again(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    written = write_analysis(run)
    (run / "analysis_results" / ANALYSIS / "step_4" / "extra.json").write_text("{}")
    assert to_hf_main(["--run-dir", str(run), "--output", str(tmp_path / "pico"), "--no-verify"]) == 0
    out = tmp_path / "pico" / "megapico-run" / "analysis_results"
    assert tree(out) == written  # every result, nothing else (pico-analyze's log and extra.json stay behind)

    bad = run / "analysis_results" / ANALYSIS / "step_4" / "cka_val.json"
    bad.write_text(json.dumps({OV[2]: [1.0]}))
    capsys.readouterr()
    assert to_hf_main(["--run-dir", str(run), "--output", str(tmp_path / "again"), "--no-verify"]) == 1
    assert one_line(errors(capsys)) == f"error: {bad}: '{OV[2]}' is a list, not a number; refusing it\n"
    assert not (tmp_path / "again" / "megapico-run").exists()
