"""Merge every .bin/.idx pair in a directory into one prefix (Megatron-LM's tools/merge_datasets.py flags).

    python tools/merge_datasets.py --input DIR --output-prefix OUT
Pairs are taken in sorted name order; all must share one token dtype.
"""

import argparse
import sys
from pathlib import Path

from megapico.data.indexed_dataset import DataError, merge_datasets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="directory holding the .bin/.idx pairs to merge")
    parser.add_argument("--output-prefix", required=True)
    args = parser.parse_args(argv)
    prefixes = sorted(str(p.with_suffix("")) for p in Path(args.input).glob("*.idx"))
    try:
        if not prefixes:
            raise DataError(f"{args.input}: no .idx files to merge")
        merged = merge_datasets(prefixes, args.output_prefix)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"merged {len(prefixes)} prefixes: {len(merged):,} documents, {merged.num_tokens:,} tokens -> "
          f"{args.output_prefix}.bin / .idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
