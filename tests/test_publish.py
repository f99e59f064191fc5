"""Publishing a run to the Hub as pico-train does (megapico/publish), against tests/hub_server.py with the real
huggingface_hub client: titles, order and trees; idempotence; a killed publication completed; a failing or hanging
Hub that never blocks the caller; pico-analyze's remote read; resuming training from a download; a received run or
pico run directory whose files (a planted export cache, links, hard links, code pointers) never reach the Hub as
found; private repositories and run branches."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import REPO, TOKENIZER, training_overrides
from distributed import train
from hub_server import HubServer
from huggingface_hub import CommitOperationAdd, HfApi, constants, hf_hub_download, snapshot_download
from publish_run import main as publish_main

from megapico.checkpoint.manifest import read_manifest
from megapico.checkpoint.paths import CheckpointError
from megapico.config import ConfigError
from megapico.convert.convert import convert_run
from megapico.convert.hf_export import MODELLING_FILE
from megapico.publish.background import BackgroundPublisher
from megapico.publish.hub import Publication, PublishError, publish_run, run_checkpoints
from megapico.publish.pico_run import publish_pico_run

BRANCH = "megapico-run"
LD_BATCH = 4
SEND = ("POST /api/models/", "PUT /lfs-upload", ".git/info/lfs")


def expected_titles(state_steps):
    """pico-train's order for checkpoints 0 and 2 (evaluation at steps 1 and 2, learning dynamics on)."""
    titles = ["initial commit", "Saving HF Model -- Step 0", "Saving Tokenizer -- Step 0",
              "Saving Training Config -- Step 0"]
    titles += ["Saving megapico Training State -- Step 0"] if 0 in state_steps else []
    titles += ["Saving Learning Dynamics Data (train) -- Step 0", "Saving Learning Dynamics Data (val) -- Step 0",
               "Saving HF Model -- Step 2"]
    titles += ["Saving megapico Training State -- Step 2"] if 2 in state_steps else []
    return titles + ["Saving Evaluation Results -- Step 2", "Saving Learning Dynamics Data (train) -- Step 2",
                     "Saving Learning Dynamics Data (val) -- Step 2"]


def overrides(sample_prefix, tmp):
    return training_overrides(sample_prefix, tmp, **{
        "training.max_steps": 2, "checkpointing.save_interval": 2, "evaluation.interval": 1,
        "checkpointing.learning_dynamics.enabled": True, "checkpointing.learning_dynamics.batch_size": LD_BATCH})


@pytest.fixture(scope="module")
def no_xet():
    """huggingface_hub reads HF_HUB_DISABLE_XET at import: set its constant for the calls made in this process."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        yield


@pytest.fixture(scope="module")
def run(sample_prefix, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("publish")
    result = train(2, overrides(sample_prefix, tmp), tmp)
    return tmp / "runs" / BRANCH, result


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with HubServer(tmp_path_factory.mktemp("hub")) as server:
        yield server


@pytest.fixture(scope="module")
def published(run, hub, no_xet):
    """The run published with every checkpoint's training state, into a collection."""
    run_dir, _ = run
    lines = publish_run(run_dir, "org/tiny", training_state="every", collection_slug="org/pico-runs-0123",
                        endpoint=hub.url, backoff_s=0.01)
    return HfApi(endpoint=hub.url), lines


@pytest.fixture(scope="module")
def pico_run(run, tmp_path_factory):
    """The pico run directory of the same run, made locally (what pico-analyze's --run_path reads)."""
    return convert_run(run[0], tmp_path_factory.mktemp("pico"), verify=False)


def hub_env(hub, tmp_path):
    return {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "hf_test",
            "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def history(api, repo_id, revision=BRANCH):
    return list(reversed(api.list_repo_commits(repo_id, revision=revision)))


def test_commit_titles_in_pico_train_order(run, published, hub):
    api, lines = published
    assert [commit.title for commit in history(api, "org/tiny")] == expected_titles({0, 2})
    assert lines[0] == "org/tiny@megapico-run: 0 of 11 commits already there, 11 to send"
    assert {ref.name for ref in api.list_repo_refs("org/tiny").branches} == {"main", BRANCH}
    assert [item["id"] for item in hub.collections["org/pico-runs-0123"]] == ["org/tiny"]
    assert not (run[0] / ".publish").exists()  # exports go to a private directory of the call, never the run's
    assert hub.repos["org/tiny"].private  # a repository megapico creates is private unless asked otherwise


def test_tree_at_each_commit(run, published, pico_run, tmp_path):
    api, _ = published
    run_dir = run[0]
    model = {"config.json", "generation_config.json", "model.safetensors", "pico_decoder.py"}
    tokenizer = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}

    def state(step):
        return {f"megapico_state/{name}" for name in [*read_manifest(run_dir / "checkpoints" / f"step_{step}")["files"],
                                                      "manifest.json"]}

    train_files = {f"learning_dynamics/train_{kind}.pt" for kind in ("activations", "weights", "gradients")} | {
        f"learning_dynamics/{path.relative_to(pico_run / 'checkpoints' / 'step_0' / 'learning_dynamics')}"
        for path in (pico_run / "checkpoints" / "step_0" / "learning_dynamics" / "train_data").rglob("*")}
    val_files = {f"learning_dynamics/val_{kind}.pt" for kind in ("activations", "weights", "gradients")}
    step0 = {".gitattributes"} | model | tokenizer | {"training_config.yaml"} | state(0) | train_files | val_files
    expected = [{".gitattributes"}, {".gitattributes"} | model, {".gitattributes"} | model | tokenizer,
                {".gitattributes"} | model | tokenizer | {"training_config.yaml"},
                {".gitattributes"} | model | tokenizer | {"training_config.yaml"} | state(0),
                step0 - val_files, step0, step0, step0 - state(0) | state(2),
                step0 - state(0) | state(2) | {"eval_results/step_1.json", "eval_results/step_2.json"}]
    expected += [expected[-1]] * 2
    commits = history(api, "org/tiny")
    for commit, files in zip(commits, expected, strict=True):
        assert set(api.list_repo_files("org/tiny", revision=commit.commit_id)) == files, commit.title
    assert not any(name.startswith("fabric_state/") for name in files)
    # contents: the HF model of each step is pico's export of that checkpoint; the rest are the run's own files
    by_title = {commit.title: commit.commit_id for commit in commits}
    cache = tmp_path / "cache"
    for step in (0, 2):
        revision = by_title[f"Saving HF Model -- Step {step}"]
        for name in ("config.json", "generation_config.json", "model.safetensors"):
            got = hf_hub_download("org/tiny", name, revision=revision, cache_dir=cache, endpoint=api.endpoint)
            assert open(got, "rb").read() == (pico_run / "checkpoints" / f"step_{step}" / name).read_bytes()
        revision = by_title[f"Saving megapico Training State -- Step {step}"]
        for name in ("megapico_state.json", "zero_pp_rank_1_mp_rank_00_optim_states.pt"):
            got = hf_hub_download("org/tiny", f"megapico_state/{name}", revision=revision, cache_dir=cache,
                                  endpoint=api.endpoint)
            assert open(got, "rb").read() == (run_dir / "checkpoints" / f"step_{step}" / name).read_bytes()
    got = hf_hub_download("org/tiny", "training_config.yaml", revision=BRANCH, cache_dir=cache, endpoint=api.endpoint)
    assert yaml.safe_load(open(got)) == yaml.safe_load((pico_run / "training_config.yaml").read_text())


def test_republish_sends_nothing(run, published, hub):
    api, _ = published
    before, requests = len(history(api, "org/tiny")), len(hub.requests)
    lines = publish_run(run[0], "org/tiny", training_state="every", collection_slug="org/pico-runs-0123",
                        endpoint=hub.url)
    assert lines == ["org/tiny@megapico-run: 11 of 11 commits already there, 0 to send"]
    assert len(history(api, "org/tiny")) == before
    assert not [line for line in hub.requests[requests:] if line.startswith(SEND) and "/branch/" not in line
                and "/collections/" not in line]


PICO_ANALYZE_READ = r"""
import re, sys, torch, yaml
from datasets import load_from_disk
from huggingface_hub import HfApi, hf_hub_download, snapshot_download

repo_id, branch, out = sys.argv[1:]
config = yaml.safe_load(open(hf_hub_download(repo_id=repo_id, revision=branch, filename="training_config.yaml")))
states = {}
for split in ("train", "val"):
    pattern = rf"Saving Learning Dynamics Data \({split}\) -- Step (\d+)"
    for commit in HfApi().list_repo_commits(repo_id=repo_id, revision=branch):
        match = re.search(pattern, commit.title)
        if match:
            directory = snapshot_download(repo_id=repo_id, revision=commit.commit_id) + "/learning_dynamics"
            state = {kind: torch.load(f"{directory}/{split}_{kind}.pt") for kind in ("activations", "weights",
                                                                                    "gradients")}
            if split == "train":
                state["input_ids"] = load_from_disk(f"{directory}/train_data")["input_ids"]
            states[(split, int(match.group(1)))] = state
torch.save({"config": config, "states": states}, out)
"""


def assert_pico_analyze_reads(hub, repo_id, pico_run, tmp_path):
    """pico-analyze's own remote path (src/utils/data.py), in a fresh process and HF_HOME, through HF_ENDPOINT,
    reads the same learning dynamics as the local pico run directory holds."""
    from datasets import load_from_disk

    out = tmp_path / "remote.pt"
    subprocess.run([sys.executable, "-c", PICO_ANALYZE_READ, repo_id, BRANCH, str(out)], env=hub_env(hub, tmp_path),
                   check=True, timeout=300)
    remote = torch.load(out, weights_only=False)
    config = remote["config"]
    assert (config["model"]["d_model"], config["model"]["attention_n_heads"], config["model"]["attention_n_kv_heads"],
            config["checkpointing"]["run_name"]) == (96, 12, 4, BRANCH)
    assert sorted(remote["states"]) == [("train", 0), ("train", 2), ("val", 0), ("val", 2)]
    for (split, step), state in remote["states"].items():
        local = pico_run / "checkpoints" / f"step_{step}" / "learning_dynamics"
        for kind in ("activations", "weights", "gradients"):
            expected = torch.load(local / f"{split}_{kind}.pt")
            assert state[kind].keys() == expected.keys()
            assert all(torch.equal(state[kind][name], expected[name]) for name in expected), (split, step, kind)
        if split == "train":
            assert state["input_ids"] == load_from_disk(str(local / "train_data"))["input_ids"]


def test_pico_analyze_remote_read_matches_local_run_directory(published, pico_run, hub, tmp_path):
    assert_pico_analyze_reads(hub, "org/tiny", pico_run, tmp_path)


def test_download_at_a_published_step_resumes_in_megapico(run, published, sample_prefix, tmp_path):
    """The branch at 'Saving megapico Training State -- Step 0' -> runs/RUN/checkpoints/step_0 + latest: training
    resumes there and repeats the original run's losses."""
    api, _ = published
    _, original = run
    revision = next(c.commit_id for c in history(api, "org/tiny") if c.title == "Saving megapico Training State -- "
                    "Step 0")
    snapshot = snapshot_download("org/tiny", revision=revision, allow_patterns=["megapico_state/*"],
                                 cache_dir=tmp_path / "cache", endpoint=api.endpoint)
    checkpoints = tmp_path / "runs" / BRANCH / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copytree(os.path.join(snapshot, "megapico_state"), checkpoints / "step_0")
    (checkpoints / "latest").write_text("step_0")
    resumed = train(2, overrides(sample_prefix, tmp_path), tmp_path)
    assert resumed["resumed_from"] == 0
    assert resumed["losses"] == pytest.approx(original["losses"], rel=1e-6, abs=0)


def test_training_state_last_waits_for_the_final_step_while_training(run):
    checkpoints = run_checkpoints(run[0])
    publication = Publication(None, run[0], "org/tiny", BRANCH, "last", 1, 0.0, live=True, tokenizer=None,
                              log=print)
    assert publication.with_state(checkpoints) == {2}  # step 2 is training.max_steps
    assert publication.with_state(checkpoints[:1]) == set()  # step 0 of a run still training
    publication.live = False  # after the fact: the newest checkpoint is the last
    assert publication.with_state(checkpoints[:1]) == {0}
    publication.training_state = "never"
    assert publication.with_state(checkpoints) == set()


def test_killed_publication_completes_with_the_missing_titles_only(run, tmp_path, monkeypatch, no_xet):
    """A background publication killed during an upload (close() at its time limit), then completed by publish_run:
    each title once, in order; training state `last` replaces a stale megapico_state/ file; --update-main."""
    run_dir = run[0]
    with HubServer(tmp_path / "hub") as hub:
        for key, value in hub_env(hub, tmp_path).items():
            monkeypatch.setenv(key, value)
        api = HfApi(endpoint=hub.url)
        api.create_repo("org/resume")
        api.create_branch("org/resume", branch=BRANCH)
        stale = "megapico_state/zero_pp_rank_7_mp_rank_00_optim_states.pt"  # an older layout's file
        api.create_commit("org/resume", [CommitOperationAdd(stale, b"old")], commit_message="older", revision=BRANCH)
        hub.hang("PUT /lfs-upload", after=2)  # model.safetensors and tokenizer.json of step 0 pass, then it hangs
        publisher = BackgroundPublisher(run_dir, "org/resume", BRANCH, training_state="last")
        started = time.perf_counter()
        publisher.checkpoint_saved()
        assert publisher.poll() == []
        publisher.checkpoint_saved()  # another checkpoint while the child runs: remembered, not started
        assert publisher.pending and time.perf_counter() - started < 1.0
        assert hub.hung.wait(timeout=240)
        started = time.perf_counter()
        assert publisher.poll() == [] and time.perf_counter() - started < 0.5  # the Hub hangs, poll does not
        lines = publisher.close(timeout_s=0)
        assert len(lines) == 1 and "not finished after 0 s" in lines[0] and "tools/publish_run.py" in lines[0]
        assert publisher.process is None and not publisher.pending
        hub.release()
        sent_before = [c.title for c in history(api, "org/resume")]
        assert sent_before == ["initial commit", "older", "Saving HF Model -- Step 0", "Saving Tokenizer -- Step 0",
                               "Saving Training Config -- Step 0"]
        assert "sent: Saving Training Config -- Step 0" in (run_dir / "publish.log").read_text()

        lines = publish_run(run_dir, "org/resume", update_main=True, endpoint=hub.url, backoff_s=0.01)
        titles = [c.title for c in history(api, "org/resume")]
        assert titles == sent_before[:2] + expected_titles({2})[1:]
        assert lines[0] == "org/resume@megapico-run: 3 of 10 commits already there, 7 to send"
        assert sum(line.startswith("sent: ") for line in lines) == 8  # the 7 and main's
        files = set(api.list_repo_files("org/resume", revision=BRANCH))
        assert stale not in files and "megapico_state/manifest.json" in files
        main = set(api.list_repo_files("org/resume", revision="main"))
        assert main == files
        assert [c.title for c in history(api, "org/resume", "main")] == ["initial commit",
                                                                          "Update main to megapico-run -- Step 2"]


def test_failing_or_hanging_hub_never_blocks_the_caller(run, tmp_path, monkeypatch):
    run_dir = run[0]
    with HubServer(tmp_path / "hub") as hub:
        for key, value in hub_env(hub, tmp_path).items():
            monkeypatch.setenv(key, value)
        hub.fail(10**6, 500)
        publisher = BackgroundPublisher(run_dir, "org/failing", BRANCH, retries=2, extra_args=("--backoff-s", "0.01"))
        started = time.perf_counter()
        publisher.checkpoint_saved()
        assert time.perf_counter() - started < 1.0
        deadline = time.monotonic() + 120
        warnings = []
        while not warnings and time.monotonic() < deadline:
            started = time.perf_counter()
            warnings = publisher.poll()
            assert time.perf_counter() - started < 0.5
            time.sleep(0.2)
        assert len(warnings) == 1 and "failed (exit 1)" in warnings[0] and "500" in warnings[0], warnings
        assert "attempt 2 of 2" in warnings[0]
        token = os.environ["HF_TOKEN"]  # the child's only way to it: its environment, never argv or the log
        assert token not in " ".join(publisher.command) and token not in (run_dir / "publish.log").read_text()
        assert publisher.close(timeout_s=5) == [
            f"publishing to org/failing@{BRANCH}: the last attempt failed (exit 1); `python tools/publish_run.py "
            f"{run_dir} --repo-id org/failing --branch {BRANCH} --training-state last` sends what is left"]
        # in-process: a hanging Hub ends in one line after the timeout and the retries, not never
        hub.heal()
        hub.hang("")
        started = time.perf_counter()
        with pytest.raises(PublishError, match=r"create org/hanging: .*Timeout.*\(attempt 2 of 2\)"):
            publish_run(run_dir, "org/hanging", retries=2, backoff_s=0.01, timeout_s=0.5, endpoint=hub.url)
        assert time.perf_counter() - started < 10


def test_publish_run_tool_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "runs" / "empty" / "checkpoints").mkdir(parents=True)
    assert publish_main([str(tmp_path / "runs" / "empty"), "--repo-id", "org/x"]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'runs' / 'empty' / 'checkpoints'}: no checkpoints to " \
                                      f"publish\n"
    with pytest.raises(CheckpointError, match="training_state='sometimes'"):
        publish_run(tmp_path, "org/x", training_state="sometimes")
    assert (REPO / "tools" / "publish_run.py").is_file()


def test_incomplete_checkpoint_is_left_for_later(tmp_path):
    """A checkpoint without its manifest (a save in progress) is not published; nothing is contacted for it."""
    partial = tmp_path / "runs" / BRANCH / "checkpoints" / "step_4"
    partial.mkdir(parents=True)
    (partial / "megapico_state.json").write_text(json.dumps({"step": 4}))
    lines = publish_run(partial.parent.parent, "org/x", endpoint="http://127.0.0.1:9")
    assert lines == ["step_4: no manifest yet (a save in progress, or one that never finished); not published"]


def test_pruned_checkpoint_publishes_its_kept_export(run, hub, published, tmp_path):
    """checkpointing.keep_last pruned step 0: its HF model is the export it kept (with megapico's modelling file),
    its learning dynamics are sent, and it has no training state to send."""
    from megapico.convert.retention import prune_checkpoint

    api, _ = published
    copy = copy_of_step_0(run, tmp_path)
    prune_checkpoint(copy / "checkpoints" / "step_0")
    publish_run(copy, "org/pruned", training_state="every", endpoint=hub.url)
    commits = history(api, "org/pruned")
    assert [c.title for c in commits] == expected_titles(set())[:6]
    for name, local in (("model.safetensors", copy / "checkpoints" / "step_0" / "hf" / "model.safetensors"),
                        ("pico_decoder.py", MODELLING_FILE)):
        got = hf_hub_download("org/pruned", name, revision=commits[1].commit_id, cache_dir=tmp_path / "cache",
                              endpoint=hub.url)
        assert open(got, "rb").read() == local.read_bytes()


def test_background_publisher_from_config(tmp_path):
    from megapico.config import load_config

    assert BackgroundPublisher.from_config(load_config(None, [])) is None
    settings = ["checkpointing.save_to_hf=true", "checkpointing.hf_checkpoint.repo_id=org/tiny",
                f"checkpointing.runs_dir={tmp_path}", "checkpointing.run_name=run-7", f"data.tokenizer={TOKENIZER}"]
    config = load_config(None, [*settings, "checkpointing.hf_checkpoint.collection_slug=org/runs-1",
                                "checkpointing.hf_checkpoint.training_state=never"])
    publisher = BackgroundPublisher.from_config(config)
    assert publisher.command[1:] == [str(REPO / "tools" / "publish_run.py"), str(tmp_path / "run-7"), "--repo-id",
                                     "org/tiny", "--branch", "run-7", "--training-state", "never",
                                     "--collection-slug", "org/runs-1", "--tokenizer", str(TOKENIZER), "--retries",
                                     "5", "--live"]
    assert publisher.poll() == [] and publisher.close(timeout_s=1) == []  # nothing saved, nothing started
    public = load_config(None, [*settings, "checkpointing.hf_checkpoint.private=false"])
    public = BackgroundPublisher.from_config(public)
    assert "--public" in public.command
    with pytest.raises(ConfigError, match=r"^branch 'main': not a run branch"):
        BackgroundPublisher.from_config(load_config(None, [*settings, "checkpointing.run_name=main"]))


def copy_of_step_0(run, tmp_path):
    """runs/RUN with the run's step_0 checkpoint and its own tokenizer copy, to be changed by a test."""
    copy = tmp_path / "runs" / BRANCH
    shutil.copytree(run[0] / "checkpoints" / "step_0", copy / "checkpoints" / "step_0")
    shutil.copyfile(TOKENIZER, copy / "tokenizer.json")
    return copy


def test_received_run_passes_nothing_on_as_found(run, hub, published, tmp_path, monkeypatch):
    """A planted export cache is neither used nor deleted; a file swapped for a link after the checks is refused
    (before it is opened) or sent as it was (after); a hard-linked file is refused. The secret never reaches the Hub."""
    api, _ = published
    copy = copy_of_step_0(run, tmp_path)
    step_0 = copy / "checkpoints" / "step_0"
    key = hashlib.sha256((step_0 / "manifest.json").read_bytes()).hexdigest()[:12]
    planted = copy / ".publish" / f"step_0-{key}"  # where the old publisher looked for its export of step_0
    planted.mkdir(parents=True)
    (planted / "config.json").write_text(json.dumps({"model_type": "pico_decoder", "auto_map": {
        "AutoModelForCausalLM": "evil/repo--modeling.Evil"}}))
    (planted / "model.safetensors").write_bytes(b"not a model")
    secret = tmp_path / "secret"
    secret.write_text('{"hf_token": 1.0}')
    state_file = step_0 / "megapico_state.json"
    original = state_file.read_bytes()
    real_commit = Publication.commit

    def swap_before_open(self, artifact, files, revision):
        if artifact.title.startswith("Saving megapico Training State"):
            state_file.unlink()
            state_file.symlink_to(secret)
        return real_commit(self, artifact, files, revision)

    monkeypatch.setattr(Publication, "commit", swap_before_open)
    with pytest.raises(PublishError, match=r"megapico_state.json: cannot be opened as a plain file"):
        publish_run(copy, "org/received", training_state="every", endpoint=hub.url)
    assert planted.is_dir()  # not ours: left alone
    config = json.loads(open(hf_hub_download("org/received", "config.json", revision=BRANCH,
                                             cache_dir=tmp_path / "c1", endpoint=hub.url)).read())
    assert "evil" not in json.dumps(config) and config["d_model"] == 96
    assert "megapico_state/megapico_state.json" not in api.list_repo_files("org/received", revision=BRANCH)

    state_file.unlink()
    state_file.write_bytes(original)
    eval_file = copy / "eval_results" / "step_0.json"
    eval_file.parent.mkdir()
    os.link(secret, eval_file)  # another name for a file outside the run
    real_create = HfApi.create_commit

    def swap_after_open(self, repo_id, operations, **kwargs):
        if kwargs["commit_message"].startswith("Saving megapico Training State"):
            state_file.unlink()
            state_file.symlink_to(secret)
        return real_create(self, repo_id, operations, **kwargs)

    monkeypatch.setattr(Publication, "commit", real_commit)
    monkeypatch.setattr(HfApi, "create_commit", swap_after_open)
    with pytest.raises(PublishError, match=r"eval_results/step_0.json: has 2 hard links"):
        publish_run(copy, "org/received", training_state="every", endpoint=hub.url)
    got = hf_hub_download("org/received", "megapico_state/megapico_state.json", revision=BRANCH,
                          cache_dir=tmp_path / "c2", endpoint=hub.url)
    assert open(got, "rb").read() == original  # the bytes of the file opened, not the link's
    assert "eval_results/step_0.json" not in api.list_repo_files("org/received", revision=BRANCH)


def test_analysis_results_are_sent_once_per_step_from_checked_copies(run, hub, no_xet, tmp_path):
    """analysis_results/ (pico-analyze's files, at captures between checkpoints too) goes with the run: a commit
    `Saving Analysis Results -- Step N` per step after the step's others, each file dumped anew (pico-analyze's log
    and other names left behind), nothing sent twice, a result added later (cka once its target is captured) sent
    under its step's title; the pico run directory converted from the run publishes the same."""
    copy = copy_of_step_0(run, tmp_path)
    results = copy / "analysis_results" / "dynamics"
    for step in (0, 1):
        (results / f"step_{step}").mkdir(parents=True)
        (results / f"step_{step}" / "norm_val.json").write_text(json.dumps({"layers.0.swiglu.w_2.weights": 1 + step}))
    (results / "analysis.log").write_text("pico-analyze's log")
    (results / "step_1" / "notes.json").write_text("{}")
    api = HfApi(endpoint=hub.url)
    analysis = ["Saving Analysis Results -- Step 0", "Saving Analysis Results -- Step 1"]
    publish_run(copy, "org/analysis", training_state="never", endpoint=hub.url)
    assert [c.title for c in history(api, "org/analysis")] == expected_titles(set())[:6] + analysis
    assert {name for name in api.list_repo_files("org/analysis", revision=BRANCH) if "analysis" in name} == {
        "analysis_results/dynamics/step_0/norm_val.json", "analysis_results/dynamics/step_1/norm_val.json"}
    got = hf_hub_download("org/analysis", "analysis_results/dynamics/step_1/norm_val.json", revision=BRANCH,
                          cache_dir=tmp_path / "c", endpoint=hub.url)
    assert open(got).read() == json.dumps({"layers.0.swiglu.w_2.weights": 2.0})  # parsed and dumped anew
    requests = len(hub.requests)
    assert publish_run(copy, "org/analysis", training_state="never", endpoint=hub.url) == [
        f"org/analysis@{BRANCH}: 7 of 7 commits already there, 0 to send"]
    assert not [line for line in hub.requests[requests:] if line.startswith(SEND) and "/branch/" not in line]

    (results / "step_0" / "cka_val.json").write_text(json.dumps({"layers.0.ov_circuit.activations": 0.5}))
    lines = publish_run(copy, "org/analysis", training_state="never", endpoint=hub.url)
    assert lines[0] == f"org/analysis@{BRANCH}: 6 of 7 commits already there, 1 to send"
    assert [c.title for c in history(api, "org/analysis")][-1] == analysis[0]
    assert "analysis_results/dynamics/step_0/cka_val.json" in api.list_repo_files("org/analysis", revision=BRANCH)
    assert publish_run(copy, "org/analysis", training_state="never", endpoint=hub.url)[0].startswith(
        f"org/analysis@{BRANCH}: 7 of 7 commits already there")

    pico = convert_run(copy, tmp_path / "pico", verify=False)
    publish_pico_run(pico, "org/analysis-pico", endpoint=hub.url)
    assert [c.title for c in history(api, "org/analysis-pico")] == expected_titles(set())[:6] + analysis
    assert publish_pico_run(pico, "org/analysis-pico", endpoint=hub.url) == [
        f"org/analysis-pico@{BRANCH}: 7 of 7 commits already there, 0 to send"]


def test_run_branch_is_never_main_nor_a_ref(run, capsys):
    for branch in ("main", "refs/heads/x", "a..b", "HEAD"):
        assert publish_main([str(run[0]), "--repo-id", "org/x", "--branch", branch]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: branch '{branch}': not a run branch") and err.count("\n") == 1, err


def test_pico_run_directory_publishes_as_pico_train(run, pico_run, published, hub, tmp_path, monkeypatch, capsys):
    """tools/publish_run.py runs/pico/RUN: pico-train's commits with the same HF files as the megapico run's own
    publication (made anew, not copied), --public, a rerun sends nothing, and pico-analyze reads it."""
    api, _ = published
    assert (pico_run / "checkpoints" / "latest").is_symlink()
    with monkeypatch.context() as patch:  # HF_ENDPOINT, as huggingface_hub read it at import
        patch.setattr(constants, "ENDPOINT", hub.url)
        assert publish_main([str(pico_run), "--repo-id", "org/pico", "--public", "--backoff-s", "0.01"]) == 0, \
            capsys.readouterr().err
    assert [c.title for c in history(api, "org/pico")] == expected_titles(set())
    assert not hub.repos["org/pico"].private
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "pico_decoder.py", "eval_results/step_2.json"):
        mine = hf_hub_download("org/pico", name, revision=BRANCH, cache_dir=tmp_path / "c", endpoint=hub.url)
        theirs = hf_hub_download("org/tiny", name, revision=BRANCH, cache_dir=tmp_path / "c", endpoint=hub.url)
        assert open(mine, "rb").read() == open(theirs, "rb").read(), name
    requests = len(hub.requests)
    lines = publish_pico_run(pico_run, "org/pico", endpoint=hub.url)
    assert lines == [f"org/pico@{BRANCH}: 9 of 9 commits already there, 0 to send"]
    assert not [line for line in hub.requests[requests:] if line.startswith(SEND) and "/branch/" not in line]
    assert_pico_analyze_reads(hub, "org/pico", pico_run, tmp_path)


def test_pico_run_directory_passes_nothing_on_as_found(pico_run, hub, tmp_path):
    """A received pico run directory: its config.json's auto_map and pico_decoder.py never reach the Hub; a link
    other than pico's checkpoints/latest -> step_N, or training_config.yaml with a Python tag, is refused in one line
    before anything is contacted."""
    received = tmp_path / "pico" / BRANCH
    shutil.copytree(pico_run / "checkpoints" / "step_0", received / "checkpoints" / "step_0")
    shutil.copyfile(pico_run / "training_config.yaml", received / "training_config.yaml")
    (received / "checkpoints" / "latest").symlink_to("step_0")
    step_0 = received / "checkpoints" / "step_0"
    config = json.loads((step_0 / "config.json").read_text())
    config["auto_map"]["AutoModelForCausalLM"] = "evil/repo--modeling.Evil"
    (step_0 / "config.json").write_text(json.dumps(config))
    (step_0 / "pico_decoder.py").write_text("import os; os.system('echo the sender ran this')")
    publish_pico_run(received, "org/received-pico", endpoint=hub.url)
    api = HfApi(endpoint=hub.url)
    assert [c.title for c in history(api, "org/received-pico")] == expected_titles(set())[:6]
    for name, unwanted in (("config.json", b"evil"), ("pico_decoder.py", b"the sender")):
        got = open(hf_hub_download("org/received-pico", name, revision=BRANCH, cache_dir=tmp_path / "c",
                                   endpoint=hub.url), "rb").read()
        assert unwanted not in got
    assert got == MODELLING_FILE.read_bytes()

    requests = len(hub.requests)
    latest = received / "checkpoints" / "latest"
    for target in ("/etc", "../../elsewhere", "step_9"):
        latest.unlink()
        latest.symlink_to(target)
        with pytest.raises(CheckpointError, match=r"latest: a link to .*pico's latest names a step_N directory"):
            publish_pico_run(received, "org/x", endpoint=hub.url)
    latest.unlink()
    latest.symlink_to("step_0")
    (step_0 / "tokenizer.json").rename(tmp_path / "tokenizer.json")
    (step_0 / "tokenizer.json").symlink_to(tmp_path / "tokenizer.json")
    with pytest.raises(CheckpointError, match=r"tokenizer.json: a symbolic link .*a pico run directory holds plain"):
        publish_pico_run(received, "org/x", endpoint=hub.url)
    (step_0 / "tokenizer.json").unlink()
    (received / "training_config.yaml").write_text("checkpointing: !!python/object/apply:os.system ['echo x']\n")
    with pytest.raises(CheckpointError, match=r"training_config.yaml: not plain YAML"):
        publish_pico_run(received, "org/x", endpoint=hub.url)
    assert len(hub.requests) == requests


def test_training_publishes_off_the_training_path_even_when_the_hub_hangs(sample_prefix, tmp_path, monkeypatch,
                                                                          capfd):
    """checkpointing.save_to_hf in a real run against a Hub that answers nothing: every step trains as without
    publishing (same losses), the run ends after hf_checkpoint.wait_at_end_s and says what is left to send."""
    with HubServer(tmp_path / "hub") as hub:
        for key, value in hub_env(hub, tmp_path).items():
            monkeypatch.setenv(key, value)
        hub.hang("")
        settings = {"training.max_steps": 3, "checkpointing.save_interval": 1}
        started = time.monotonic()
        published = train(1, training_overrides(sample_prefix, tmp_path, **settings, **{
            "checkpointing.save_to_hf": True, "checkpointing.hf_checkpoint.repo_id": "org/live",
            "checkpointing.hf_checkpoint.wait_at_end_s": 2}), tmp_path)
        elapsed = time.monotonic() - started
        out = capfd.readouterr().out
        hub.heal()
    plain = train(1, training_overrides(sample_prefix, tmp_path / "plain", **settings), tmp_path)
    assert published["losses"] == plain["losses"] and sorted(published["losses"]) == [1, 2, 3]
    assert "python tools/publish_run.py" in out and "--repo-id org/live" in out, out[-2000:]
    assert elapsed < 120  # the hanging Hub held nothing: not a step, not the end (2 s of waiting)
