"""Learning dynamics as the run goes (issue 33): captures every learning_dynamics.interval steps feed the analysis,
store nothing, compute only the kinds the analysis reads and change no training step; the analysis config is refused
at launch; a stop during step 0's capture leaves a run the same command starts afresh."""

import json

import numpy as np
import pytest
import torch
from conftest import training_overrides as overrides
from distributed import train

from megapico.analysis import load_analysis
from megapico.config import ConfigError, ModelConfig, load_config
from megapico.model import PicoDecoder
from megapico.training.captures import captured_steps, check_learning_dynamics, kinds_read
from megapico.training.learning_dynamics import capture_learning_dynamics
from megapico.training.logger import RunLogger, keep_records_up_to

RUN = ("runs", "megapico-run")
ANALYSIS = """analysis_name: live
metrics:
  - metric_name: norm
    data_split: val
    norm_type: frobenius
    components:
      - {component_name: simple, data_type: weights, layer_suffixes: swiglu.w_2, layers: [0, 1]}
  - metric_name: cka
    data_split: val
    target_checkpoint: 4
    components:
      - {component_name: simple, data_type: activations, layer_suffixes: attention.v_proj, layers: [0]}
"""

ACTIVATIONS_ONLY = """analysis_name: live
metrics:
  - metric_name: cka
    data_split: val
    target_checkpoint: 4
    components:
      - {component_name: simple, data_type: activations, layer_suffixes: attention.v_proj, layers: [0]}
  - metric_name: gini
    data_split: train
    components:
      - {component_name: simple, data_type: activations, layer_suffixes: swiglu.w_2, layers: [0, 1]}
"""
OV_CIRCUIT = """analysis_name: live
metrics:
  - metric_name: norm
    data_split: train
    norm_type: nuclear
    components:
      - component_name: ov_circuit
        data_type: gradients
        layers: [0]
        layer_suffixes: {value_layer: attention.v_proj, output_layer: attention.o_proj}
"""


def analysis_file(tmp_path, text=ANALYSIS):
    path = tmp_path / "analysis.yaml"
    path.write_text(text)
    return str(path)


def with_dynamics(sample_prefix, root, analysis, **changes):
    return overrides(sample_prefix, root, **{"checkpointing.learning_dynamics.enabled": True,
                                             "checkpointing.learning_dynamics.batch_size": 12,
                                             "checkpointing.learning_dynamics.analysis": analysis, **changes})


def records(root):
    return [json.loads(line) for line in root.joinpath(*RUN, "metrics.jsonl").read_text().splitlines()]


def losses(root):
    return {r["step"]: r["train/loss"] for r in records(root) if "train/loss" in r}


def final_weights(root):
    state = torch.load(root.joinpath(*RUN, "checkpoints", "step_5", "mp_rank_00_model_states.pt"),
                       weights_only=False)
    return state["module"]


def test_interval_captures_equal_checkpoint_captures_and_change_no_step(sample_prefix, tmp_path, capfd):
    """DP=2: captures every 2 steps without checkpoints vs checkpoints every 2 steps vs no capture at all: the same
    losses and final weights (bit for bit), the same analysis at every captured step, and no learning dynamics
    stored between checkpoints; a launch stopped before a comparative target completes the owed steps after it,
    and one killed before its last analysis completes it from the checkpoint."""
    analysis = analysis_file(tmp_path)
    interval, saved, plain = tmp_path / "interval", tmp_path / "saved", tmp_path / "plain"
    train(2, with_dynamics(sample_prefix, interval, analysis, **{"checkpointing.learning_dynamics.interval": 2}),
          tmp_path)
    train(2, with_dynamics(sample_prefix, saved, analysis, **{"checkpointing.save_interval": 2}), tmp_path)
    train(2, overrides(sample_prefix, plain), tmp_path)  # no learning dynamics at all

    def analyzed(root):
        return {(r["step"], key): value for r in records(root) if r.get("analysis") == "live"
                for key, value in r.items() if "/" in key}

    assert losses(interval) == losses(saved) == losses(plain) and len(losses(interval)) == 5
    weights = final_weights(interval)
    for reference in final_weights(saved), final_weights(plain):
        assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights)
    assert analyzed(interval) == analyzed(saved)
    assert {step for step, key in analyzed(interval) if key.startswith("norm_val/")} == {0, 2, 4, 5}
    assert {step for step, key in analyzed(interval) if key.startswith("cka_val/")} == {0, 2, 4, 5}
    checkpoints = sorted(path.name for path in interval.joinpath(*RUN, "checkpoints").glob("step_*"))
    assert checkpoints == ["step_0", "step_5"]  # the interval captures stored nothing
    results = interval.joinpath(*RUN, "analysis_results", "live")
    assert sorted(path.name for path in results.iterdir()) == ["step_0", "step_2", "step_4", "step_5"]

    # stopped at step 3 (exit_interval) with steps 0, 2 and 3 owing cka against step 4: the next launch completes them
    exited = tmp_path / "exited"
    settings = with_dynamics(sample_prefix, exited, analysis, **{"checkpointing.learning_dynamics.interval": 2,
                                                                  "training.exit_interval": 3})
    train(2, settings, tmp_path)
    assert {step for step, key in analyzed(exited) if key.startswith("cka_val/")} == set()
    capfd.readouterr()
    assert train(2, settings, tmp_path)["resumed_from"] == 3
    assert "analysis live: steps 0, 2, 3 owe comparative metrics" in capfd.readouterr().out
    assert {k: v for k, v in analyzed(exited).items() if k[0] != 3} == analyzed(saved)
    assert {step for step, key in analyzed(exited) if key.startswith("cka_val/")} == {0, 2, 3, 4, 5}

    # killed before step 5's analysis was written: the same command completes it from the checkpoint's capture
    written = {path.name: path.read_text() for path in (results / "step_5").iterdir()}
    for path in (results / "step_5").iterdir():
        path.unlink()
    kept = [line for line in interval.joinpath(*RUN, "metrics.jsonl").read_text().splitlines()
            if not (json.loads(line).get("analysis") and json.loads(line)["step"] == 5)]
    interval.joinpath(*RUN, "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    assert train(2, with_dynamics(sample_prefix, interval, analysis, **{"checkpointing.learning_dynamics.interval": 2}),
                 tmp_path)["resumed_from"] == 5
    assert {path.name: path.read_text() for path in (results / "step_5").iterdir()} == written
    assert analyzed(interval) == analyzed(saved)
    assert sum(1 for r in records(interval) if r.get("analysis") and r["step"] == 5) == 1


def test_an_activations_only_analysis_takes_forward_only_captures_with_the_full_captures_results(sample_prefix,
                                                                                                  tmp_path):
    """DP=2, an analysis reading only activations (both splits): its interval captures (forward only, no gradients,
    no weights) give the results the full captures of checkpoints give, file for file, and the same training."""
    analysis = analysis_file(tmp_path, ACTIVATIONS_ONLY)
    interval, saved = tmp_path / "interval", tmp_path / "saved"
    train(2, with_dynamics(sample_prefix, interval, analysis, **{"checkpointing.learning_dynamics.interval": 2}),
          tmp_path)
    train(2, with_dynamics(sample_prefix, saved, analysis, **{"checkpointing.save_interval": 2}), tmp_path)
    assert losses(interval) == losses(saved) and len(losses(interval)) == 5
    weights, reference = final_weights(interval), final_weights(saved)
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights)
    assert sorted(path.name for path in interval.joinpath(*RUN, "checkpoints").glob("step_*")) == ["step_0", "step_5"]
    results = {root: root.joinpath(*RUN, "analysis_results", "live") for root in (interval, saved)}
    for step in (2, 4):  # captured for the analysis alone in one run, at a checkpoint in the other
        written = {path.name: path.read_text() for path in (results[interval] / f"step_{step}").iterdir()}
        assert sorted(written) == ["cka_val.json", "gini_train.json"]
        assert written == {path.name: path.read_text() for path in (results[saved] / f"step_{step}").iterdir()}


def test_the_analysis_reads_name_the_kinds_an_analysis_only_capture_computes(tmp_path):
    assert kinds_read(load_analysis(analysis_file(tmp_path))) == {"val": {"weights", "activations"}}
    assert kinds_read(load_analysis(analysis_file(tmp_path, ACTIVATIONS_ONLY))) == {
        "train": {"activations"}, "val": {"activations"}}
    # an ov_circuit component reads its layers' weights besides its data type
    assert kinds_read(load_analysis(analysis_file(tmp_path, OV_CIRCUIT))) == {"train": {"gradients", "weights"}}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-mixed"])
def test_a_capture_of_some_kinds_is_those_of_the_full_capture_and_runs_only_the_passes_they_need(precision,
                                                                                               monkeypatch):
    """Bit for bit the full capture's tensors, split into micro batches of two lengths; without gradients the layers
    run under no_grad and the head and loss never run (so no backward); weights alone run no pass at all."""
    torch.manual_seed(3)
    model = PicoDecoder(ModelConfig(d_model=32, n_layers=2, attention_n_heads=4, attention_n_kv_heads=2,
                                    activation_hidden_dim=64, vocab_size=256, max_seq_len=32))
    rng = np.random.default_rng(0)
    sequences = [*rng.integers(0, 256, (5, 17)), *rng.integers(0, 256, (3, 9))]
    full = capture_learning_dynamics(model, sequences, micro_batch_size=2, precision=precision)
    calls = []

    def recorded(name, method):
        def call(*args, **kwargs):
            calls.append((name, torch.is_grad_enabled()))
            return method(*args, **kwargs)
        return call

    monkeypatch.setattr(PicoDecoder, "forward", recorded("forward", PicoDecoder.forward))
    monkeypatch.setattr(PicoDecoder, "hidden_states", recorded("hidden_states", PicoDecoder.hidden_states))
    for kinds, passes in [(("activations",), {("hidden_states", False)}), (("weights",), set()),
                          (("gradients", "activations"), {("forward", True), ("hidden_states", True)}),
                          (("weights", "activations"), {("hidden_states", False)})]:
        calls.clear()
        part = capture_learning_dynamics(model, sequences, micro_batch_size=2, precision=precision, kinds=kinds)
        assert set(calls) == passes, kinds
        assert list(part) == [kind for kind in full if kind in kinds]
        for kind in kinds:
            assert part[kind].keys() == full[kind].keys()
            assert all(torch.equal(part[kind][key], full[kind][key]) for key in full[kind]), (kinds, kind)
    with pytest.raises(ValueError, match=r"kinds must be among activations, weights, gradients, got \['logits'\]"):
        capture_learning_dynamics(model, sequences, micro_batch_size=2, kinds=("logits",))


@pytest.mark.parametrize("changes, message", [
    ({"checkpointing.learning_dynamics.interval": 3},
     r"analysis.yaml: metrics\[1\].target_checkpoint: the run never captures step 4"),
    ({"checkpointing.learning_dynamics.enabled": False},
     r"checkpointing.learning_dynamics.analysis=.*analysis.yaml analyzes the learning dynamics, which "
     r"checkpointing.learning_dynamics.enabled=false turns off"),
    ({"checkpointing.learning_dynamics.analysis": "''", "checkpointing.learning_dynamics.interval": 2},
     r"checkpointing.learning_dynamics.interval=2 captures for the analysis alone, and "
     r"checkpointing.learning_dynamics.analysis is empty"),
    ({"model.n_layers": 1, "checkpointing.learning_dynamics.interval": 2},
     r"metrics\[0\].components\[0\].layers: the model has no layer 1"),
])
def test_an_analysis_the_run_cannot_do_is_one_line_at_launch(sample_prefix, tmp_path, changes, message):
    settings = with_dynamics(sample_prefix, tmp_path, analysis_file(tmp_path), **changes)
    with pytest.raises(ConfigError, match=message) as caught:
        check_learning_dynamics(load_config(None, settings), val_sequences=12, global_batch=4)
    assert "\n" not in str(caught.value)


def test_the_checked_steps_are_the_steps_the_loop_captures(sample_prefix, tmp_path):
    config = load_config(None, overrides(sample_prefix, tmp_path, **{
        "training.max_steps": 20, "checkpointing.save_interval": 7, "training.exit_interval": 9,
        "checkpointing.learning_dynamics.interval": 4}))
    captured = captured_steps(config)
    assert [step for step in range(-1, 30) if captured(step)] == [0, 4, 7, 8, 9, 12, 14, 16, 18, 20]


def test_a_launch_check_failure_trains_nothing(sample_prefix, tmp_path):
    analysis = analysis_file(tmp_path)
    with pytest.raises(Exception, match="the run never captures step 4"):
        train(1, with_dynamics(sample_prefix, tmp_path, analysis, **{"checkpointing.learning_dynamics.interval": 3}),
              tmp_path)
    assert not tmp_path.joinpath(*RUN).exists()  # refused before step 0's capture: nothing left


@pytest.mark.parametrize("resume", ["auto", "false"])
def test_a_stop_during_step_0s_capture_leaves_a_run_the_same_command_restarts(sample_prefix, tmp_path, capfd,
                                                                              resume):
    """The first minute of a new run, stopped while step 0's learning dynamics were written: half of them on disk,
    no manifest (and, in another stop, megapico_state.json without one)."""
    checkpoints = tmp_path.joinpath(*RUN, "checkpoints")
    step_0 = checkpoints / "step_0"
    (step_0 / "learning_dynamics").mkdir(parents=True)
    (step_0 / "learning_dynamics" / "train_activations.pt").write_bytes(b"half")
    (checkpoints / "step_2").mkdir()
    (checkpoints / "step_2" / "megapico_state.json").write_text(json.dumps({"step": 2, "consumed_samples": 8}))
    settings = overrides(sample_prefix, tmp_path, **{"checkpointing.learning_dynamics.enabled": True,
                                                     "checkpointing.learning_dynamics.batch_size": 8,
                                                     "training.max_steps": 3, "checkpointing.resume": resume})
    result = train(1, settings, tmp_path)
    out = capfd.readouterr().out
    assert result["resumed_from"] is None and sorted(result["losses"]) == [1, 2, 3]
    assert (f"starting afresh: {checkpoints} holds only half-written checkpoints (step_0, step_2: saves a stop or "
            f"crash cut short, never resumed from); removing them") in out
    assert sorted(path.name for path in checkpoints.glob("step_*")) == ["step_0", "step_3"]
    assert (step_0 / "manifest.json").is_file() and (step_0 / "learning_dynamics" / "val_weights.pt").is_file()
    assert train(1, settings if resume == "auto" else settings[:-1], tmp_path)["resumed_from"] == 3


def test_analysis_results_are_logged_at_their_step_and_kept_on_resume(tmp_path):
    """Results arrive after training moved on: metrics.jsonl gets them at their step; wandb, whose own step only
    grows, plots them against analysis/step, one capture per row; a resume before their step keeps them (the
    runner does not report written results again)."""
    logged, defined = [], []

    class Run:
        def log(self, metrics, step):
            logged.append((step, metrics))

        def define_metric(self, name, step_metric=None):
            defined.append((name, step_metric))

        def finish(self):
            pass

    logger = RunLogger.__new__(RunLogger)
    logger.is_writer, logger.metrics_path, logger.wandb, logger.service = True, tmp_path / "m.jsonl", Run(), None
    logger.wandb_step, logger.analysis_rows, logger.analysis_keys = 7, [], set()
    key = "cka_val/layers.0.attention.v_proj"
    logger.log_analysis(2, "live", {key: 0.5})
    logger.log_analysis(4, "live", {key: 0.7})
    logger._wandb_log({"train/loss": 1.0}, 8)
    logger.finish()
    assert defined == [("analysis/step", None), ("cka_val/*", "analysis/step")]
    assert logged == [(8, {"train/loss": 1.0, "analysis/step": 2, key: 0.5}), (9, {"analysis/step": 4, key: 0.7})]
    with logger.metrics_path.open("a") as handle:
        handle.write(json.dumps({"step": 3, "train/loss": 2.0}) + "\n")
    keep_records_up_to(logger.metrics_path, 1)
    assert [json.loads(line) for line in logger.metrics_path.read_text().splitlines()] == [
        {"step": 2, "analysis": "live", key: 0.5}, {"step": 4, "analysis": "live", key: 0.7}]


def test_captures_queued_at_a_stop_are_analyzed_by_the_resumed_run_once(sample_prefix, tmp_path):
    """Captures every 2 steps; the first launch ends right after step 1 without waiting for its analysis
    (exit_interval=1 with wait_at_end_s=0: the runner closes as at a stop), its captures of steps 0 and 1 queued or
    analyzed by then, as the worker's start-up allows (tests/test_analysis_runner.py stops a runner before its worker
    starts: the queued path for certain). Nothing is lost either way: the resumed launch writes every step's results
    once, equal to an uninterrupted run's, and metrics.jsonl holds each result once."""
    analysis, whole, stopped = analysis_file(tmp_path), tmp_path / "whole", tmp_path / "stopped"
    every_2 = {"checkpointing.learning_dynamics.interval": 2}
    train(1, with_dynamics(sample_prefix, whole, analysis, **every_2), tmp_path)
    settings = with_dynamics(sample_prefix, stopped, analysis, **every_2)
    train(1, [*settings, "training.exit_interval=1", "checkpointing.learning_dynamics.wait_at_end_s=0"], tmp_path)
    assert train(1, settings, tmp_path)["resumed_from"] == 1

    def analyzed(root):
        return {(r["step"], key): value for r in records(root) if r.get("analysis") == "live"
                for key, value in r.items() if "/" in key}

    results = {root: root.joinpath(*RUN, "analysis_results", "live") for root in (whole, stopped)}
    assert sorted(path.name for path in results[stopped].iterdir()) == [f"step_{n}" for n in (0, 1, 2, 4, 5)]
    for step in (0, 2, 4, 5):
        assert {path.name: path.read_text() for path in (results[stopped] / f"step_{step}").iterdir()} == {
            path.name: path.read_text() for path in (results[whole] / f"step_{step}").iterdir()}, step
    assert {k: v for k, v in analyzed(stopped).items() if k[0] != 1} == analyzed(whole)
    logged = [(r["step"], key) for r in records(stopped) if r.get("analysis") for key in r if "/" in key]
    assert len(logged) == len(set(logged))  # no result logged twice
    assert not list(stopped.joinpath(*RUN, "analysis_pending").glob("step_*"))
