"""Which source documents a document, a training sample or a step's global batch came from.

    python tools/trace_data.py --data-prefix PREFIX --document 17        # one document's source:row
    python tools/trace_data.py --run-dir runs/RUN --sample 1234          # a sample (0-based, in the run's order)
    python tools/trace_data.py --run-dir runs/RUN --step 20              # every sample of step 20's global batch
    python tools/trace_data.py --run-dir runs/RUN --train-data 20        # learning dynamics' train_data of step 20
Each sample is listed as the documents it is made of, with the token ranges (slices, end excluded) taken from the
sample and from each document, and each document's `source:row` (the 1-based line of a JSON-lines file, or the row
of a parquet file / HF dataset), read from PREFIX.sources.json / .sources.bin (megapico/data/document_sources.py).
--show-text prints each source record's text; --json prints one JSON object instead. Run it from the directory the
run was launched in (its config.yaml names the data by the paths it was given).
"""

import argparse
import json
import sys

from megapico.config import ConfigError
from megapico.data.document_sources import read_document_sources
from megapico.data.indexed_dataset import DataError, IndexedDataset
from megapico.data.sample_trace import Piece, SampleTracer, source_texts
from megapico.training.sample_order import open_run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-prefix", help="a .bin/.idx prefix (with --document)")
    parser.add_argument("--run-dir", help="a run directory, runs/RUN (with --sample, --step or --train-data)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--document", type=int, nargs="+", help="document indices of --data-prefix")
    what.add_argument("--sample", type=int, nargs="+", help="global sample indices in the run's training order")
    what.add_argument("--step", type=int, help="an optimizer step (1-based): every sample of its global batch")
    what.add_argument("--train-data", type=int, metavar="STEP",
                      help="a checkpoint step: the batch its learning dynamics saved as train_data (step STEP + 1's)")
    parser.add_argument("--show-text", action="store_true", help="print each source record's text")
    parser.add_argument("--json-key", default="text", help="the field (column) holding a record's text (--show-text)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout instead of text")
    args = parser.parse_args(argv)
    wants_run = args.document is None
    if wants_run != bool(args.run_dir) or wants_run == bool(args.data_prefix):
        parser.error("--document takes --data-prefix; --sample, --step and --train-data take --run-dir")
    return args


def _with_text(entries: list[dict], show_text: bool, key: str) -> None:
    if show_text:
        texts = source_texts(((entry["source"], entry["row"]) for entry in entries), key)
        for entry in entries:
            entry["text"] = texts[(entry["source"], entry["row"])]


def trace_documents(prefix: str, documents: list[int], show_text: bool, key: str) -> dict:
    sources, indexed = read_document_sources(prefix), IndexedDataset(prefix)
    entries = []
    for document in documents:
        if not 0 <= document < len(sources):
            raise DataError(f"{prefix}: document {document} is outside its {len(sources):,} documents")
        source, row = sources.source_of(document)
        entries.append(dict(prefix=prefix, document=document, tokens=int(indexed.sequence_lengths[document]),
                            source=source, row=row))
    _with_text(entries, show_text, key)
    return {"documents": entries}


def _piece_entry(piece: Piece, start: int) -> dict:
    return dict(prefix=piece.prefix, document=piece.document, sample_tokens=[start, start + piece.length],
                document_tokens=[piece.offset, piece.offset + piece.length], source=piece.source, row=piece.row)


def trace_run(args: argparse.Namespace) -> dict:
    order = open_run(args.run_dir)
    if args.sample is not None:
        samples = args.sample
    elif args.step is not None:
        samples = list(order.step_samples(args.step))
    else:
        samples = list(order.train_data_samples(args.train_data))
    tracer, traced = SampleTracer(order.dataset), []
    for sample in samples:
        step, entries, start = order.step_of_sample(sample), [], 0
        for piece in tracer.pieces(sample):
            entries.append(_piece_entry(piece, start))
            start += piece.length
        traced.append(dict(sample=sample, step=step, tokens=start, documents=entries))
    _with_text([entry for sample in traced for entry in sample["documents"]], args.show_text, args.json_key)
    return dict(run_dir=args.run_dir, global_batch=order.global_batch, samples=traced)


def _print_entry(entry: dict, head: str) -> None:
    print(f"{head}{entry['source']}:{entry['row']}")
    if "text" in entry:
        text = entry["text"] if entry["text"] is not None else "(token ids: no text in the source)"
        print("\n".join(f"      {line}" for line in text.splitlines() or [""]))


def print_trace(result: dict) -> None:
    for entry in result.get("documents", []):
        _print_entry(entry, f"document {entry['document']} of {entry['prefix']} ({entry['tokens']} tokens) <- ")
    for sample in result.get("samples", []):
        print(f"sample {sample['sample']} (step {sample['step']} of {result['run_dir']}, global batch "
              f"{result['global_batch']}): {sample['tokens']} tokens from {len(sample['documents'])} document(s)")
        for entry in sample["documents"]:
            (a, b), (c, d) = entry["sample_tokens"], entry["document_tokens"]
            _print_entry(entry, f"  tokens {a}:{b} = {entry['prefix']} document {entry['document']} tokens {c}:{d} "
                                f"<- ")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = trace_documents(args.data_prefix, args.document, args.show_text, args.json_key) \
            if args.document is not None else trace_run(args)
    except (DataError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_trace(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
