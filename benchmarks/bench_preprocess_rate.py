"""preprocess() against its own tokenizer's encode-only rate, side by side, on the same documents and cores.

Input: the Dolma sample (../shared/data/dolma-sample/documents) repeated to --docs documents, written twice: as
--files .json.gz files ("several") and as one .json.gz file ("one"). Pico's tokenizer, --append-eod.
- encode-only: the Tokenizer.encode_batch the build uses (same backend), on the same documents already decoded into
  Python str in memory, on N processes each with its contiguous share, in batches of --batch documents; timed from a
  barrier all N pass once their tokenizer is loaded and their share decoded, to the last one's end.
- preprocess: tools/preprocess_data.py's preprocess() in a child process, `--workers N`. Start-up (tokenizer loads,
  worker spawn, the tokenizer's fingerprint) is excluded by subtracting the median wall time of the same call on a
  one-document file, measured in every round. Peak RSS counts the main process and its workers; "main CPU" is the
  main process's own CPU seconds beyond that start-up (reading, decompressing, handing chunks out, writing): how far
  from idle it is.
- CPU ratio: encode-only CPU seconds over the build's (main process and workers, start-up subtracted likewise),
  medians: the share of the build's work that is encoding, which other jobs on a shared machine disturb far less
  than wall time (wall ratios also count idle waits, which CPU time does not).
The machine may be shared and noisy: rounds interleave every case; the ratios are best over best and median over
median.
    python benchmarks/bench_preprocess_rate.py --docs 200000 --workers 1 2 --rounds 3 [--profile]
--profile adds a cProfile of one `--workers 1` build of the several-files input (everything in one process), as
shares of the total: where the time goes besides encoding.
"""

import argparse
import cProfile
import gzip
import json
import multiprocessing
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "data" / "tokenizers" / "olmo-gpt-neox-dolma-v1_5.json"
CHILD = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from megapico.data.preprocess import PreprocessOptions, preprocess
start = time.perf_counter()
summary = preprocess(PreprocessOptions(**json.loads(sys.argv[1])))
seconds = time.perf_counter() - start
rss = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
main, workers = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
print("RESULT", json.dumps(dict(seconds=seconds, documents=summary["documents"], rss_mib=rss / 1024,
                                main_cpu=main.ru_utime + main.ru_stime,
                                cpu=main.ru_utime + main.ru_stime + workers.ru_utime + workers.ru_stime)))
"""


def write_inputs(source: Path, docs: int, files: int, root: Path) -> tuple[Path, Path, Path]:
    """(several files, one file, a one-document file), documents in the same order in the first two."""
    lines = []
    for path in sorted(source.glob("*.json.gz")):
        with gzip.open(path, "rb") as handle:
            lines += handle.readlines()
    corpus = [lines[i % len(lines)] for i in range(docs)]
    several, one, tiny = root / "several", root / "one", root / "tiny"
    for folder in (several, one, tiny):
        folder.mkdir()
    for index in range(files):
        with gzip.open(several / f"part-{index:03d}.json.gz", "wb") as handle:
            handle.writelines(corpus[index * docs // files:(index + 1) * docs // files])
    with gzip.open(one / "corpus.json.gz", "wb") as handle:
        handle.writelines(corpus)
    (tiny / "one.jsonl").write_bytes(corpus[0])
    return several, one, tiny


def _encode_share(corpus: Path, worker: int, workers: int, batch: int, barrier, ends) -> None:  # noqa: ANN001
    from megapico.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(TOKENIZER), None, "auto")
    texts = []
    with gzip.open(corpus, "rb") as handle:
        for line in handle:
            texts.append(json.loads(line)["text"])
    texts = texts[worker * len(texts) // workers:(worker + 1) * len(texts) // workers]
    barrier.wait()
    cpu = time.process_time()
    for start in range(0, len(texts), batch):
        tokenizer.encode_batch(texts[start:start + batch])
    ends.put((time.perf_counter(), time.process_time() - cpu))


def encode_only(corpus: Path, workers: int, batch: int) -> tuple[float, float]:
    """(wall, CPU) seconds for N processes to encode their shares, start-up (tokenizer load, decoding) excluded."""
    context = multiprocessing.get_context("spawn")
    barrier, ends = context.Barrier(workers + 1), context.Queue()
    processes = [context.Process(target=_encode_share, args=(corpus, i, workers, batch, barrier, ends))
                 for i in range(workers)]
    for process in processes:
        process.start()
    barrier.wait()
    start = time.perf_counter()
    finished = [ends.get() for _ in processes]
    for process in processes:
        process.join()
    return max(end for end, _ in finished) - start, sum(cpu for _, cpu in finished)


def build(input_path: Path, workers: int, out: Path) -> dict:
    options = dict(input=str(input_path), output_prefix=str(out), tokenizer_model=str(TOKENIZER), append_eod=True,
                   workers=workers)
    result = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO)), json.dumps(options)], cwd=REPO,
                            capture_output=True, text=True, check=True)
    return json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULT"))[7:])


def profile_build(input_path: Path, out: Path) -> None:
    """Shares of one in-process build's time: the encoder, JSON parsing, decompression, writing, the rest."""
    sys.path.insert(0, str(REPO))
    from megapico.data.preprocess import PreprocessOptions, preprocess

    profiler = cProfile.Profile()
    profiler.enable()
    preprocess(PreprocessOptions(input=str(input_path), output_prefix=str(out), tokenizer_model=str(TOKENIZER),
                                 append_eod=True))
    profiler.disable()
    stats = pstats.Stats(profiler).stats

    def cumulative(module_part: str, name: str) -> float:
        return sum(entry[3] for (file, _, function), entry in stats.items()
                   if module_part in file and function == name)

    startup = cumulative("tokenizer.py", "load_tokenizer")
    total = max(entry[3] for entry in stats.values()) - startup
    shares = {
        "encode (encode_batch)": cumulative("tokenizer.py", "encode_batch"),
        "JSON parse (_parse_lines)": cumulative("preprocess.py", "_parse_lines"),
        "read + gunzip (read_chunks)": cumulative("readers.py", "_json_chunks"),
        "write (.bin/.idx + sources)": cumulative("preprocess.py", "add"),
        "merge parts, finalize, records": cumulative("preprocess.py", "_before_writing_outputs")
        + cumulative("indexed_dataset.py", "merge_datasets") + cumulative("preprocess.py", "finalize"),
    }
    print(f"\nprofile of one --workers 1 build of {input_path.name}/: {total:.2f} s under cProfile after "
          f"{startup:.2f} s loading the tokenizer")
    for name, seconds in shares.items():
        print(f"  {name:34s} {seconds:6.2f} s  {100 * seconds / total:5.1f}%")
    rest = total - sum(shares.values())
    print(f"  {'the rest':34s} {rest:6.2f} s  {100 * rest / total:5.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(REPO.parent / "shared" / "data" / "dolma-sample" / "documents"))
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--files", type=int, default=8, help="files of the several-files layout")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4096, help="documents per encode_batch call (encode-only)")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        several, one, tiny = write_inputs(Path(args.source), args.docs, args.files, Path(tmp))
        size = sum(path.stat().st_size for path in several.iterdir())
        print(f"input: {args.docs:,} documents, {size / 2**20:.1f} MiB gzip as {args.files} files and as one; "
              f"cpus={os.cpu_count()}")
        runs: dict[tuple, list[dict]] = {}  # (case, workers) -> each round's seconds, cpu, ...
        for round_ in range(args.rounds):
            for workers in args.workers:
                wall, cpu = encode_only(one / "corpus.json.gz", workers, args.batch)
                runs.setdefault(("encode-only", workers), []).append(dict(seconds=wall, cpu=cpu))
                for layout, path in (("start-up", tiny), ("several", several), ("one", one)):
                    result = build(path, workers, Path(tmp) / f"out-{layout}-{workers}")
                    assert layout == "start-up" or result["documents"] == args.docs, result
                    runs.setdefault((layout, workers), []).append(result)
            print(f"round {round_ + 1}: " + ", ".join(f"{case} w{workers} {values[-1]['seconds']:.2f} s"
                                                      for (case, workers), values in runs.items()), flush=True)
        print("\n| workers | input | encode-only docs/s (best / median) | preprocess docs/s (best / median) | "
              "ratio (best / median) | CPU ratio (median) | peak RSS | main CPU s (median) |")
        print("|---|---|---|---|---|---|---|---|")
        for workers in args.workers:
            startup = {what: statistics.median(run[what] for run in runs[("start-up", workers)])
                       for what in ("seconds", "cpu", "main_cpu")}
            encode = [args.docs / run["seconds"] for run in runs[("encode-only", workers)]]
            encode_cpu = statistics.median(run["cpu"] for run in runs[("encode-only", workers)])
            for layout in ("several", "one"):
                cases = runs[(layout, workers)]
                rates = [args.docs / (run["seconds"] - startup["seconds"]) for run in cases]
                cpu = statistics.median(run["cpu"] for run in cases) - startup["cpu"]
                main_cpu = statistics.median(run["main_cpu"] for run in cases) - startup["main_cpu"]
                print(f"| {workers} | {layout} | {max(encode):,.0f} / {statistics.median(encode):,.0f} | "
                      f"{max(rates):,.0f} / {statistics.median(rates):,.0f} | "
                      f"{max(rates) / max(encode):.2f} / {statistics.median(rates) / statistics.median(encode):.2f} | "
                      f"{encode_cpu / cpu:.2f} | {max(run['rss_mib'] for run in cases):,.0f} MiB | {main_cpu:.2f} |")
        if args.profile:
            profile_build(several, Path(tmp) / "profiled")


if __name__ == "__main__":
    main()
