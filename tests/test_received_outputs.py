"""Nothing of a sender's passes through megapico's exports as-is: a received run's config.json, tokenizer files,
learning dynamics, train_data/ and eval results are checked and written anew, a received config's paths are followed
only inside its run, and megapico's own runs (and pico-train's files) still convert. Each hostile file is crafted
here on a copy of one tiny run."""

import json
import os
import pickle
import re
import shutil
import stat

import datasets
import pytest
import torch
import yaml
from conftest import TOKENIZER, training_overrides
from convert_to_hf import main as to_hf_main
from distributed import train
from safetensors.torch import load_file, save_file
from test_foreign_checkpoints import PICO_CHECKPOINTS, needs_pico_checkpoints
from test_security import Payload
from tokenizers import Tokenizer, models

from megapico.checkpoint.manifest import read_manifest, write_manifest
from megapico.checkpoint.paths import CheckpointError
from megapico.convert.convert import convert_run, copy_pruned_export
from megapico.convert.received import checked_model_tensors, pico_model_config, write_checked_learning_dynamics

EVIL = "evil/repo--modeling.X"


@pytest.fixture(scope="module")
def run(sample_prefix, tmp_path_factory):
    """2 steps, a checkpoint and learning dynamics at every step, the oldest two pruned to their HF export."""
    tmp = tmp_path_factory.mktemp("received")
    train(1, training_overrides(sample_prefix, tmp, **{
        "training.max_steps": 2, "checkpointing.save_interval": 1, "checkpointing.keep_last": 1,
        "evaluation.interval": 1, "checkpointing.learning_dynamics.enabled": True,
        "checkpointing.learning_dynamics.batch_size": 2}), tmp)
    return tmp / "runs" / "megapico-run"


def received(run, tmp_path):
    shutil.copytree(run, tmp_path / "received")
    return tmp_path / "received"


def convert(run_dir, tmp_path, capsys, *extra):
    """tools/convert_to_hf.py --run-dir (no logits check: the hostile files are not the model's); (exit code, the
    error lines of stderr, without the progress bars)."""
    capsys.readouterr()
    code = to_hf_main(["--run-dir", str(run_dir), "--output", str(tmp_path / "out"), "--no-verify", *extra])
    return code, "".join(line for line in capsys.readouterr().err.splitlines(keepends=True) if line.startswith("error"))


def one_line(err):
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_the_run_keeps_its_tokenizer_and_converts_with_every_file_written_anew(run, tmp_path):
    """Training wrote runs/RUN/tokenizer.json (what exports ship); the whole run converts, verified, and every file
    of the output is megapico's own: equal data, plain permissions, generation_config.json."""
    assert (run / "tokenizer.json").read_text() == Tokenizer.from_file(str(TOKENIZER)).to_str()
    kinds = {step: read_manifest(run / "checkpoints" / f"step_{step}")["kind"] for step in range(3)}
    assert kinds == {0: "pruned", 1: "pruned", 2: "full"}
    out = convert_run(run, tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    for path in out.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path
    configs = [json.loads((out / "checkpoints" / f"step_{step}" / "config.json").read_text()) for step in range(3)]
    assert configs[0] == configs[1] == configs[2] and configs[0]["eos_token_id"] == 50279
    for step in range(3):
        step_out = out / "checkpoints" / f"step_{step}"
        assert json.loads((step_out / "generation_config.json").read_text()) == {"eos_token_id": 50279,
                                                                                 "pad_token_id": 1}
        source = run / "checkpoints" / f"step_{step}" / "learning_dynamics"
        for path in source.glob("*.pt"):
            saved, written = torch.load(path), torch.load(step_out / "learning_dynamics" / path.name)
            assert saved.keys() == written.keys() and all(torch.equal(saved[k], written[k]) for k in saved)
        if (source / "train_data").is_dir():
            assert datasets.load_from_disk(str(source / "train_data")).to_dict() == datasets.load_from_disk(
                str(step_out / "learning_dynamics" / "train_data")).to_dict()
    kept = load_file(run / "checkpoints" / "step_1" / "hf" / "model.safetensors")
    written = load_file(out / "checkpoints" / "step_1" / "model.safetensors")
    assert kept.keys() == written.keys() and all(torch.equal(kept[k], written[k]) for k in kept)
    assert sorted(path.name for path in (out / "eval_results").iterdir()) == ["step_1.json", "step_2.json"]


def test_a_senders_config_json_and_tokenizer_config_pass_nothing_on(run, tmp_path, capsys):
    """A pruned checkpoint's kept export with an auto_map to a Hub repo's code, extra keys, a tokenizer_config.json
    naming a remote tokenizer class and a stray modelling file: the output holds megapico's files only."""
    run_dir = received(run, tmp_path)
    kept = run_dir / "checkpoints" / "step_1" / "hf"
    config = json.loads((kept / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": EVIL, "AutoModelForCausalLM": EVIL}
    config.update(custom_pipelines={"text-generation": {"impl": EVIL}}, trust_remote_code=True)
    (kept / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((kept / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["evil/repo--tokenization.EvilTokenizer", None]}
    (kept / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (kept / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "auto_map": EVIL}))
    (kept / "evil.py").write_text("import os\n")
    assert convert(run_dir, tmp_path, capsys) == (0, "")
    step_1, step_2 = (tmp_path / "out" / "megapico-run" / "checkpoints" / f"step_{step}" for step in (1, 2))
    assert sorted(path.name for path in step_1.iterdir()) == sorted(path.name for path in step_2.iterdir())
    for name in ("config.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
                 "pico_decoder.py", "generation_config.json"):
        assert (step_1 / name).read_text() == (step_2 / name).read_text(), name  # as a full checkpoint's export
        assert "evil/repo" not in (step_1 / name).read_text() and "custom_pipelines" not in (step_1 / name).read_text()


def test_a_tokenizer_json_with_keys_tokenizers_does_not_know_is_refused(run, tmp_path, capsys):
    run_dir = received(run, tmp_path)
    kept = run_dir / "checkpoints" / "step_1" / "hf" / "tokenizer.json"
    tokenizer = json.loads(kept.read_text())
    tokenizer["auto_map"] = {"AutoTokenizer": ["evil/repo--tokenization.EvilTokenizer", None]}
    kept.write_text(json.dumps(tokenizer))
    code, err = convert(run_dir, tmp_path, capsys)
    assert code == 1 and f"{kept}: not a tokenizers JSON file" in one_line(err)
    assert not (tmp_path / "out" / "megapico-run").exists()

    # the run's own copy, planted the same way, for a full checkpoint's export
    (run_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    capsys.readouterr()
    assert to_hf_main(["--checkpoint", str(run_dir / "checkpoints" / "step_2"), "--output", str(tmp_path / "hf"),
                       "--no-verify"]) == 1
    assert f"{run_dir / 'tokenizer.json'}: not a tokenizers JSON file" in one_line(capsys.readouterr().err)


def test_a_received_config_never_makes_an_export_ship_a_file_outside_the_run(run, tmp_path, capsys):
    """data.tokenizer naming a file elsewhere on this machine (a valid tokenizer, so only the path gives it away) is
    refused in one line; the run's own copy, a path inside the run, or the user's --tokenizer are used."""
    run_dir = received(run, tmp_path)
    step = run_dir / "checkpoints" / "step_2"
    outside = tmp_path / "home" / "secret-tokenizer.json"
    outside.parent.mkdir()
    Tokenizer(models.WordLevel({"secret": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(outside))

    def name_tokenizer(path):
        config = yaml.safe_load((step / "config.yaml").read_text())
        config["data"]["tokenizer"] = str(path)
        (step / "config.yaml").write_text(yaml.safe_dump(config))
        write_manifest(step, 1, collective=False)  # the sender rewrites the manifest: it proves nothing

    def export(*extra):
        shutil.rmtree(tmp_path / "hf", ignore_errors=True)
        capsys.readouterr()
        code = to_hf_main(["--checkpoint", str(step), "--output", str(tmp_path / "hf"), "--no-verify", *extra])
        return code, capsys.readouterr().err

    name_tokenizer(outside)
    own = Tokenizer.from_file(str(TOKENIZER)).to_str()  # what training keeps in the run
    (run_dir / "tokenizer.json").unlink(missing_ok=True)
    code, err = export()
    assert code == 1 and not (tmp_path / "hf").exists()
    assert "lies outside the run, which a checkpoint's config may not point to; pass --tokenizer PATH" in one_line(err)
    name_tokenizer("/etc/passwd")
    assert "data.tokenizer (/etc/passwd) lies outside the run" in one_line(export()[1])

    (run_dir / "tokenizer.json").write_text(own)  # the run's own copy wins over the config's path
    name_tokenizer(outside)
    assert export() == (0, "")
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == own
    (run_dir / "tokenizer.json").unlink()
    shutil.copyfile(TOKENIZER, run_dir / "kept-tokenizer.json")  # a path inside the run
    name_tokenizer(run_dir / "kept-tokenizer.json")
    assert export() == (0, "")
    name_tokenizer(outside)  # the user's own choice is trusted
    assert export("--tokenizer", str(TOKENIZER)) == (0, "")
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == own


def _rewrite(path, change):
    tensors = torch.load(path)
    torch.save(change(tensors), path)


@pytest.mark.parametrize("attack, refusal", [
    ("plain pickle", "val_weights.pt: "),
    ("an extra key", "its keys are not layers.{i}.{attention.v_proj,attention.o_proj,swiglu.w_2} for 2 layers "
                     "('extra')"),
    ("a missing layer", "its keys are not layers.{i}."),
    ("float64", "'layers.0.attention.v_proj' is torch.float64, not an fp32 tensor"),
    ("a transposed weight", "'layers.1.swiglu.w_2' has shape [384, 96], the model needs [96, 384]"),
])
def test_learning_dynamics_that_are_not_picos_are_refused(run, tmp_path, capsys, attack, refusal):
    """In a pruned checkpoint (no manifest is checked for it, and a sender would rewrite one anyway)."""
    run_dir = received(run, tmp_path)
    path = run_dir / "checkpoints" / "step_1" / "learning_dynamics" / "val_weights.pt"
    if attack == "plain pickle":  # not a torch zip: pico-analyze's torch.load (torch < 2.6) would run it
        tensors = torch.load(path)
        path.write_bytes(pickle.dumps({**tensors, "extra": Payload(tmp_path / "ran")}, protocol=2))
    elif attack == "an extra key":
        _rewrite(path, lambda tensors: {**tensors, "extra": torch.zeros(1)})
    elif attack == "a missing layer":
        _rewrite(path, lambda tensors: {k: v for k, v in tensors.items() if not k.startswith("layers.1.")})
    elif attack == "float64":
        _rewrite(path, lambda tensors: {k: v.double() for k, v in tensors.items()})
    else:
        _rewrite(path, lambda tensors: {**tensors, "layers.1.swiglu.w_2": tensors["layers.1.swiglu.w_2"].T})
    code, err = convert(run_dir, tmp_path, capsys)
    assert code == 1 and f"{path}: " in one_line(err) and refusal in err, err
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out" / "megapico-run").exists()


def test_a_train_data_folder_reading_files_outside_it_is_refused(run, tmp_path, capsys):
    run_dir = received(run, tmp_path)
    train_data = run_dir / "checkpoints" / "step_1" / "learning_dynamics" / "train_data"
    state = json.loads((train_data / "state.json").read_text())
    arrow = state["_data_files"][0]["filename"]
    shutil.move(train_data / arrow, tmp_path / "elsewhere.arrow")  # what load_from_disk would then read
    state["_data_files"][0]["filename"] = "../../../../../../elsewhere.arrow"
    (train_data / "state.json").write_text(json.dumps(state))
    code, err = convert(run_dir, tmp_path, capsys)
    assert code == 1 and not (tmp_path / "out" / "megapico-run").exists()
    assert (f"{train_data / 'state.json'}: names data file '../../../../../../elsewhere.arrow', not a plain file "
            f"inside {train_data}; refusing it") in one_line(err)

    # put back, with a column pico's train_data never has: refused; other files beside the .pt files: left out
    shutil.move(tmp_path / "elsewhere.arrow", train_data / arrow)
    state["_data_files"][0]["filename"] = arrow
    (train_data / "state.json").write_text(json.dumps(state))
    (train_data.parent / "notes.pt").write_bytes(pickle.dumps(Payload(tmp_path / "ran")))
    assert convert(run_dir, tmp_path, capsys) == (0, "")
    assert not list((tmp_path / "out").rglob("notes.pt"))
    table = datasets.load_from_disk(str(train_data))
    table.add_column("code", ["import os"] * len(table)).save_to_disk(str(tmp_path / "with-code"))
    learning_dynamics = tmp_path / "ld-copy"
    shutil.copytree(train_data.parent, learning_dynamics)
    shutil.rmtree(learning_dynamics / "train_data")
    shutil.copytree(tmp_path / "with-code", learning_dynamics / "train_data")
    model = pico_model_config(run_dir / "checkpoints" / "step_1" / "hf" / "config.json")
    with pytest.raises(CheckpointError, match=r"columns \['input_ids', 'text', 'code'\], pico's train_data has "
                                              r"input_ids \(and text\)"):
        write_checked_learning_dynamics(learning_dynamics, tmp_path / "ld-out", model)
    assert not (tmp_path / "ran").exists()


def test_eval_results_are_read_as_data(run, tmp_path, capsys):
    run_dir = received(run, tmp_path)
    results = run_dir / "eval_results"
    (results / "notes.py").write_text("import os\n")
    assert convert(run_dir, tmp_path, capsys) == (0, "")
    written = tmp_path / "out" / "megapico-run" / "eval_results"
    assert sorted(path.name for path in written.iterdir()) == ["step_1.json", "step_2.json"]
    assert json.loads((written / "step_1.json").read_text()) == json.loads((results / "step_1.json").read_text())
    (results / "step_1.json").write_text(json.dumps({"paloma": {"py/object": "os.system"}}))
    code, err = convert(run_dir, tmp_path, capsys, "--overwrite")
    assert code == 1 and f"{results / 'step_1.json'}: not {{eval set name: perplexity}}" in one_line(err)


@needs_pico_checkpoints
def test_pico_trains_own_export_is_checked_and_written_anew(tmp_path):
    """pico-train's HF files (config.json with `dtype`, `transformers_version`; fp32 model.safetensors) read as data;
    a tensor of another shape or dtype, or an extra one, is refused in one line."""
    source = PICO_CHECKPOINTS / "zero2-bf16" / "step_4"
    model = pico_model_config(source / "config.json")
    assert (model.d_model, model.n_layers, model.attention_n_kv_heads, model.vocab_size) == (16, 2, 2, 50304)
    copy_pruned_export(source, tmp_path / "out", tokenizer=TOKENIZER)
    written = load_file(tmp_path / "out" / "model.safetensors")
    original = load_file(source / "model.safetensors")
    assert written.keys() == original.keys() and all(torch.equal(written[k], original[k]) for k in original)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "pico_decoder.PicoDecoderHF" and "dtype" not in config

    for change, refusal in (
            (lambda t: {**t, "pico_decoder.extra": torch.zeros(1)}, "holds the unexpected tensor 'pico_decoder.extra'"),
            (lambda t: {k: v.double() for k, v in t.items()}, "is F64 [50304, 16], the model needs F32 [50304, 16]"),
            (lambda t: {k: v for k, v in t.items() if "layers.1." not in k},
             "lacks the tensor 'pico_decoder.layers.1.")):
        save_file(change(original), tmp_path / "bad.safetensors")
        with pytest.raises(CheckpointError, match="bad.safetensors: ") as refused:
            checked_model_tensors(tmp_path / "bad.safetensors", model)
        assert refusal in str(refused.value) and "\n" not in str(refused.value)
    (tmp_path / "bad.safetensors").write_bytes(pickle.dumps(Payload(tmp_path / "ran")))
    with pytest.raises(CheckpointError, match="bad.safetensors: unreadable as safetensors"):
        checked_model_tensors(tmp_path / "bad.safetensors", model)
    assert not (tmp_path / "ran").exists()
    config = json.loads((source / "config.json").read_text())
    for key, value in (("d_model", "16"), ("n_layers", True), ("vocab_size", 10**400), ("norm_eps", float("nan"))):
        (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(CheckpointError, match=f"config.json: '{key}' is "):
            pico_model_config(tmp_path / "config.json")


def test_an_eval_result_is_numbers_or_one_line(tmp_path):
    """eval_results/step_N.json passes on only as {name: float}: an integer beyond any float, a string or a nested
    value is one line naming the file (not an OverflowError traceback)."""
    from megapico.convert.received import checked_eval_result

    path = tmp_path / "step_1.json"
    for content, reason in ((f'{{"valid": {"9" * 400}}}', "an integer beyond any float"),
                            ('{"valid": "12.5"}', "not {eval set name: perplexity}"),
                            ('{"valid": {"ppl": 3}}', "not {eval set name: perplexity}")):
        path.write_text(content)
        with pytest.raises(CheckpointError, match=re.escape(f"{path}: ") + ".*" + re.escape(reason)):
            checked_eval_result(path)
    path.write_text('{"valid": 12}')
    assert checked_eval_result(path) == {"valid": 12.0}
