"""Preprocess throughput and peak RSS on the Dolma sample repeated to >= 100k documents.

Peer, measured in the same run on the same file: Megatron-LM's tools/preprocess_data.py algorithm, re-written
here (the main process reads lines; a Pool of --workers runs json.loads and Megatron's HuggingFaceTokenizer,
i.e. a transformers tokenizer called on one document at a time, imap chunksize 32; Python lists of ids come
back and the main process writes each document with np.array + write, as IndexedDatasetBuilder.add_document
does). megapico runs with each --tokenizer-backend (same output ids); peak RSS counts its workers too.
    python benchmarks/bench_preprocess.py --docs 100000 --workers 1 2
"""

import argparse
import gzip
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "data" / "tokenizers" / "olmo-gpt-neox-dolma-v1_5.json"

_encoder = None


def _megatron_style_init():
    global _encoder
    from transformers import PreTrainedTokenizerFast

    _encoder = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER))


def _megatron_style_encode(line):
    text = json.loads(line)["text"]
    ids = _encoder(text).input_ids
    ids.append(50279)
    return {"text": ids}, {"text": [len(ids)]}, len(line)


def megatron_style(path, workers, out_path):
    start = time.perf_counter()
    docs = 0
    with gzip.open(path, "rt") as handle, multiprocessing.Pool(workers, _megatron_style_init) as pool, \
            open(out_path, "wb") as out:
        for doc, _, _ in pool.imap(_megatron_style_encode, handle, 32):
            out.write(np.array(doc["text"], dtype=np.uint16).tobytes(order="C"))
            docs += 1
    return docs, time.perf_counter() - start


def megapico(path, workers, backend, out_prefix):
    """Run the real tool in a child process so its peak RSS (and its workers') is measured alone."""
    code = (
        "import resource, sys, time; sys.argv=['x']+sys.argv[1:]\n"
        "sys.path.insert(0, 'tools'); from preprocess_data import main\n"
        "start=time.perf_counter(); main(sys.argv[1:]); seconds=time.perf_counter()-start\n"
        "rss=max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN)"
        ".ru_maxrss)\n"
        "print('RESULT', seconds, rss)\n")
    argv = ["--input", str(path), "--output-prefix", out_prefix, "--tokenizer-model", str(TOKENIZER),
            "--append-eod", "--workers", str(workers), "--tokenizer-backend", backend]
    out = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True, check=True)
    line = next(line for line in out.stdout.splitlines() if line.startswith("RESULT"))
    summary = next(line for line in out.stdout.splitlines() if line.startswith("done:"))
    seconds, rss_kb = float(line.split()[1]), int(line.split()[2])
    docs = int(summary.split()[1].replace(",", ""))
    tokens = int(summary.split()[3].replace(",", ""))
    return docs, tokens, seconds, rss_kb / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(REPO / "data" / "sample" / "documents"))
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--backends", nargs="+", default=["tiktoken", "huggingface"])
    args = parser.parse_args()
    lines = []
    for path in sorted(Path(args.source).glob("*.json*")):
        with gzip.open(path, "rt") as handle:
            lines += handle.readlines()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl.gz"
        with gzip.open(corpus, "wt", compresslevel=1) as handle:
            for i in range(args.docs):
                handle.write(lines[i % len(lines)])
        print(f"input: {args.docs:,} documents ({corpus.stat().st_size / 2**20:.1f} MiB gzip), cpus={os.cpu_count()}")
        for workers in args.workers:
            peer_docs, peer_seconds = megatron_style(corpus, workers, f"{tmp}/peer.bin")
            print(f"workers={workers}: megatron-style {peer_docs / peer_seconds:,.0f} docs/s")
            for backend in args.backends:
                docs, tokens, seconds, rss = megapico(corpus, workers, backend, f"{tmp}/out{workers}{backend}")
                assert peer_docs == docs
                print(f"workers={workers}: megapico --tokenizer-backend {backend}: {docs / seconds:,.0f} docs/s, "
                      f"{tokens / seconds:,.0f} tokens/s, peak RSS {rss:,.0f} MiB | "
                      f"ratio to megatron-style {(docs / seconds) / (peer_docs / peer_seconds):.2f}x")


if __name__ == "__main__":
    main()
