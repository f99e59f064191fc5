"""Merge every .bin/.idx pair in a directory into one prefix (Megatron-LM's tools/merge_datasets.py flags).

    python tools/merge_datasets.py --input DIR --output-prefix OUT --workers 4   # --workers: copy threads (default 1)
Pairs are taken in sorted name order; all must share one token dtype. When every pair has its preprocessing record
(PREFIX.megapico.json), all must come from one tokenizer, and OUT gets the merged record; when every pair has its
document sources (PREFIX.sources.json/.bin), OUT gets theirs merged.
"""

import argparse
import sys
from pathlib import Path

from megapico.data.indexed_dataset import DataError
from megapico.data.merge import merge_prefixes
from megapico.data.provenance import record_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="directory holding the .bin/.idx pairs to merge")
    parser.add_argument("--output-prefix", required=True, help="path and name stem of the merged OUT.bin/.idx")
    parser.add_argument("--workers", type=int, default=1,
                        help="threads copying the .bin files at once (pays on parallel filesystems and NVMe)")
    args = parser.parse_args(argv)
    prefixes = sorted(str(p.with_suffix("")) for p in Path(args.input).glob("*.idx"))
    try:
        if not prefixes:
            raise DataError(f"{args.input}: no .idx files to merge")
        merged = merge_prefixes(prefixes, args.output_prefix, args.workers)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"merged {len(prefixes)} prefixes: {len(merged):,} documents, {merged.num_tokens:,} tokens -> "
          f"{args.output_prefix}.bin / .idx{' / .megapico.json' if record_path(args.output_prefix).is_file() else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
