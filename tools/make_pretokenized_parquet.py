"""Cut a .bin/.idx prefix into pico-lm/pretokenized-dolma's layout: rows of exactly --row-tokens token ids.

pico's pretokenized-dolma is Dolma tokenized with pico's tokenizer, an end-of-document token after each document
(preprocess with --append-eod), the token stream cut into rows of 2049, stored as data/train-NNNNN-of-NNNNN.parquet
with columns input_ids (list of int32) and idx. This writes the same layout from any prefix (a small local copy
for tests, benchmarks and pico-train itself, which reads it as `data.dataset.name`). From the shipped sample as
examples/cpu_demo.sh preprocesses it (runs/cpu-demo-data/sample_text_document):
    python tools/make_pretokenized_parquet.py --prefix runs/cpu-demo-data/sample_text_document \\
        --output runs/pretokenized --row-tokens 2049 --rows-per-file 20480
The tail shorter than one row is dropped, as pico's is.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from megapico.data.indexed_dataset import DataError, IndexedDataset


def write_pretokenized_parquet(prefix: str, output: Path, row_tokens: int, rows_per_file: int,
                               max_rows: int = 0, split: str = "train", skip_rows: int = 0) -> int:
    """Write `{output}/data/{split}-NNNNN-of-NNNNN.parquet` from row skip_rows on; returns the rows written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    stream = IndexedDataset(prefix).token_stream()[skip_rows * row_tokens:]  # the documents in order
    rows = len(stream) // row_tokens if not max_rows else min(max_rows, len(stream) // row_tokens)
    if rows == 0:
        raise DataError(f"{prefix}: {len(stream)} tokens, fewer than one row of {row_tokens}")
    files = -(-rows // rows_per_file)
    (output / "data").mkdir(parents=True, exist_ok=True)
    for index in range(files):
        first, last = index * rows_per_file, min(rows, (index + 1) * rows_per_file)
        ids = stream[first * row_tokens:last * row_tokens].astype(np.int32)
        offsets = np.arange(0, len(ids) + 1, row_tokens, dtype=np.int32)
        table = pa.table({"input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids)),
                          "idx": pa.array(np.arange(first, last, dtype=np.int64))})
        pq.write_table(table, output / "data" / f"{split}-{index:05d}-of-{files:05d}.parquet")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefix", required=True, help=".bin/.idx prefix (preprocessed with --append-eod)")
    parser.add_argument("--output", required=True, type=Path, help="directory to hold data/*.parquet")
    parser.add_argument("--row-tokens", type=int, default=2049, help="tokens per row (pico: seq_len + 1 = 2049)")
    parser.add_argument("--rows-per-file", type=int, default=20480, help="rows per parquet file (pico: 20,480)")
    parser.add_argument("--max-rows", type=int, default=0, help="stop after this many rows (0 = all)")
    parser.add_argument("--split", default="train", help="file name stem: train (pretokenized-dolma) or val")
    parser.add_argument("--skip-rows", type=int, default=0, help="start after this many rows (a held-out part)")
    args = parser.parse_args(argv)
    try:
        rows = write_pretokenized_parquet(args.prefix, args.output, args.row_tokens, args.rows_per_file,
                                          args.max_rows, args.split, args.skip_rows)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {rows:,} rows of {args.row_tokens} tokens under {args.output / 'data'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
