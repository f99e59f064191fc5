"""Merge every .bin/.idx pair in a directory into one prefix (Megatron-LM's tools/merge_datasets.py flags).

    python tools/merge_datasets.py --input DIR --output-prefix OUT
Pairs are taken in sorted name order; all must share one token dtype. When every pair has its preprocessing record
(PREFIX.megapico.json), all must come from one tokenizer, and OUT gets the merged record.
"""

import argparse
import sys
from pathlib import Path

from megapico.data.indexed_dataset import DataError, merge_datasets
from megapico.data.provenance import merged_record, remove_record, write_record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="directory holding the .bin/.idx pairs to merge")
    parser.add_argument("--output-prefix", required=True, help="path and name stem of the merged OUT.bin/.idx")
    args = parser.parse_args(argv)
    prefixes = sorted(str(p.with_suffix("")) for p in Path(args.input).glob("*.idx"))
    try:
        if not prefixes:
            raise DataError(f"{args.input}: no .idx files to merge")
        record = merged_record(prefixes)
        remove_record(args.output_prefix)
        merged = merge_datasets(prefixes, args.output_prefix)
        if record is not None:
            write_record(args.output_prefix, record)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"merged {len(prefixes)} prefixes: {len(merged):,} documents, {merged.num_tokens:,} tokens -> "
          f"{args.output_prefix}.bin / .idx{' / .megapico.json' if record is not None else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
