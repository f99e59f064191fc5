"""One preprocessing build split into tasks, one per input file, run by datatrove's executors on this machine, as a
SLURM job array or on a Ray cluster, then merged into the bytes the single-machine build writes.

Each task is megapico's own build (preprocess.preprocess) of its one file; datatrove only schedules the tasks,
keeps their logs and skips, on a relaunch, the ones it saw finish. Everything lives under `{output_prefix}.tasks/`:

    plan.json             the sources (path, size, mtime or version) in discover_sources order and the options
                          that shape the output, written by the first launch; a relaunch with other input or
                          options is refused, naming what changed
    outputs/NNNNN/        task N's build: part_{key}_document.{bin,idx,megapico.json,sources.*}
    done/NNNNN.json       task N's completion record, written last (temporary + rename): its source, documents,
                          tokens, skipped records by reason, and the size and mtime of each output file
    failed/NNNNN.txt      the one-line error of task N's last failed try
    executor/             datatrove's logging_dir for the tasks: logs/task_NNNNN.log, completions/, stats/ (SLURM:
                          slurm_logs/, the launch script)
    merge/                the same for the SLURM merge job
    copy/                 with --merge-tasks M > 1: done/RRRRR.json, merge task R's completion record (the merge
                          plan's digest, the inode of the .bin it copied into), and executor/, their datatrove logs;
                          the .bin being copied is `{output}.bin.merging` beside the output, renamed into place last

The completion record is what counts. A task starts by removing its earlier try's files, so a try killed half-way
leaves no record, and the merge takes a task as complete only when its record matches the files beside it.
datatrove's own markers (executor/completions/NNNNN) only let a relaunch skip a task: before launching, the marker of
every task without a matching record is removed, so that task runs again. The merge is tools/merge_datasets.py's
(merge.merge_prefixes, tasks in plan order), and refuses an incomplete set in one line naming the missing tasks.
With M merge tasks the .bin copy runs on the same executor, each a contiguous range of tasks copied at its offset
(run_merge_task), and the merge step writes the rest and renames the .bin into place (merge_tasks).
"""

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from datatrove.executor import LocalPipelineExecutor, RayPipelineExecutor, SlurmPipelineExecutor
from datatrove.utils.logging import logger
from datatrove.utils.stats import PipelineStats

from megapico.data.indexed_dataset import DataError, copy_bins, data_file_paths
from megapico.data.merge import merge_prefixes
from megapico.data.preprocess import PreprocessOptions, output_prefix_for, preprocess
from megapico.data.readers import discover_sources, source_identity
from megapico.data.tokenizer import load_tokenizer

PLAN_FORMAT = 1
RECORD_FORMAT = 1
EXECUTORS = ("local", "slurm", "ray")
_LISTED = 5  # incomplete tasks named in the merge's refusal; the rest are counted


@dataclass
class ExecutorOptions:
    """Where and how wide the tasks run; none of it changes the output."""

    executor: str  # one of EXECUTORS
    tasks_in_parallel: int | None = None  # local: cores // --workers by default; SLURM and Ray: all at once
    cpus_per_task: int | None = None  # cores a SLURM or Ray task reserves; the task's --workers by default
    mem_per_cpu_gb: float = 2  # memory per reserved core on SLURM or Ray; 0 asks for none
    slurm_partition: str | None = None
    slurm_time: str | None = None  # the array's time limit per task, e.g. 12:00:00
    slurm_qos: str | None = None  # none given: the account's default
    merge_tasks: int = 1  # processes (SLURM: array tasks) that copy the .bin into place; 1: the merge alone does


def tasks_dir(output_prefix: str) -> Path:
    return Path(f"{output_prefix}.tasks")


def _record_path(tasks: Path, index: int) -> Path:
    return tasks / "done" / f"{index:05d}.json"


def _failure_path(tasks: Path, index: int) -> Path:
    return tasks / "failed" / f"{index:05d}.txt"


def _task_prefix(tasks: Path, index: int) -> Path:
    return tasks / "outputs" / f"{index:05d}" / "part"


def _write_atomically(path: Path, text: str) -> None:
    """A new temporary of random name beside `path`, renamed onto it: a reader sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(name, path)
    finally:
        Path(name).unlink(missing_ok=True)


# ---- the plan --------------------------------------------------------------------------------------------------
def _identity(source: str) -> dict:
    """A source as the plan and its task's record hold it: its path (or URL) and what tells it from a changed one."""
    return {"path": source, "identity": source_identity(source)}


def _plan_of(options: PreprocessOptions, directory: str) -> dict:
    """The sources and every option that shapes the output; paths are relative to `directory`, the launch's."""
    tokenizer = load_tokenizer(options.tokenizer_model, options.tokenizer_type) if options.tokenizer_model else None
    return {"format": PLAN_FORMAT, "directory": directory,
            "sources": [_identity(source) for source in discover_sources(options.input)],
            "options": {"json_keys": options.json_keys, "tokenizer_model": options.tokenizer_model,
                        "tokenizer_type": options.tokenizer_type,
                        "tokenizer_sha256": tokenizer.fingerprint() if tokenizer else None,
                        "append_eod": options.append_eod, "skip_bad_records": options.skip_bad_records,
                        "hf_split": options.hf_split, "vocab_size": options.vocab_size,
                        "max_document_bytes": options.max_document_bytes}}


def _difference(planned: dict, now: dict) -> str | None:
    """What differs between the plan and this command's, in words; None when the build may go on. Turning
    skip_bad_records on is not a difference: the tasks finished without it met the stricter rule (it is how a build
    stopped by a bad record goes on)."""
    if planned.get("format") != PLAN_FORMAT:
        return f"plan format {planned.get('format')} (this megapico writes {PLAN_FORMAT})"
    if planned["directory"] != now["directory"]:
        return f"the launch directory {planned['directory']} (now {now['directory']}), which relative paths follow"
    paths, now_paths = [s["path"] for s in planned["sources"]], [s["path"] for s in now["sources"]]
    if paths != now_paths:
        first = next((a, b) for a, b in zip([*paths, None], [*now_paths, None], strict=False) if a != b)
        return f"{len(paths)} input files ({len(now_paths)} now; first difference: {first[0]} -> {first[1]})"
    for source, now_source in zip(planned["sources"], now["sources"], strict=True):
        if source != now_source:
            return (f"{source['path']} of size and version {source['identity'][1:]} (now "
                    f"{now_source['identity'][1:]})")
    for name, value in planned["options"].items():
        now_value = now["options"].get(name)
        if value != now_value and not (name == "skip_bad_records" and now_value):
            return f"{name} {value!r} (now {now_value!r})"
    return None


def _checked_plan(options: PreprocessOptions, directory: str, write: bool) -> dict:
    """The plan of this command, refused in one line where an existing plan differs; written when `write`."""
    path = tasks_dir(options.output_prefix) / "plan.json"
    plan = _plan_of(options, directory)
    if path.is_file():
        try:
            planned = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"{path}: unreadable ({type(err).__name__}); build afresh under a new --output-prefix "
                            f"(or remove {path.parent})") from None
        try:
            difference = _difference(planned, plan)
        except (KeyError, TypeError, AttributeError):
            raise DataError(f"{path}: not a build plan this megapico wrote; build afresh under a new --output-prefix "
                            f"(or remove {path.parent})") from None
        if difference is not None:
            raise DataError(f"{path}: this build was planned with {difference}; relaunch it with the plan's input and "
                            f"options, or build afresh under a new --output-prefix")
    elif not write:
        raise DataError(f"{path}: missing, so no tasks of this build ran; launch them first (--executor)")
    if write:
        _write_atomically(path, json.dumps(plan, indent=1) + "\n")
    return plan


# ---- one task --------------------------------------------------------------------------------------------------
def _output_files(tasks: Path, index: int, keys: list[str]) -> dict:
    """Size and mtime of each of a task's .bin/.idx, as its record holds them (None for a missing file)."""
    files = {}
    for key in keys:
        for path in data_file_paths(output_prefix_for(str(_task_prefix(tasks, index)), key)):
            stat = path.stat() if path.is_file() else None
            files[path.name] = [stat.st_size, stat.st_mtime_ns] if stat else None
    return files


def run_task(options: PreprocessOptions, index: int) -> dict:
    """Task `index` of the build planned under options.output_prefix (paths relative to the current directory):
    megapico's build of its one source into outputs/NNNNN, then its completion record, last. An earlier try's files
    are removed first; a failure leaves its one line in failed/NNNNN.txt and raises."""
    tasks = tasks_dir(options.output_prefix)
    source = json.loads((tasks / "plan.json").read_text())["sources"][index]
    for path in (_record_path(tasks, index), _failure_path(tasks, index)):
        path.unlink(missing_ok=True)
    shutil.rmtree(_task_prefix(tasks, index).parent, ignore_errors=True)
    try:
        if _identity(source["path"]) != source:
            raise DataError(f"{source['path']}: changed since the build was planned ({tasks / 'plan.json'}); "
                            f"restore it, or build afresh under a new --output-prefix")
        summary = preprocess(replace(options, input=source["path"], output_prefix=str(_task_prefix(tasks, index)),
                                     allow_no_documents=True))
    except Exception as err:
        _write_atomically(_failure_path(tasks, index), f"{str(err).splitlines()[0] if str(err) else repr(err)}\n")
        raise
    record = {"format": RECORD_FORMAT, "task": index, "source": source, "documents": summary["documents"],
              "tokens": summary["tokens"], "documents_read": summary["documents_read"],
              "skipped": summary["skipped"], "seconds": round(summary["seconds"], 3),
              "outputs": _output_files(tasks, index, options.json_keys)}
    _write_atomically(_record_path(tasks, index), json.dumps(record, indent=1) + "\n")
    logger.info(f"task {index}: {source['path']}: {record['documents']:,} documents, {record['tokens']:,} tokens, "
                f"skipped {record['skipped'] or 'none'} in {record['seconds']:.1f}s")
    return record


def _why_incomplete(plan: dict, tasks: Path, index: int) -> str | None:
    """None when task `index` is complete: its record is of the planned source and matches the files beside it."""
    path = _record_path(tasks, index)
    if not path.is_file():
        failure = _failure_path(tasks, index)
        return f"failed: {failure.read_text().strip()}" if failure.is_file() else "not run, or stopped before the end"
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"{path} is unreadable"
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT or \
            record.get("source") != plan["sources"][index]:
        return f"{path} is not a record of this plan's task"
    if record.get("outputs") != _output_files(tasks, index, plan["options"]["json_keys"]):
        return f"its outputs are not the ones {path} recorded"
    return None


def incomplete_tasks(plan: dict, tasks: Path) -> dict[int, str]:
    """Every task of the plan that is not complete, with why."""
    why = {index: _why_incomplete(plan, tasks, index) for index in range(len(plan["sources"]))}
    return {index: reason for index, reason in why.items() if reason is not None}


# ---- the merge -------------------------------------------------------------------------------------------------
def _finished_records(options: PreprocessOptions) -> list[dict]:
    """The completion records of every task, in plan order; an incomplete set, or one without a document, is
    refused in one line naming the missing tasks."""
    tasks = tasks_dir(options.output_prefix)
    plan = _checked_plan(options, os.getcwd(), write=False)
    incomplete = incomplete_tasks(plan, tasks)
    if incomplete:
        named = "; ".join(f"task {index} ({plan['sources'][index]['path']}): {why}"
                          for index, why in list(incomplete.items())[:_LISTED])
        more = f"; and {len(incomplete) - _LISTED} more" if len(incomplete) > _LISTED else ""
        raise DataError(f"{tasks}: {len(incomplete)} of {len(plan['sources'])} tasks are not complete: {named}{more}; "
                        f"nothing merged; relaunch the same command to run only these (logs: "
                        f"{tasks / 'executor' / 'logs'})")
    records = [json.loads(_record_path(tasks, index).read_text()) for index in range(len(plan["sources"]))]
    if not sum(record["documents"] for record in records):
        read = sum(record["documents_read"] for record in records)
        reasons = ", ".join(f"{reason}: {count:,}" for reason, count in sorted(_skipped(records).items())) or "none"
        raise DataError(f"{options.input}: no documents in any of the {len(records)} files ({read:,} read; skipped "
                        f"{reasons}); nothing merged")
    return records


def _skipped(records: list[dict]) -> Counter:
    return sum((Counter(record["skipped"]) for record in records), Counter())


def _task_prefixes(options: PreprocessOptions, key: str) -> list[str]:
    tasks = tasks_dir(options.output_prefix)
    count = len(json.loads((tasks / "plan.json").read_text())["sources"])
    return [output_prefix_for(str(_task_prefix(tasks, index)), key) for index in range(count)]


def _copied_bin(options: PreprocessOptions, key: str) -> Path:
    """The temporary .bin the merge tasks copy into; the final step renames it into place."""
    return Path(f"{output_prefix_for(options.output_prefix, key)}.bin.merging")


def _copy_record_path(tasks: Path, rank: int) -> Path:
    return tasks / "copy" / "done" / f"{rank:05d}.json"


def _copy_plan(options: PreprocessOptions, records: list[dict], merge_count: int) -> dict:
    """Merge task r copies tasks bounds[r]..bounds[r+1] (contiguous, about the same bytes each) of every key into
    the temporary .bin at their offset. The plan holds the tasks' recorded outputs (sizes and mtimes), so a task
    run again since makes every copy record of the old plan stale; `digest` names the plan in the records."""
    sizes = {key: [Path(f"{prefix}.bin").stat().st_size for prefix in _task_prefixes(options, key)]
             for key in options.json_keys}
    cumulative = np.cumsum([sum(per_task) for per_task in zip(*sizes.values(), strict=True)])
    bounds = [0, *(int(np.searchsorted(cumulative, cumulative[-1] * rank / merge_count))
                   for rank in range(1, merge_count)), len(records)]
    plan = {"merge_tasks": merge_count, "bounds": bounds, "outputs": [record["outputs"] for record in records]}
    return {**plan, "sizes": sizes, "digest": hashlib.sha256(json.dumps(plan).encode()).hexdigest()}


def _copy_record(options: PreprocessOptions, plan: dict, rank: int) -> dict:
    """What merge task `rank`'s record holds: its plan, and the temporary .bin files (by inode) it copied into."""
    return {"format": RECORD_FORMAT, "merge_task": rank, "plan": plan["digest"],
            "bins": {key: _copied_bin(options, key).stat().st_ino if _copied_bin(options, key).is_file() else None
                     for key in options.json_keys}}


def _copied(options: PreprocessOptions, plan: dict, rank: int) -> bool:
    path = _copy_record_path(tasks_dir(options.output_prefix), rank)
    try:
        return json.loads(path.read_text()) == _copy_record(options, plan, rank)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


def run_merge_task(options: PreprocessOptions, rank: int, merge_count: int) -> None:
    """Merge task `rank` of `merge_count`: copy its range of the tasks' .bin files into the temporary .bin of each
    key, at their offsets, then write its completion record. Every merge task opens the temporary .bin without
    truncating it and sizes it to the whole (the same size from each, so nobody's bytes are lost); a merge task
    whose record is current has nothing to do, so a relaunch copies only the ranges without one."""
    plan = _copy_plan(options, _finished_records(options), merge_count)
    if _copied(options, plan, rank):
        logger.info(f"merge task {rank}: copied already")
        return
    _copy_record_path(tasks_dir(options.output_prefix), rank).unlink(missing_ok=True)
    first, stop = plan["bounds"][rank], plan["bounds"][rank + 1]
    for key in options.json_keys:
        descriptor = os.open(_copied_bin(options, key), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.ftruncate(descriptor, sum(plan["sizes"][key]))
            paths = [Path(f"{prefix}.bin") for prefix in _task_prefixes(options, key)[first:stop]]
            copy_bins(paths, descriptor, sum(plan["sizes"][key][:first]), options.workers)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    _write_atomically(_copy_record_path(tasks_dir(options.output_prefix), rank),
                      json.dumps(_copy_record(options, plan, rank)) + "\n")
    logger.info(f"merge task {rank}: copied tasks {first} to {stop - 1}")


def merge_tasks(options: PreprocessOptions, workers: int = 1, merge_count: int = 1) -> dict:
    """Merge the complete set of tasks into `{output_prefix}_{key}_document.*`, the bytes one single-machine build
    of the same input writes; an incomplete set is refused, naming the missing tasks. With one merge task the .bin
    files are copied here by `workers` threads; with more, run_merge_task copied them (any missing is refused,
    naming it) and this writes the index, the record and the document sources, then renames the .bin into place.
    Returns the build's summary."""
    records = _finished_records(options)
    outputs = [output_prefix_for(options.output_prefix, key) for key in options.json_keys]
    if merge_count == 1:
        for key, output in zip(options.json_keys, outputs, strict=True):
            merge_prefixes(_task_prefixes(options, key), output, workers)
    else:
        plan = _copy_plan(options, records, merge_count)
        missing = [rank for rank in range(merge_count) if not _copied(options, plan, rank)]
        copies = tasks_dir(options.output_prefix) / "copy"
        if missing:
            raise DataError(f"{copies}: merge tasks {', '.join(map(str, missing))} of {merge_count} have not copied "
                            f"their part; nothing merged; relaunch the same command to run only these (logs: "
                            f"{copies / 'executor' / 'logs'})")
        try:
            for key, output in zip(options.json_keys, outputs, strict=True):
                merge_prefixes(_task_prefixes(options, key), output, copied_bin=_copied_bin(options, key))
        finally:  # a renamed (or, on failure, removed) temporary .bin leaves no copy record standing
            if not all(_copied_bin(options, key).is_file() for key in options.json_keys):
                shutil.rmtree(copies / "done", ignore_errors=True)
    return {"tasks": len(records), "documents": sum(record["documents"] for record in records),
            "tokens": sum(record["tokens"] for record in records), "skipped": dict(_skipped(records)),
            "outputs": outputs}


# ---- executors -------------------------------------------------------------------------------------------------
def _task_step(options: PreprocessOptions, directory: str, data: object, rank: int, world_size: int) -> None:
    """A datatrove pipeline step: task `rank` of the build, run from the launch directory (as sbatch does), so the
    relative paths of the command line mean there what they meant where it was typed."""
    os.chdir(directory)
    run_task(options, rank)


def _copy_step(options: PreprocessOptions, directory: str, data: object, rank: int, world_size: int) -> None:
    """A datatrove pipeline step: merge task `rank` of `world_size`."""
    os.chdir(directory)
    run_merge_task(options, rank, world_size)


def _merge_step(options: PreprocessOptions, directory: str, merge_count: int, data: object, rank: int,
                world_size: int) -> None:
    """The SLURM merge job's pipeline step."""
    os.chdir(directory)
    summary = merge_tasks(options, options.workers, merge_count)
    logger.info(f"merged {summary['tasks']} tasks: {summary['documents']:,} documents, {summary['tokens']:,} tokens "
                f"-> {', '.join(summary['outputs'])}")


class _LocalExecutor(LocalPipelineExecutor):
    """datatrove's local executor ends every task at the first one that fails, where a SLURM array and Ray run the
    others on; this one runs them on too. A failed task has its traceback in its log and its line in failed/, stays
    incomplete, and the merge names it."""

    def _launch_run_for_rank(self, rank: int, ranks_q: object, completed: object = None,
                             completed_lock: object = None) -> PipelineStats:
        try:
            return super()._launch_run_for_rank(rank, ranks_q, completed, completed_lock)
        except Exception:
            return PipelineStats()


class _SlurmExecutor(SlurmPipelineExecutor):
    """datatrove queues a stats-summing job after each array that waits for every task to succeed, so after one
    failed task it would wait in the queue for ever. The merge job, which runs however the array ends, reports
    instead."""

    def launch_merge_stats(self) -> None:
        pass


def _slurm_jobs(options: PreprocessOptions, how: ExecutorOptions, directory: str, count: int) -> tuple[str, str]:
    """Queue the array of tasks, the array of merge tasks after it where how.merge_tasks > 1, and the merge job
    last (each afterany: a merge over a failed task names it); the ids of the first and the last."""
    tasks = tasks_dir(options.output_prefix).resolve()
    activate = Path(sys.prefix) / "bin" / "activate"
    common = dict(time=how.slurm_time, partition=how.slurm_partition, qos=how.slurm_qos,
                  cpus_per_task=how.cpus_per_task or options.workers,
                  sbatch_args={"mem-per-cpu": f"{round(how.mem_per_cpu_gb * 1024)}M"},  # sbatch takes no 1.5G
                  venv_path=str(activate) if sys.prefix != sys.base_prefix else None)
    name = Path(options.output_prefix).name
    array = _SlurmExecutor([functools.partial(_task_step, options, directory)], tasks=count,
                           workers=how.tasks_in_parallel or -1, job_name=f"megapico-tasks-{name}",
                           logging_dir=str(tasks / "executor"), **common)
    before_merge = array
    if how.merge_tasks > 1:  # the copy array, after the tasks however they end (a copy over a failed one names it)
        before_merge = _SlurmExecutor([functools.partial(_copy_step, options, directory)], tasks=how.merge_tasks,
                                      depends=array, run_on_dependency_fail=True, skip_completed=False,
                                      job_name=f"megapico-copy-{name}", logging_dir=str(tasks / "copy" / "executor"),
                                      **common)
    merge = _SlurmExecutor([functools.partial(_merge_step, options, directory, how.merge_tasks)], tasks=1,
                           depends=before_merge, run_on_dependency_fail=True, skip_completed=False,
                           job_name=f"megapico-merge-{name}", logging_dir=str(tasks / "merge"), **common)
    try:
        merge.run()
    except subprocess.CalledProcessError as err:
        raise DataError(f"sbatch refused the job ({err}; its message is above); the script is "
                        f"{tasks / 'executor' / 'launch_script.slurm'}") from None
    return str(array.job_id if array.job_id not in (None, -1) else "none: every task is complete"), str(merge.job_id)


def launch(options: PreprocessOptions, how: ExecutorOptions) -> dict:
    """Plan the build (or check it against its plan), run its incomplete tasks with `how.executor`, then merge:
    how.merge_tasks merge tasks on the same executor copy the .bin into place where that is more than one. Locally
    and on Ray this returns merge_tasks' summary; on SLURM it returns once the jobs are queued ({"array_job",
    "merge_job"})."""
    directory = os.getcwd()
    plan = _checked_plan(options, directory, write=True)
    tasks = tasks_dir(options.output_prefix)
    count = len(plan["sources"])
    incomplete = incomplete_tasks(plan, tasks)
    for index in incomplete:  # datatrove must not skip a task whose record is missing or stale
        (tasks / "executor" / "completions" / f"{index:05d}").unlink(missing_ok=True)
    print(f"tasks: {len(incomplete)} of {count} to run ({count - len(incomplete)} complete) on {how.executor}; logs "
          f"in {tasks / 'executor' / 'logs'}")
    if how.executor == "slurm":
        array_job, merge_job = _slurm_jobs(options, how, directory, count)
        return {"array_job": array_job, "merge_job": merge_job}
    _run_here_or_on_ray(how, options, functools.partial(_task_step, options, directory), count, tasks / "executor",
                        how.tasks_in_parallel or max(1, (os.cpu_count() or 1) // options.workers))
    if how.merge_tasks > 1:
        _finished_records(options)  # an incomplete set is refused here, not in each merge task
        _run_here_or_on_ray(how, options, functools.partial(_copy_step, options, directory), how.merge_tasks,
                            tasks / "copy" / "executor", how.tasks_in_parallel or how.merge_tasks, skip_completed=False)
    return merge_tasks(options, options.workers, how.merge_tasks)


def _run_here_or_on_ray(how: ExecutorOptions, options: PreprocessOptions, step: functools.partial, count: int,
                        logging_dir: Path, local_parallel: int, skip_completed: bool = True) -> None:
    """Run `count` ranks of `step` with datatrove's local executor (`local_parallel` at once) or on Ray (as many at
    once as how.tasks_in_parallel, else all). Merge tasks skip themselves where their record is current, so they
    run without datatrove's skipping of completed ranks."""
    if how.executor == "local":
        _LocalExecutor([step], tasks=count, workers=local_parallel, logging_dir=str(logging_dir.resolve()),
                       skip_completed=skip_completed).run()
        return
    import ray  # the `ray` extra: pip install -e .[ray]

    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS, else the cluster `ray start` began on this machine, else a new local one
    RayPipelineExecutor([step], tasks=count, workers=how.tasks_in_parallel or -1,
                        logging_dir=str(logging_dir.resolve()), skip_completed=skip_completed,
                        cpus_per_task=how.cpus_per_task or options.workers,
                        mem_per_cpu_gb=how.mem_per_cpu_gb).run()
