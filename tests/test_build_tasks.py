"""The build split into tasks (megapico/data/build_tasks.py): run by datatrove's local executor, on a local Ray
cluster and as a SLURM job array, it writes the bytes of the single-machine build; a relaunch runs only the tasks not
complete; the merge refuses an incomplete set or a record that does not match its files; a changed plan is refused.
Plus the merge's parallel copy (megapico/data/indexed_dataset.py) against one write of the same documents."""

import errno
import gzip
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, SAMPLE_DOCUMENTS, TOKENIZER, slurm_cluster_up
from preprocess_data import main

import megapico.data.indexed_dataset as indexed_dataset
from megapico.data.indexed_dataset import IndexedDataset, IndexedDatasetWriter, merge_datasets

# Five small files cut from the shipped sample (.jsonl and .json.gz, one of them empty); the HF encoder loads in a
# tenth of the time tiktoken's self-check takes, and gives the same ids.
CUTS = [(0, 40), (1000, 1040), (0, 0), (2000, 2060), (3100, 3130)]
BUILD = ["--tokenizer-model", str(TOKENIZER), "--tokenizer-backend", "huggingface", "--append-eod"]


@pytest.fixture
def documents(tmp_path):
    lines = [line for path in sorted(SAMPLE_DOCUMENTS.glob("*.json.gz"))
             for line in gzip.open(path).read().splitlines(keepends=True)]
    folder = tmp_path / "documents"
    folder.mkdir()
    for index, (start, end) in enumerate(CUTS):
        text = b"".join(lines[start:end])
        if index % 2:
            (folder / f"part-{index}.json.gz").write_bytes(gzip.compress(text))
        else:
            (folder / f"part-{index}.jsonl").write_bytes(text)
    return folder


def _outputs(prefix):
    """Every file the build wrote for key `text`: .bin, .idx, .megapico.json and the document sources, by suffix."""
    stem = f"{prefix}_text_document"
    return {path.name[len(os.path.basename(stem)):]: path.read_bytes()
            for path in sorted(prefix.parent.glob(f"{prefix.name}_text_document.*"))}


def _single_machine(documents, prefix, *flags):
    assert main(["--input", str(documents), "--output-prefix", str(prefix), *BUILD, *flags]) == 0
    return _outputs(prefix)


def _record(prefix, index):
    return json.loads((prefix.parent / f"{prefix.name}.tasks" / "done" / f"{index:05d}.json").read_text())


def test_local_executor_writes_the_single_machine_bytes(documents, tmp_path, capsys):
    expected = _single_machine(documents, tmp_path / "single")
    assert expected.keys() == {".bin", ".idx", ".megapico.json", ".sources.json", ".sources.bin"}
    tasks = tmp_path / "tasks"
    assert main(["--input", str(documents), "--output-prefix", str(tasks), *BUILD, "--executor", "local",
                 "--tasks-in-parallel", "2"]) == 0
    assert "tasks: 5 of 5 to run (0 complete) on local" in capsys.readouterr().out
    assert _outputs(tasks) == expected
    assert [_record(tasks, index)["documents"] for index in range(5)] == [40, 40, 0, 60, 30]
    # a relaunch after success runs no task and merges the same bytes again; the merge alone does too
    assert main(["--input", str(documents), "--output-prefix", str(tasks), *BUILD, "--executor", "local"]) == 0
    assert "tasks: 0 of 5 to run (5 complete)" in capsys.readouterr().out
    assert main(["--input", str(documents), "--output-prefix", str(tasks), *BUILD, "--merge-only"]) == 0
    assert _outputs(tasks) == expected


KILL_AFTER_WRITING = """
import os, signal, sys
import megapico.data.build_tasks as build_tasks
real = build_tasks.preprocess
def preprocess(options):  # task 2's outputs are written, its completion record not yet: the worst moment to die
    summary = real(options)
    if options.output_prefix.endswith("00002/part"):
        os.killpg(0, signal.SIGKILL)
    return summary
build_tasks.preprocess = preprocess
sys.path.insert(0, sys.argv[1])
from preprocess_data import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_task_killed_half_way_is_not_taken_and_the_relaunch_runs_only_the_rest(documents, tmp_path, capsys):
    command = ["--input", str(documents), "--output-prefix", str(tmp_path / "tasks"), *BUILD, "--executor", "local",
               "--tasks-in-parallel", "1"]
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_WRITING, str(REPO / "tools"), *command],
                            capture_output=True, text=True, start_new_session=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    tasks = tmp_path / "tasks"
    assert (tmp_path / "tasks.tasks" / "outputs" / "00002" / "part_text_document.idx").is_file()
    assert main(["--input", str(documents), "--output-prefix", str(tasks), *BUILD, "--merge-only"]) == 1
    error = capsys.readouterr().err
    assert "3 of 5 tasks are not complete: task 2 (" in error and "part-2.jsonl): not run, or stopped before" in error
    assert "task 4 (" in error and "relaunch the same command" in error and not list(tmp_path.glob("tasks_text*"))
    finished = {index: os.stat(tmp_path / "tasks.tasks" / "done" / f"{index:05d}.json").st_mtime_ns
                for index in (0, 1)}
    assert main(command) == 0
    assert "tasks: 3 of 5 to run (2 complete)" in capsys.readouterr().out
    assert finished == {index: os.stat(tmp_path / "tasks.tasks" / "done" / f"{index:05d}.json").st_mtime_ns
                        for index in (0, 1)}
    assert _outputs(tasks) == _single_machine(documents, tmp_path / "single")


@pytest.mark.parametrize("merge_tasks", [2, 3])
def test_merge_tasks_write_the_single_machine_bytes(documents, tmp_path, capsys, merge_tasks):
    tasks = tmp_path / "tasks"
    assert main(["--input", str(documents), "--output-prefix", str(tasks), *BUILD, "--executor", "local",
                 "--tasks-in-parallel", "2", "--merge-tasks", str(merge_tasks)]) == 0
    assert _outputs(tasks) == _single_machine(documents, tmp_path / "single")
    copies = tmp_path / "tasks.tasks" / "copy"
    assert len(list((copies / "executor" / "logs").glob("task_*.log"))) == merge_tasks
    assert not (copies / "done").exists()  # the records went with the temporary .bin they describe


KILL_BEFORE_COPY_RECORD = """
import os, signal, sys
import megapico.data.build_tasks as build_tasks
real = build_tasks._write_atomically
def write(path, text):  # merge task 1 has copied its range, its record is not written yet: the worst moment to die
    if path.match("copy/done/00001.json"):
        os.killpg(0, signal.SIGKILL)
    real(path, text)
build_tasks._write_atomically = write
sys.path.insert(0, sys.argv[1])
from preprocess_data import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_merge_task_killed_is_refused_and_the_relaunch_copies_only_the_rest(documents, tmp_path, capsys):
    tasks = tmp_path / "tasks"
    command = ["--input", str(documents), "--output-prefix", str(tasks), *BUILD, "--executor", "local",
               "--tasks-in-parallel", "1", "--merge-tasks", "3"]  # one at a time, in this process
    killed = subprocess.run([sys.executable, "-c", KILL_BEFORE_COPY_RECORD, str(REPO / "tools"), *command],
                            capture_output=True, text=True, start_new_session=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "tasks_text_document.bin.merging").is_file()
    assert main(["--input", str(documents), "--output-prefix", str(tasks), *BUILD, "--merge-only",
                 "--merge-tasks", "3"]) == 1
    error = capsys.readouterr().err
    assert "copy: merge tasks 1, 2 of 3 have not copied their part; nothing merged; relaunch" in error
    assert sorted(path.name for path in tmp_path.glob("tasks_text*")) == ["tasks_text_document.bin.merging"]
    done = tmp_path / "tasks.tasks" / "copy" / "done"
    assert [path.name for path in done.iterdir()] == ["00000.json"]
    assert main(command) == 0
    assert "tasks: 0 of 5 to run (5 complete)" in capsys.readouterr().out
    logs = tmp_path / "tasks.tasks" / "copy" / "executor" / "logs"
    assert "copied already" in (logs / "task_00000.log").read_text()
    assert "copied tasks" in (logs / "task_00001.log").read_text()  # killed before it could say so the first time
    assert _outputs(tasks) == _single_machine(documents, tmp_path / "single")
    assert not (tmp_path / "tasks_text_document.bin.merging").exists()


def test_a_bad_record_fails_its_task_only_and_skip_bad_records_goes_on(documents, tmp_path, capsys):
    bad = documents / "part-4.jsonl"
    lines = bad.read_bytes().splitlines(keepends=True)
    bad.write_bytes(b"".join([*lines[:2], b'{"text": "cut off\n', *lines[2:]]))
    command = ["--input", str(documents), "--output-prefix", str(tmp_path / "tasks"), *BUILD, "--executor", "local",
               "--tasks-in-parallel", "1"]
    assert main(command) == 1
    error = capsys.readouterr().err
    assert f"1 of 5 tasks are not complete: task 4 ({bad}): failed: {bad}:3: malformed JSON" in error
    assert [_record(tmp_path / "tasks", index)["documents"] for index in range(4)] == [40, 40, 0, 60]
    # --skip-bad-records may be turned on for the relaunch (the finished tasks met the stricter rule): task 4 alone runs
    assert main([*command, "--skip-bad-records"]) == 0
    assert "tasks: 1 of 5 to run (4 complete)" in capsys.readouterr().out
    assert _record(tmp_path / "tasks", 4)["skipped"] == {"malformed JSON": 1}
    assert _outputs(tmp_path / "tasks") == _single_machine(documents, tmp_path / "single", "--skip-bad-records")
    # and not off again: the plan now skips bad records
    assert main(command) == 1
    assert "planned with skip_bad_records True (now False)" in capsys.readouterr().err


def test_a_record_not_matching_its_files_or_a_changed_plan_is_refused(documents, tmp_path, capsys):
    prefix = tmp_path / "tasks"
    local = ["--executor", "local", "--tasks-in-parallel", "1"]
    assert main(["--input", str(documents), "--output-prefix", str(prefix), *BUILD, *local]) == 0
    part = tmp_path / "tasks.tasks" / "outputs" / "00003" / "part_text_document.bin"
    part.write_bytes(part.read_bytes())  # replaced after its task's record was written
    assert main(["--input", str(documents), "--output-prefix", str(prefix), *BUILD, "--merge-only"]) == 1
    error = capsys.readouterr().err
    assert "1 of 5 tasks are not complete: task 3 (" in error and "its outputs are not the ones" in error
    plan = tmp_path / "tasks.tasks" / "plan.json"
    changes = [
        (BUILD[:-1], "append_eod True (now False)"),
        ([*BUILD, "--json-keys", "id"], "json_keys ['text'] (now ['id'])"),
        (BUILD, f"5 input files (6 now; first difference: None -> {documents / 'part-5.jsonl'})"),
    ]
    for build, difference in changes:
        if difference.startswith("5 input files"):
            (documents / "part-5.jsonl").write_text('{"text": "one more"}\n')
        assert main(["--input", str(documents), "--output-prefix", str(prefix), *build, *local]) == 1
        assert capsys.readouterr().err == (f"error: {plan}: this build was planned with {difference}; relaunch it "
                                           f"with the plan's input and options, or build afresh under a new "
                                           f"--output-prefix\n")
    (documents / "part-5.jsonl").unlink()
    os.utime(documents / "part-0.jsonl", ns=(1, 1))
    assert main(["--input", str(documents), "--output-prefix", str(prefix), *BUILD, *local]) == 1
    assert f"planned with {documents / 'part-0.jsonl'} of size and version [" in capsys.readouterr().err
    (tmp_path / "tasks.tasks" / "plan.json").write_text("[]")
    assert main(["--input", str(documents), "--output-prefix", str(prefix), *BUILD, *local]) == 1
    assert "plan.json: not a build plan this megapico wrote" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:placement_group:DeprecationWarning")  # datatrove's use of Ray
def test_a_local_ray_cluster_writes_the_single_machine_bytes(documents, tmp_path, capsys):
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e .[ray])")
    expected = _single_machine(documents, tmp_path / "single")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert main(["--input", str(documents), "--output-prefix", str(tmp_path / "tasks"), *BUILD,
                     "--executor", "ray", "--mem-per-cpu-gb", "0.25", "--merge-tasks", "2"]) == 0
    finally:
        ray.shutdown()
    assert "tasks: 5 of 5 to run (0 complete) on ray" in capsys.readouterr().out
    assert _outputs(tmp_path / "tasks") == expected


@pytest.mark.skipif(not slurm_cluster_up("sbatch"), reason="no idle SLURM cluster reachable from here "
                                                          "(scripts/ci_launchers.sh sets one up as root)")
@pytest.mark.parametrize("merge_tasks", ["1", "2"])
def test_a_slurm_job_array_writes_the_single_machine_bytes(documents, tmp_path, capsys, merge_tasks):
    expected = _single_machine(documents, tmp_path / "single")
    partition = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True).stdout.split()[0]
    assert main(["--input", str(documents), "--output-prefix", str(tmp_path / "tasks"), *BUILD, "--executor", "slurm",
                 "--slurm-partition", partition.rstrip("*"), "--slurm-time", "00:10:00", "--cpus-per-task", "1",
                 "--mem-per-cpu-gb", "0", "--merge-tasks", merge_tasks]) == 0
    merge_job = re.search(r"the merge as job (\d+)", capsys.readouterr().out).group(1)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and subprocess.run(["squeue", "-h", "-j", merge_job], capture_output=True,
                                                         text=True).stdout.strip():
        time.sleep(2)
    logs = sorted((tmp_path / "tasks.tasks").rglob("slurm_logs/*.out"))
    assert (tmp_path / "tasks_text_document.megapico.json").is_file(), "\n".join(log.read_text()[-1500:]
                                                                               for log in logs)
    assert _outputs(tmp_path / "tasks") == expected


# ---- the merge's copy ------------------------------------------------------------------------------------------
def _parts(tmp_path, sizes):
    rng = np.random.default_rng(0)
    prefixes, documents = [], []
    for index, size in enumerate(sizes):
        prefixes.append(tmp_path / f"part{index}")
        with IndexedDatasetWriter(prefixes[-1], np.uint16) as writer:
            for length in rng.integers(1, 50, size):
                documents.append(rng.integers(0, 50280, length))
                writer.add_document(documents[-1])
    with IndexedDatasetWriter(tmp_path / "one_write", np.uint16) as writer:
        for document in documents:
            writer.add_document(document)
    return prefixes


def _same_files(a, b):
    return all(open(f"{a}{s}", "rb").read() == open(f"{b}{s}", "rb").read() for s in (".bin", ".idx"))


def test_the_parallel_merge_copies_in_pieces_the_bytes_of_one_write(tmp_path, monkeypatch):
    prefixes = _parts(tmp_path, [30, 0, 70, 5])
    monkeypatch.setattr(indexed_dataset, "_COPY_PIECE", 64)  # many pieces per file, shared among the threads
    merged = merge_datasets(prefixes, tmp_path / "merged", workers=3)
    assert len(merged) == 105 and _same_files(tmp_path / "merged", tmp_path / "one_write")


def test_the_merge_copies_through_reads_and_writes_where_copy_file_range_is_refused(tmp_path, monkeypatch):
    def refused(*args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refused)
    merge_datasets(_parts(tmp_path, [20, 9]), tmp_path / "merged", workers=2)
    assert _same_files(tmp_path / "merged", tmp_path / "one_write")
    assert IndexedDataset(tmp_path / "merged").num_tokens == IndexedDataset(tmp_path / "one_write").num_tokens
