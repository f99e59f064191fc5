"""Publishing a pico-train run directory (megapico/publish/pico_run.py) made of pico-train's own files
(../shared/data/pico-train-checkpoints: written by its Trainer), against tests/hub_server.py: pico-train's titles and
paths, fabric_state/ as the checkpoint reader read it, and a rerun that sends nothing."""

import json
import shutil

import pytest
import yaml
from conftest import REPO, TOKENIZER
from hub_server import HubServer
from huggingface_hub import HfApi, constants, hf_hub_download

from megapico.publish.pico_run import publish_pico_run

PICO_CHECKPOINTS = REPO.parent / "shared" / "data" / "pico-train-checkpoints"
pytestmark = pytest.mark.skipif(not PICO_CHECKPOINTS.is_dir(), reason=f"{PICO_CHECKPOINTS} is absent (a clone "
                                                                      f"without ../shared beside it); CI has it")


@pytest.fixture
def hub(tmp_path):
    with pytest.MonkeyPatch.context() as patch, HubServer(tmp_path / "hub") as server:
        patch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        yield server


def pico_train_run(layout, tmp_path):
    """pico-train's run directory as its Trainer lays it out (training_config.yaml, checkpoints/step_4 with its HF
    files and fabric_state/, checkpoints/latest -> step_4, eval_results/step_4.json); the stored step keeps no
    tokenizer.json (its data/tokenizer names the shared one), so it is put back."""
    run_dir = tmp_path / "pico-runs" / "golden"
    step = run_dir / "checkpoints" / "step_4"
    shutil.copytree(PICO_CHECKPOINTS / layout / "step_4", step)
    shutil.copyfile(TOKENIZER, step / "tokenizer.json")
    (run_dir / "checkpoints" / "latest").symlink_to("step_4", target_is_directory=True)
    config = yaml.safe_load((PICO_CHECKPOINTS / layout / "pico_config.yaml").read_text())
    (run_dir / "training_config.yaml").write_text(yaml.dump(config))
    (run_dir / "eval_results").mkdir()
    (run_dir / "eval_results" / "step_4.json").write_text(json.dumps({"paloma": 51234.5}))
    return run_dir


@pytest.mark.parametrize("layout, fabric", [
    ("one-device-fp32", {"fabric_state/checkpoint.pt"}),
    ("zero2-bf16", {"fabric_state/latest", "fabric_state/checkpoint/mp_rank_00_model_states.pt",
                    "fabric_state/checkpoint/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                    "fabric_state/checkpoint/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"})])
def test_pico_train_run_directory_publishes_as_pico_train(layout, fabric, hub, tmp_path):
    run_dir = pico_train_run(layout, tmp_path)
    (run_dir / "checkpoints" / "step_4" / "fabric_state" / "zero_to_fp32.py").write_text("# a sender's script")
    lines = publish_pico_run(run_dir, "org/golden", training_state="every", endpoint=hub.url)
    assert lines[0] == "org/golden@golden: 0 of 5 commits already there, 5 to send"
    api = HfApi(endpoint=hub.url)
    titles = [c.title for c in reversed(api.list_repo_commits("org/golden", revision="golden"))]
    assert titles == ["initial commit", "Saving HF Model -- Step 4", "Saving Tokenizer -- Step 4",
                      "Saving Training Config -- Step 4", "Saving Fabric Checkpoint -- Step 4",
                      "Saving Evaluation Results -- Step 4"]
    files = set(api.list_repo_files("org/golden", revision="golden"))
    assert {name for name in files if name.startswith("fabric_state/")} == fabric  # what the reader read, no script
    for name in sorted(fabric - {"fabric_state/latest"}):
        got = hf_hub_download("org/golden", name, revision="golden", cache_dir=tmp_path / "c", endpoint=hub.url)
        assert open(got, "rb").read() == (run_dir / "checkpoints" / "step_4" / name).read_bytes()
    config = json.load(open(hf_hub_download("org/golden", "config.json", revision="golden", cache_dir=tmp_path / "c",
                                            endpoint=hub.url)))
    assert (config["d_model"], config["n_layers"], config["batch_size"]) == (16, 2, 8)
    assert publish_pico_run(run_dir, "org/golden", training_state="every", endpoint=hub.url) == [
        "org/golden@golden: 5 of 5 commits already there, 0 to send"]
