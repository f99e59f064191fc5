"""The off-path analysis runner (megapico/training/analysis_runner.py, its worker analysis_worker.py): its files equal
analyze() called directly on every step, submit() does not wait for the analysis, comparative metrics owed across a
stop and captures still queued at a stop are completed by the resumed run, once, a dead worker is one warning, a
pending file is whole or absent, and the worker runs on rank 0's GPU where there is one."""

import json
import signal
import time

import pytest
import torch

from megapico.analysis import analyze, flat_scalars, needed_for_targets, results_directory
from megapico.analysis.spec import parse_analysis
from megapico.checkpoint.files import read_checkpoint_file
from megapico.config import ConfigError, ModelConfig
from megapico.training.analysis_runner import AnalysisRunner
from megapico.training.analysis_worker import (
    PENDING_DIR,
    Analyst,
    _stop_between_writes,
    _Stopped,
    analysis_device,
    owed_steps,
)

MODEL = ModelConfig(d_model=16, n_layers=2, attention_n_heads=2, attention_n_kv_heads=1, activation_hidden_dim=32)
SUFFIXES = ("attention.v_proj", "attention.o_proj", "swiglu.w_2")
TARGET = 4
CLOSE_S = 120.0


def spec_of(target: int = TARGET):
    simple = {"component_name": "simple", "data_type": "weights", "layer_suffixes": "swiglu.w_2", "layers": [0, 1]}
    return parse_analysis({"analysis_name": "runner", "metrics": [
        {"metric_name": "norm", "data_split": "train", "norm_type": "frobenius", "components": [simple]},
        {"metric_name": "condition_number", "data_split": "val", "components": [
            {**simple, "data_type": "gradients", "layer_suffixes": "attention.o_proj"}]},
        {"metric_name": "cka", "data_split": "val", "target_checkpoint": target, "components": [
            {"component_name": "simple", "data_type": "activations", "layer_suffixes": "swiglu.w_2", "layers": [1]},
            {"component_name": "ov_circuit", "data_type": "activations", "layers": [0, 1],
             "layer_suffixes": {"value_layer": "attention.v_proj", "output_layer": "attention.o_proj"}}]},
    ]}, "runner.yaml")


def capture(seed: int, model: ModelConfig = MODEL, sequences: int = 24) -> dict:
    """A synthetic capture: {split: {kind: {"layers.{i}.{suffix}": fp32 tensor}}} of the model's shapes."""
    generator = torch.Generator().manual_seed(seed)
    d, head_dim = model.d_model, model.d_model // model.attention_n_heads
    shapes = {"attention.v_proj": (head_dim * model.attention_n_kv_heads, d), "attention.o_proj": (d, d),
              "swiglu.w_2": (d, model.activation_hidden_dim)}
    return {split: {kind: {f"layers.{i}.{suffix}": torch.randn(
        (sequences, shapes[suffix][0]) if kind == "activations" else shapes[suffix], generator=generator)
        for i in range(model.n_layers) for suffix in SUFFIXES} for kind in ("activations", "weights", "gradients")}
        for split in ("train", "val")}


def on_disk(run_dir, step: int) -> dict:
    directory = results_directory(run_dir, "runner", step)
    return {path.stem: json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))}


def expected(spec, captures: dict, step: int) -> dict:
    return analyze(spec, step, captures[step], {TARGET: captures[TARGET]}, MODEL)


def merged(returned: list) -> dict[int, dict]:
    """poll()/close() results by step; a key returned twice is a duplicate log record."""
    by_step: dict[int, dict] = {}
    for step, scalars in returned:
        assert not set(scalars) & set(by_step.get(step, {})), f"step {step} returned twice"
        by_step.setdefault(step, {}).update(scalars)
    return by_step


def test_runner_files_equal_analyze_on_every_step(tmp_path):
    spec = spec_of()
    captures = {step: capture(step) for step in (0, 2, 4, 6)}
    runner = AnalysisRunner(spec, tmp_path, MODEL)
    returned = []
    for step in captures:
        runner.submit(step, capture(step))
        returned += runner.poll()
    returned += runner.close(CLOSE_S)
    for step in captures:
        assert on_disk(tmp_path, step) == expected(spec, captures, step), step
        assert sorted(on_disk(tmp_path, step)) == ["cka_val", "condition_number_val", "norm_train"]
    assert merged(returned) == {step: flat_scalars(expected(spec, captures, step)) for step in captures}
    assert owed_steps(spec, tmp_path) == []
    assert sorted(path.name for path in (tmp_path / PENDING_DIR).iterdir()) == [f"target_{TARGET}.pt"]


def test_submit_returns_without_waiting_for_the_analysis(tmp_path):
    model = ModelConfig(d_model=128, n_layers=4, attention_n_heads=4, attention_n_kv_heads=2,
                        activation_hidden_dim=512)
    layers = {"layers": [0, 1, 2, 3]}
    spec = parse_analysis({"analysis_name": "runner", "metrics": [
        {"metric_name": name, "data_split": "train", "components": [
            {"component_name": "simple", "data_type": kind, "layer_suffixes": suffix, **layers}
            for kind in ("weights", "gradients") for suffix in SUFFIXES]} for name in ("per", "condition_number")]},
        "slow.yaml")
    dynamics = capture(0, model, sequences=256)
    started = time.perf_counter()
    analyze(spec, 0, dynamics, None, model)
    analyze_s = time.perf_counter() - started
    runner = AnalysisRunner(spec, tmp_path, model)
    try:
        started = time.perf_counter()
        runner.submit(0, dynamics)
        submit_s = time.perf_counter() - started
        assert runner.poll() == []  # not analyzed yet: submit did not wait for it
        assert submit_s < analyze_s / 5, (submit_s, analyze_s)
    finally:
        assert [step for step, _ in runner.close(CLOSE_S)] == [0]


def test_stopped_run_owes_comparative_metrics_and_the_resumed_run_completes_them(tmp_path):
    spec = spec_of()
    captures = {step: capture(step) for step in (0, 2, 4)}
    first = AnalysisRunner(spec, tmp_path, MODEL)
    for step in (0, 2):
        first.submit(step, capture(step))
    before = merged(first.close(CLOSE_S))
    assert owed_steps(spec, tmp_path) == [0, 2]
    for step in (0, 2):  # the single-step metrics are written and returned at once; cka waits for its target
        assert sorted(on_disk(tmp_path, step)) == ["condition_number_val", "norm_train"]
        assert set(before[step]) == set(flat_scalars(on_disk(tmp_path, step)))
        kept = read_checkpoint_file(tmp_path / PENDING_DIR / f"step_{step}.pt")["dynamics"]
        wanted = {(split, kind, key) for split, kind, suffix in needed_for_targets(spec) for key in
                  captures[step][split][kind] if key.endswith(suffix)}
        assert {(split, kind, key) for split, kinds in kept.items() for kind, tensors in kinds.items()
                for key in tensors} == wanted  # only what cka reads, not the capture
    resumed = AnalysisRunner(spec, tmp_path, MODEL)
    resumed.submit(2, capture(2))  # re-captured after the resume: nothing to write or log again
    resumed.submit(4, capture(4))
    after = merged(resumed.close(CLOSE_S))
    for step in (0, 2, 4):
        assert on_disk(tmp_path, step) == expected(spec, captures, step)
    assert after == {0: flat_scalars({"cka_val": on_disk(tmp_path, 0)["cka_val"]}),
                     2: flat_scalars({"cka_val": on_disk(tmp_path, 2)["cka_val"]}),
                     4: flat_scalars(expected(spec, captures, 4))}
    assert owed_steps(spec, tmp_path) == []
    assert not list((tmp_path / PENDING_DIR).glob("step_*"))


def test_a_resumed_run_completes_pending_steps_whose_target_is_already_kept(tmp_path):
    """Stopped after the target was kept but before the earlier steps were completed."""
    spec = spec_of()
    captures = {step: capture(step) for step in (0, 4)}
    analyst = Analyst(spec, tmp_path, MODEL)
    analyst.step(0, captures[0], print)
    analyst.complete_pending = lambda report: None  # the stop, between the target's file and the pending steps'
    analyst.step(4, captures[4], print)
    assert owed_steps(spec, tmp_path) == [0]
    runner = AnalysisRunner(spec, tmp_path, MODEL)
    assert merged(runner.close(CLOSE_S)) == {0: flat_scalars({"cka_val": expected(spec, captures, 0)["cka_val"]})}
    assert on_disk(tmp_path, 0) == expected(spec, captures, 0)
    assert owed_steps(spec, tmp_path) == []


def test_a_dead_worker_is_one_warning_and_training_goes_on(tmp_path, capsys):
    runner = AnalysisRunner(spec_of(), tmp_path, MODEL)
    runner.submit(0, {"val": {}})  # a capture the analysis cannot read: one warning, the worker goes on
    runner.submit(1, {"val": {"weights": {"layers.0.attention.o_proj": "not a tensor"}}})  # nor copy: one warning
    runner.submit(2, capture(2))
    deadline = time.monotonic() + CLOSE_S
    returned = []
    while not returned and time.monotonic() < deadline:
        returned = runner.poll()
        time.sleep(0.05)
    assert [step for step, _ in returned] == [2]
    out = capsys.readouterr().out
    assert out.count("warning: analysis: step 0 failed (KeyError") == 1, out
    assert out.count("warning: analysis: step 1 not analyzed, its capture could not be copied (AttributeError") == 1
    runner._process.kill()
    runner._process.join()
    assert runner.poll() == [] and runner.poll() == []
    runner.submit(4, capture(4))  # dropped, not raised
    assert runner.close(1.0) == []
    out = capsys.readouterr().out
    assert out.count("warning: analysis: the background process died (exit code -9)") == 1, out
    assert out.count("warning") == 1, out


def test_a_stop_while_writing_a_pending_file_leaves_the_old_file_or_none(tmp_path, monkeypatch):
    spec = spec_of()
    analyst = Analyst(spec, tmp_path, MODEL)
    pending = tmp_path / PENDING_DIR / "step_0.pt"

    def killed(obj, path):  # half the bytes, then the stop
        path.write_bytes(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    real_save = torch.save
    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        analyst.step(0, capture(0), print)
    assert list((tmp_path / PENDING_DIR).iterdir()) == []
    monkeypatch.setattr(torch, "save", real_save)
    analyst.step(0, capture(0), print)
    whole = pending.read_bytes()
    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        analyst.step(0, capture(0), print)
    assert [path.name for path in (tmp_path / PENDING_DIR).iterdir()] == ["step_0.pt"]
    assert pending.read_bytes() == whole
    assert owed_steps(spec, tmp_path) == [0]


def test_a_stop_keeps_the_queued_captures_and_the_next_runner_completes_them_once(tmp_path, capsys):
    """close(0) (a stop) right after the submits, before the worker has started: every queued capture (the comparative
    target's among them) is kept whole in the pending area, owing every metric, and the next runner on the run
    directory writes and returns each result once, equal to analyze() on the capture."""
    spec = spec_of()
    captures = {step: capture(step) for step in (0, 2, 4, 6)}
    first = AnalysisRunner(spec, tmp_path, MODEL)
    for step in (0, 2, TARGET):
        first.submit(step, capture(step))
    assert first.close(0.0) == []
    assert "analysis: steps 0, 2, 4 not analyzed yet: kept in" in capsys.readouterr().out
    assert owed_steps(spec, tmp_path) == [0, 2, 4] and not (tmp_path / "analysis_results").exists()
    kept = read_checkpoint_file(tmp_path / PENDING_DIR / "step_2.pt")
    assert kept["owes"] == ["norm_train", "condition_number_val", "cka_val"]
    assert torch.equal(kept["dynamics"]["val"]["gradients"]["layers.1.attention.o_proj"],
                       captures[2]["val"]["gradients"]["layers.1.attention.o_proj"])
    assert "layers.0.swiglu.w_2" not in kept["dynamics"]["val"]["gradients"]  # only what the spec reads
    resumed = AnalysisRunner(spec, tmp_path, MODEL)
    resumed.submit(6, capture(6))
    returned = merged(resumed.close(CLOSE_S))
    assert returned == {step: flat_scalars(expected(spec, captures, step)) for step in captures}
    for step in captures:
        assert on_disk(tmp_path, step) == expected(spec, captures, step)
    assert owed_steps(spec, tmp_path) == [] and not list((tmp_path / PENDING_DIR).glob("step_*"))


def test_a_worker_stopped_mid_analysis_leaves_every_written_result_reported(tmp_path):
    """SIGTERM while a result is being written and reported: the write and its message finish first, then the worker
    ends (a result on disk is a result logged); outside that, SIGTERM ends the analysis at once."""
    analyst = Analyst(spec_of(), tmp_path, MODEL)
    _stop_between_writes(analyst)
    reported = []

    def report(message):
        if message[0] == "result":
            signal.raise_signal(signal.SIGTERM)  # arrives inside the write: held until the message is out
        reported.append(message)

    try:
        with pytest.raises(_Stopped):
            analyst.step(0, capture(0), report)
        assert [message[0] for message in reported] == ["result"]
        assert set(reported[0][2]) == set(flat_scalars(on_disk(tmp_path, 0)))
        with pytest.raises(_Stopped):
            signal.raise_signal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.mark.parametrize("setting, training, chosen", [
    ("auto", "cpu", "cpu"), ("auto", "cuda:3", "cuda:3"), ("cpu", "cuda:1", "cpu"), ("cuda", "cuda:0", "cuda:0"),
    ("cuda", "cuda", "cuda:0")])
def test_the_analysis_device_is_rank_0s_gpu_or_the_cpu(setting, training, chosen):
    assert analysis_device(setting, torch.device(training)) == torch.device(chosen)


def test_a_cuda_analysis_without_a_gpu_is_one_line():
    with pytest.raises(ConfigError, match="analysis_device=cuda, but this run trains on cpu; set it to auto or cpu"):
        analysis_device("cuda", torch.device("cpu"))
