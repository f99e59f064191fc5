"""tools/plot_run.py marks every resume (layout changes in red) and names the eval curve after the set it measured."""

import json

import matplotlib.pyplot as plt
import pytest
from plot_run import CHANGED_COLOR, RESUME_COLOR, VALID_SPLIT, eval_set_names, main, plot, read_records

from megapico.config import load_config, save_config


def _write_run(run_dir, eval_data_path, name="paloma"):
    """A run directory as pretrain.py leaves it after three launches: TP=1 x DP=2 for steps 1-20, a resume at the
    same layout (step 20), a resume at TP=2 x DP=1 with half the global batch (step 30); older records without
    "event" are mixed in as they were."""
    run_dir.mkdir()
    save_config(load_config(None, [f"data.eval_data_path={eval_data_path}", f"evaluation.name={name}"]),
                run_dir / "config.yaml")
    records = [{"step": 0, "event": "start", "layout": "TP=1 x DP=2", "global_batch": 16}]
    records += [{"step": s, "train/loss": 10 - s / 10, "trainer/learning_rate": 1e-3} for s in range(1, 21)]
    records += [{"step": 20, f"eval/{name}": 900.0},
                {"step": 20, "event": "resume", "layout": "TP=1 x DP=2", "global_batch": 16}]
    records += [{"step": s, "train/loss": 10 - s / 10, "trainer/learning_rate": 1e-3} for s in range(21, 31)]
    records += [{"step": 30, "event": "resume", "layout": "TP=2 x DP=1", "global_batch": 8}]
    records += [{"step": s, "train/loss": 10 - s / 10, "trainer/learning_rate": 1e-3} for s in range(31, 41)]
    records += [{"step": 40, f"eval/{name}": 500.0}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return run_dir


def _resume_lines(axis):
    return {line.get_gid(): line.get_color() for line in axis.get_lines() if (line.get_gid() or "").startswith(
        "resume@")}


def test_resumes_are_lines_labelled_with_the_layout(tmp_path):
    run = _write_run(tmp_path / "run", "[]")
    figure = plot(read_records(run / "metrics.jsonl"), "run", eval_set_names(run / "config.yaml"))
    axes = figure.axes
    assert len(axes) == 5  # loss, lr, grad norm, tokens/s, one eval set
    for axis in axes:  # every panel: one dashed line per resume, red where the layout or global batch changed
        assert _resume_lines(axis) == {"resume@20": RESUME_COLOR, "resume@30": CHANGED_COLOR}
    labels = {text.get_text(): text.get_color() for text in axes[0].texts}
    assert labels == {"resume TP=1 x DP=2, batch 16": RESUME_COLOR,
                      "resume TP=2 x DP=1, batch 8\n(was TP=1 x DP=2, batch 16)": CHANGED_COLOR}
    assert figure._suptitle.get_text() == "run (started at TP=1 x DP=2, global batch 16)"
    loss = next(line for line in axes[0].get_lines() if not line.get_gid())
    assert list(loss.get_xdata()) == list(range(1, 41))  # the event records are not points
    plt.close(figure)


@pytest.mark.parametrize("eval_data_path, title", [("[]", f"eval perplexity: {VALID_SPLIT}"),
                                                   ("[data/held_out_text_document]", "eval perplexity: paloma")])
def test_eval_curve_names_the_set_it_measured(tmp_path, eval_data_path, title):
    run = _write_run(tmp_path / "run", eval_data_path)
    figure = plot(read_records(run / "metrics.jsonl"), "run", eval_set_names(run / "config.yaml"))
    assert figure.axes[-1].get_title() == title
    plt.close(figure)


def test_records_without_events_and_a_missing_config(tmp_path, capsys):
    """A run from before launch records: no lines, no layout in the title; without config.yaml the eval curve keeps
    its metric key's name, with a warning, and the PNG is still drawn."""
    run = tmp_path / "old"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in (
        {"step": 1, "train/loss": 10.0}, {"step": 2, "train/loss": 9.0}, {"step": 2, "eval/wiki": 800.0})))
    figure = plot(read_records(run / "metrics.jsonl"), "old")
    assert all(not _resume_lines(axis) for axis in figure.axes) and not figure.axes[0].texts
    assert figure._suptitle.get_text() == "old" and figure.axes[-1].get_title() == "eval perplexity: wiki"
    plt.close(figure)
    assert main([str(run)]) == 0
    captured = capsys.readouterr()
    assert "config.yaml: config file not found" in captured.err and "named by their metric keys" in captured.err
    assert (run / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_main_draws_the_run(tmp_path, capsys):
    run = _write_run(tmp_path / "run", "[]")
    assert main([str(run), "--output", str(tmp_path / "out.png")]) == 0
    assert f"wrote {tmp_path / 'out.png'}" in capsys.readouterr().out
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_link_at_the_png_is_replaced_not_written_through(tmp_path, capsys):
    """A received run directory with metrics.png -> a file outside it: the plot replaces the link with its own
    file; the outside file keeps its bytes."""
    run = _write_run(tmp_path / "run", "[]")
    outside = tmp_path / "outside.txt"
    outside.write_text("not yours to overwrite")
    (run / "metrics.png").symlink_to(outside)
    assert main([str(run)]) == 0
    assert outside.read_text() == "not yours to overwrite"
    assert not (run / "metrics.png").is_symlink() and (run / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


def test_records_that_resolve_outside_the_run_are_refused(tmp_path, capsys):
    run = _write_run(tmp_path / "run", "[]")
    outside = tmp_path / "elsewhere.jsonl"
    (run / "metrics.jsonl").rename(outside)
    (run / "metrics.jsonl").symlink_to(outside)
    assert main([str(run)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run / 'metrics.jsonl'}: resolves to {outside}, outside {run}; refusing it")
    assert err.count("\n") == 1 and not (run / "metrics.png").exists()
