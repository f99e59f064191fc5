"""Learning dynamics, tools/convert_to_hf.py and tools/convert_from_hf.py on a TP=2 x DP=2 ZeRO-2 run."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from conftest import TOKENIZER, training_overrides
from convert_from_hf import main as from_hf_main
from convert_to_hf import main as to_hf_main
from distributed import train
from safetensors.torch import load_file
from tokenizers import Tokenizer, models

from megapico.checkpoint.manifest import write_manifest
from megapico.convert import hf_export
from megapico.convert.checkpoint_reader import CheckpointError, load_checkpoint
from megapico.convert.convert import export_checkpoint
from megapico.data.builders import build_dataset
from megapico.model import PicoDecoder
from megapico.training.learning_dynamics import (
    SUFFIXES,
    capture_learning_dynamics,
    first_sequences,
    next_global_batch,
)

LD_BATCH = 6


@pytest.fixture(scope="module")
def run(sample_prefix, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp2dp2")
    train(4, training_overrides(sample_prefix, tmp, **{
        "parallel.tensor_parallel_size": 2, "training.micro_batch_size": 2, "training.max_steps": 3,
        "checkpointing.save_interval": 2, "checkpointing.learning_dynamics.enabled": True,
        "checkpointing.learning_dynamics.batch_size": LD_BATCH, "evaluation.interval": 2}), tmp)
    return tmp / "runs" / "megapico-run"


def _logits_gap(model_dir, checkpoint, trust_remote_code):
    from transformers import AutoModelForCausalLM

    reference = PicoDecoder(checkpoint.config.model)
    reference.load_state_dict(checkpoint.state_dict)
    exported = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    input_ids = torch.randint(0, checkpoint.config.model.vocab_size, (3, 17))
    with torch.no_grad():
        return exported, (exported(input_ids).logits - reference(input_ids)).abs().max().item()


def test_pico_hf_export_equals_megapico_tp1(run, tmp_path):
    checkpoint = load_checkpoint(run / "checkpoints" / "latest")
    assert checkpoint.step == 3 and checkpoint.source == "fp32 master weights from 4 ZeRO partitions"
    assert to_hf_main(["--checkpoint", str(run / "checkpoints" / "latest"), "--output", str(tmp_path / "hf")]) == 0
    files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors", "pico_decoder.py",
                     "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "pico_decoder" and config["architectures"] == ["PicoDecoderHF"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "pico_decoder.PicoDecoderHF"
    assert (config["d_model"], config["n_layers"], config["torch_dtype"]) == (96, 2, "float32")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    assert set(weights) == {f"pico_decoder.{k}" for k in checkpoint.state_dict}
    assert all(v.dtype == torch.float32 for v in weights.values())
    model, gap = _logits_gap(tmp_path / "hf", checkpoint, trust_remote_code=True)
    assert type(model).__name__ == "PicoDecoderHF" and gap < 1e-5


def test_llama_export_equals_megapico_tp1(run, tmp_path):
    checkpoint = load_checkpoint(run / "checkpoints" / "step_2")
    assert to_hf_main(["--checkpoint", str(checkpoint.directory), "--output", str(tmp_path / "llama"),
                       "--format", "llama"]) == 0
    assert not (tmp_path / "llama" / "pico_decoder.py").exists()
    model, gap = _logits_gap(tmp_path / "llama", checkpoint, trust_remote_code=False)
    assert type(model).__name__ == "LlamaForCausalLM" and gap < 1e-5


def test_round_trip_hf_to_megapico_tp2_to_hf_and_continue_training(run, sample_prefix, tmp_path):
    assert to_hf_main(["--checkpoint", str(run / "checkpoints" / "latest"), "--output", str(tmp_path / "a")]) == 0
    continued = training_overrides(sample_prefix, tmp_path, **{"parallel.tensor_parallel_size": 2,
                                                               "checkpointing.run_name": "continued",
                                                               "training.max_steps": 1,
                                                               "training.lr_warmup_steps": 0})
    assert from_hf_main(["--hf", str(tmp_path / "a"), *continued]) == 0
    step0 = tmp_path / "runs" / "continued" / "checkpoints" / "step_0"
    assert json.loads((step0 / "megapico_state.json").read_text())["tensor_parallel_size"] == 2
    # convert_from_hf's run keeps no tokenizer of its own, and its config names one outside it: name it
    assert to_hf_main(["--checkpoint", str(step0), "--output", str(tmp_path / "b"), "--tokenizer", str(TOKENIZER)]) == 0
    first, second = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    # pretrain.py picks the converted checkpoint up (here at TP=1: resharded on load)
    result = train(1, [item for item in continued if not item.startswith("parallel.")], tmp_path)
    assert result["resumed_from"] == 0 and len(result["losses"]) == 1


def test_learning_dynamics_files_and_values(run, sample_prefix):
    """pico-train's meaning at TP=2 x DP=2 (global batch 4): step_N's train split is the batch step N + 1 trains,
    its val split the first LD_BATCH eval samples; both equal a one-process TP=1 capture of the same weights."""
    import datasets

    config = load_checkpoint(run / "checkpoints" / "step_2").config
    data = config.data
    train_ds = build_dataset(data.train_data_path, "train", 3 * 4, data.seq_len, data.seed, data.split)
    eval_ds = build_dataset(data.train_data_path, "valid", 4, data.seq_len, data.seed, data.split)
    names = {f"layers.{i}.{suffix}" for i in range(2) for suffix in SUFFIXES}
    out_features = {"attention.v_proj": 32, "attention.o_proj": 96, "swiglu.w_2": 96}
    for step in (0, 2, 3):
        directory = run / "checkpoints" / f"step_{step}" / "learning_dynamics"
        for split, rows in (("train", 4), ("val", LD_BATCH)):
            for kind in ("activations", "weights", "gradients"):
                tensors = torch.load(directory / f"{split}_{kind}.pt")
                assert set(tensors) == names
                for name, tensor in tensors.items():
                    assert tensor.dtype == torch.float32
                    suffix = name.split(".", 2)[2]
                    if kind == "activations":
                        assert tensor.shape == (rows, out_features[suffix])
        upcoming = next_global_batch(train_ds, 4 * step, 4)
        saved = datasets.load_from_disk(str(directory / "train_data"))
        assert saved.column_names == ["input_ids", "text"]
        assert np.array_equal(np.asarray(saved["input_ids"]), upcoming)  # the batch of step N + 1, whole
        assert saved["text"][0] == Tokenizer.from_file(str(TOKENIZER)).decode(upcoming[0].tolist())
    checkpoint = load_checkpoint(run / "checkpoints" / "step_2")
    model = PicoDecoder(checkpoint.config.model)
    model.load_state_dict(checkpoint.state_dict)
    for split, sequences in (("train", next_global_batch(train_ds, 8, 4)), ("val", first_sequences(eval_ds, 6))):
        expected = capture_learning_dynamics(model, sequences, micro_batch_size=2)
        for kind in ("activations", "weights", "gradients"):
            saved = torch.load(run / "checkpoints" / "step_2" / "learning_dynamics" / f"{split}_{kind}.pt")
            for name in names:
                torch.testing.assert_close(saved[name], expected[kind][name], atol=1e-5, rtol=1e-4,
                                           msg=f"{split} {kind} {name}")


def test_run_dir_for_pico_analyze(run, tmp_path):
    assert to_hf_main(["--run-dir", str(run), "--output", str(tmp_path / "pico_runs")]) == 0
    out = tmp_path / "pico_runs" / "megapico-run"
    training_config = yaml.safe_load((out / "training_config.yaml").read_text())
    assert set(training_config) == {"data", "model", "training", "evaluation", "monitoring", "checkpointing"}
    assert (training_config["model"]["d_model"], training_config["model"]["attention_n_heads"],
            training_config["model"]["attention_n_kv_heads"]) == (96, 12, 4)
    assert training_config["checkpointing"]["run_name"] == "megapico-run"
    latest = out / "checkpoints" / "latest"
    assert latest.is_symlink() and latest.resolve().name == "step_3"
    for step in (0, 2, 3):
        step_dir = out / "checkpoints" / f"step_{step}"
        assert (step_dir / "model.safetensors").is_file() and (step_dir / "pico_decoder.py").is_file()
        assert (step_dir / "learning_dynamics" / "val_gradients.pt").is_file()
    for step in (2, 3):
        assert set(json.loads((out / "eval_results" / f"step_{step}.json").read_text())) == {"valid"}


def _copy_step(run, tmp_path, step):
    target = tmp_path / f"step_{step}"
    shutil.copytree(run / "checkpoints" / f"step_{step}", target)
    return target


def test_conversion_errors(run, tmp_path, capsys, monkeypatch):
    def convert(checkpoint, *extra):
        code = to_hf_main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out"), *extra])
        return code, capsys.readouterr().err

    broken = _copy_step(run, tmp_path, 3)
    (broken / "zero_pp_rank_1_mp_rank_01_optim_states.pt").unlink()
    assert f"step_3 fails verification: {broken / 'zero_pp_rank_1_mp_rank_01_optim_states.pt'}: missing" in \
        convert(broken)[1]  # the manifest catches it before any file is opened
    write_manifest(broken, 2)  # a manifest re-made after the damage: the layout checks still catch it
    assert "3 ZeRO shards, TP=2 x DP=2 needs 4" in convert(broken)[1]
    broken = _copy_step(run, tmp_path / "b", 3)
    (broken / "mp_rank_01_model_states.pt").unlink()
    write_manifest(broken, 2)
    assert "missing TP shard 1 of 2" in convert(broken)[1]
    mixed = _copy_step(run, tmp_path / "c", 3)
    shutil.copyfile(run / "checkpoints" / "step_2" / "mp_rank_01_model_states.pt", mixed / "mp_rank_01_model_states.pt")
    assert "mp_rank_01_model_states.pt: " in convert(mixed)[1]
    write_manifest(mixed, 2)
    assert "from step 2, but the checkpoint is step 3" in convert(mixed)[1]
    stray = _copy_step(run, tmp_path / "d", 3)
    shutil.copyfile(stray / "mp_rank_00_model_states.pt", stray / "mp_rank_02_model_states.pt")
    assert "a shard of another TP size" in convert(stray)[1]
    assert "no such checkpoint" in convert(tmp_path / "nothing")[1]
    weights_only = _copy_step(run, tmp_path / "e", 3)
    for zero_file in weights_only.glob("zero_pp_rank_*"):
        zero_file.unlink()
    write_manifest(weights_only, 2)
    checkpoint = load_checkpoint(weights_only)  # no ZeRO partitions: the module weights DeepSpeed saved per TP rank
    assert checkpoint.source.startswith("module weights")
    master = load_checkpoint(run / "checkpoints" / "step_3").state_dict
    assert all(torch.equal(checkpoint.state_dict[k], master[k]) for k in master)  # fp32 run: the same numbers

    big = Tokenizer(models.WordLevel({f"t{i}": i for i in range(60_000)}, unk_token="t0"))
    big.save(str(tmp_path / "big.json"))
    code, err = convert(run / "checkpoints" / "latest", "--tokenizer", str(tmp_path / "big.json"))
    assert code == 1 and "60000 tokens, more than the model's vocab_size 50304" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))

    # a converter bug (no RoPE permutation for Llama) is caught by the logits check, and nothing is left behind
    monkeypatch.setattr(hf_export, "interleaved_to_rotate_half", lambda weight, head_dim: weight)
    code, err = convert(run / "checkpoints" / "latest", "--format", "llama")
    assert code == 1 and "verification failed" in err and not (tmp_path / "out").exists()
    monkeypatch.undo()

    assert convert(run / "checkpoints" / "latest")[0] == 0
    code, err = convert(run / "checkpoints" / "latest")
    assert code == 1 and "already exists (pass --overwrite" in err
    assert convert(run / "checkpoints" / "latest", "--overwrite")[0] == 0


def test_converter_checks_generation_with_the_cache(run, tmp_path, monkeypatch):
    """An export with a classic cache bug (SDPA's is_causal with one query against the whole cache aligns the mask
    top-left, so the new token sees only the first key) passes the logits check (no cache there) but not the
    generation check, and nothing is written. The q/k weights are scaled up so that attention is peaked (after 3
    steps from init it is near-uniform, and which keys it sees barely matters)."""
    checkpoint = load_checkpoint(run / "checkpoints" / "latest")
    for key, value in checkpoint.state_dict.items():
        if key.endswith(("q_proj.weight", "k_proj.weight")):
            checkpoint.state_dict[key] = value * 8
    assert export_checkpoint(checkpoint, tmp_path / "good") <= 1e-4  # the real file passes
    source = hf_export.MODELLING_FILE.read_text()
    broken = tmp_path / "pico_decoder_hf.py"
    broken.write_text(source.replace("is_causal=seq > 1", "is_causal=True"))
    assert broken.read_text() != source
    monkeypatch.setattr(hf_export, "MODELLING_FILE", broken)
    with pytest.raises(CheckpointError, match=r"greedy generate \(use_cache=True\)"):
        export_checkpoint(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_generate_tool_from_a_tp2_dp2_checkpoint_equals_the_hf_export(run, tmp_path, capsys):
    from generate import main as generate_main

    step = run / "checkpoints" / "step_3"
    assert to_hf_main(["--checkpoint", str(step), "--output", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    texts = {}
    for source in (["--checkpoint", str(step)], ["--hf", str(tmp_path / "hf")]):
        assert generate_main([*source, "--prompt", "The river", "--max-new-tokens", "12"]) == 0
        texts[source[0]] = capsys.readouterr().out
    assert texts["--checkpoint"] == texts["--hf"] and texts["--checkpoint"].startswith("The river")
    assert generate_main(["--checkpoint", str(step), "--prompt", "The river", "--temperature", "0.9", "--top-p",
                          "0.9", "--seed", "1"]) == 0
    sampled = capsys.readouterr().out
    assert generate_main(["--checkpoint", str(step), "--prompt", "The river", "--temperature", "0.9", "--top-p",
                          "0.9", "--seed", "1"]) == 0
    assert capsys.readouterr().out == sampled  # seeded
    assert generate_main(["--checkpoint", str(tmp_path / "missing"), "--prompt", "x"]) == 1
    assert "no such checkpoint" in capsys.readouterr().err
    big = Tokenizer(models.WordLevel({f"t{i}": i for i in range(60_000)}, unk_token="t0"))  # not the model's
    big.save(str(tmp_path / "big.json"))
    assert generate_main(["--checkpoint", str(step), "--prompt", "t59999", "--tokenizer",
                          str(tmp_path / "big.json")]) == 1
    assert "the prompt encodes to id 59999, beyond the model's vocab_size 50304" in capsys.readouterr().err
