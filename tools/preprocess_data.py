"""Tokenize Dolma (or any JSON-lines / parquet / HF dataset) into Megatron-LM's .bin/.idx.

Megatron's command line works unchanged (this one is examples/cpu_demo.sh's, on the shipped Dolma sample):
    python tools/preprocess_data.py --input data/sample/documents --output-prefix runs/cpu-demo-data/sample \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model data/tokenizers/olmo-gpt-neox-dolma-v1_5.json \\
        --append-eod --workers 2
Outputs `{output_prefix}_{key}_document.{bin,idx}` for every --json-keys key, and beside them
`{output_prefix}_{key}_document.megapico.json`: the tokenizer's fingerprint and the largest token id, which
training checks against its tokenizer and model.vocab_size, and `.sources.{json,bin}`: each document's input file and
line (or row), which tools/trace_data.py reads. Input with no documents is an error; nothing is written.

The same build on many machines: one task per input file under OUTPUT_PREFIX.tasks/, run by datatrove's executors,
then merged into the same bytes (docs/data.md#dolma-on-many-machines). Add to the flags above:
    --executor local --tasks-in-parallel 8                      # here: 8 files at once, then the merge
    --executor slurm --slurm-partition P --slurm-time 12:00:00 --workers 76   # a job array + a merge job after it
    --executor ray                                              # on the Ray cluster RAY_ADDRESS (or ray start) names
    --merge-tasks 16                                            # the .bin copied into place by 16 tasks at once
    --merge-only                                                # the merge alone, of a finished set of tasks
A relaunch of the same command runs only the tasks not complete; the merge refuses an incomplete set, naming them.
"""

import argparse
import sys

from megapico.data.build_tasks import EXECUTORS, ExecutorOptions, launch, merge_tasks
from megapico.data.indexed_dataset import DataError
from megapico.data.preprocess import PreprocessOptions, preprocess
from megapico.data.readers import MAX_DOCUMENT_BYTES
from megapico.data.tokenizer import BACKENDS, TOKENIZER_TYPES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input")
    group.add_argument("--input", required=True,
                       help="a file (.jsonl, .json.gz, .jsonl.zst, .parquet), a directory (Dolma's documents/), "
                            "a glob, or a dataset saved with datasets' save_to_disk; local or an fsspec URL "
                            "(s3://, hf://datasets/ORG/NAME/..., file://), streamed")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="fields (columns) to tokenize")
    group.add_argument("--hf-split", default="train", help="split of a saved HF DatasetDict")
    group.add_argument("--skip-bad-records", action="store_true",
                       help="count and skip malformed records instead of stopping at the first one")
    group.add_argument("--max-document-bytes", type=int, default=MAX_DOCUMENT_BYTES,
                       help="longest JSON line read, in bytes (default 64 MiB, far above any Dolma document); a "
                            "longer one is a bad record, refused or skipped without being held in memory")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", choices=sorted(TOKENIZER_TYPES), default=None,
                       help="default: SentencePieceTokenizer for a .model file, else HuggingFaceTokenizer")
    group.add_argument("--tokenizer-model", help="tokenizer.json, a HF tokenizer directory, or a sentencepiece .model")
    group.add_argument("--tokenizer-backend", choices=BACKENDS, default="auto",
                       help="encoder for a HF tokenizer: tiktoken (same ids, ~4x faster; byte-level BPE files such "
                            "as pico's), huggingface, or auto = tiktoken where the file allows it")
    group.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    group.add_argument("--vocab-size", type=int, help="for already tokenized input without --tokenizer-model")
    group = parser.add_argument_group("output")
    group.add_argument("--output-prefix", required=True,
                       help="path and name stem of the outputs: PREFIX_KEY_document.bin/.idx/.megapico.json")
    group.add_argument("--dataset-impl", choices=["mmap"], default="mmap", help="accepted for old Megatron scripts")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    group.add_argument("--log-interval", type=int, default=1000,
                       help="accepted for Megatron compatibility; the progress bar refreshes every second")
    group = parser.add_argument_group("many machines: one task per input file (docs/data.md#dolma-on-many-machines)")
    group.add_argument("--executor", choices=EXECUTORS,
                       help="run the tasks here (local), as a SLURM job array (slurm) or on a Ray cluster (ray), then "
                            "merge; a relaunch runs only the tasks not complete")
    group.add_argument("--merge-only", action="store_true",
                       help="only merge the finished tasks of an earlier --executor launch of this command (with "
                            "--merge-tasks M > 1: only the merge step, after its M merge tasks copied)")
    group.add_argument("--merge-tasks", type=int, default=1,
                       help="processes (SLURM: array tasks) of the same executor that copy the .bin into place, each a "
                            "contiguous range of tasks at its offset (default 1: the merge alone copies, with "
                            "--workers threads)")
    group.add_argument("--tasks-in-parallel", type=int,
                       help="tasks at once (default: local, cores // --workers; SLURM and Ray, all)")
    group.add_argument("--cpus-per-task", type=int, help="cores each SLURM or Ray task reserves (default: --workers)")
    group.add_argument("--mem-per-cpu-gb", type=float, default=2,
                       help="memory per reserved core on SLURM or Ray (default 2; 0 asks for none)")
    group.add_argument("--slurm-partition", help="the partition of the job array and the merge job")
    group.add_argument("--slurm-time", help="time limit of each task's job, e.g. 12:00:00")
    group.add_argument("--slurm-qos", help="quality of service (default: the account's)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.max_document_bytes < 1:
        print(f"error: --max-document-bytes must be positive, got {args.max_document_bytes}", file=sys.stderr)
        return 1
    for flag in ("tasks_in_parallel", "cpus_per_task", "merge_tasks"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            print(f"error: --{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}", file=sys.stderr)
            return 1
    if args.executor == "slurm" and not (args.slurm_partition and args.slurm_time):
        print("error: --executor slurm needs --slurm-partition and --slurm-time", file=sys.stderr)
        return 1
    options = PreprocessOptions(
        input=args.input, output_prefix=args.output_prefix, json_keys=args.json_keys,
        tokenizer_model=args.tokenizer_model, tokenizer_type=args.tokenizer_type,
        tokenizer_backend=args.tokenizer_backend, append_eod=args.append_eod,
        workers=max(1, args.workers), skip_bad_records=args.skip_bad_records, hf_split=args.hf_split,
        vocab_size=args.vocab_size, max_document_bytes=args.max_document_bytes)
    if args.executor or args.merge_only:
        return _many_machines(args, options)
    try:
        summary = preprocess(options)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    skipped = ", ".join(f"{reason}: {count}" for reason, count in sorted(summary["skipped"].items())) or "none"
    print(f"done: {summary['documents']:,} documents, {summary['tokens']:,} tokens from {summary['files']} file(s) "
          f"({summary['resumed_files']} already done) in {summary['seconds']:.1f}s "
          f"({summary['documents'] / max(summary['seconds'], 1e-9):,.0f} docs/s); skipped: {skipped}")
    for output in summary["outputs"]:
        print(f"wrote {output}.bin / .idx / .megapico.json")
    return 0


def _many_machines(args: argparse.Namespace, options: PreprocessOptions) -> int:
    how = ExecutorOptions(args.executor, args.tasks_in_parallel, args.cpus_per_task, args.mem_per_cpu_gb,
                          args.slurm_partition, args.slurm_time, args.slurm_qos, args.merge_tasks)
    try:
        summary = merge_tasks(options, options.workers, args.merge_tasks) if args.merge_only else launch(options, how)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if "merge_job" in summary:
        print(f"queued: the tasks as SLURM job {summary['array_job']}, the merge as job {summary['merge_job']} "
              f"after it; relaunch this command to run what did not complete")
        return 0
    skipped = ", ".join(f"{reason}: {count}" for reason, count in sorted(summary["skipped"].items())) or "none"
    print(f"done: {summary['documents']:,} documents, {summary['tokens']:,} tokens from {summary['tasks']} task(s); "
          f"skipped: {skipped}")
    for output in summary["outputs"]:
        print(f"wrote {output}.bin / .idx / .megapico.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
