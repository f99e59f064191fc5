"""What a .bin/.idx prefix was built from, recorded beside it, and the check that a run's tokenizer fits the data.

tools/preprocess_data.py writes `PREFIX.megapico.json` next to `PREFIX.bin` / `PREFIX.idx`:
    {"format": 1, "max_token_id": 50279, "documents": 3187, "tokens": 240747,
     "tokenizer": {"path": "data/tokenizers/olmo-gpt-neox-dolma-v1_5.json", "sha256": "80711817...",
                   "vocab_size": 50280, "max_id": 50279, "eod_id": 50279}}
`tokenizer` is null for already tokenized input (--json-keys input_ids without --tokenizer-model); max_token_id,
the largest id in the .bin, is recorded either way. The tokenizer's sha256 is Tokenizer.fingerprint(): its
vocabulary and merges, so a re-serialised copy of the same tokenizer (an export) matches and any other does not.
Data built elsewhere (Megatron, older megapico) has no record, and the checks that need one are skipped.
"""

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from megapico.data.indexed_dataset import DataError, IndexedDataset
from megapico.data.tokenizer import Tokenizer, load_tokenizer

RECORD_SUFFIX = ".megapico.json"
RECORD_FORMAT = 1


def record_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}{RECORD_SUFFIX}")


def tokenizer_record(tokenizer: Tokenizer) -> dict:
    return {"path": str(tokenizer.path), "sha256": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size,
            "max_id": tokenizer.max_id, "eod_id": tokenizer.eod_id}


def data_record(prefix: str | Path, tokenizer: dict | None, max_token_id: int) -> dict:
    """The record of a finished prefix: its counts from the .idx, the tokenizer's record, the largest id."""
    dataset = IndexedDataset(prefix)
    return {"format": RECORD_FORMAT, "max_token_id": int(max_token_id), "documents": len(dataset),
            "tokens": dataset.num_tokens, "tokenizer": tokenizer}


def max_token_id(prefix: str | Path) -> int:
    """The largest id in a prefix's .bin (a full read; -1 when empty)."""
    stream = IndexedDataset(prefix).token_stream()
    return int(np.max(stream)) if len(stream) else -1


def write_record(prefix: str | Path, record: dict) -> None:
    """Atomically (a new temporary of random name, renamed), so a reader sees the old record or the new one, and a
    link planted at either name is replaced, never written through."""
    path = record_path(prefix)
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    mask = os.umask(0)
    os.umask(mask)
    os.fchmod(descriptor, 0o666 & ~mask)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(json.dumps(record, indent=2) + "\n")
        os.replace(name, path)
    finally:
        Path(name).unlink(missing_ok=True)


def remove_record(prefix: str | Path) -> None:
    """Before a prefix is rewritten: an old record must never describe new data."""
    record_path(prefix).unlink(missing_ok=True)


def read_record(prefix: str | Path) -> dict | None:
    """The prefix's record, or None when it has none (data built by Megatron or an older megapico). The record may
    have come with someone else's data: its fields must have their types and its counts must be the .idx's, so a
    stale or edited record is refused. Its max_token_id still cannot be verified without reading the whole .bin;
    the datasets check every sample's ids as they read them (GPTDataset with vocab_size)."""
    path = record_path(prefix)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: unreadable data record ({type(err).__name__}); re-preprocess the data, or delete "
                        f"the file to skip the tokenizer checks") from None
    counts = ("max_token_id", "documents", "tokens")
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT or \
            any(type(record.get(name)) is not int for name in counts) or \
            not isinstance(record.get("tokenizer"), dict | None):
        raise DataError(f"{path}: not a megapico data record of format {RECORD_FORMAT}; re-preprocess the data, or "
                        f"delete the file to skip the tokenizer checks")
    dataset = IndexedDataset(prefix)
    if (record["documents"], record["tokens"]) != (len(dataset), dataset.num_tokens):
        raise DataError(f"{path}: records {record['documents']:,} documents / {record['tokens']:,} tokens, but "
                        f"{dataset.idx_path} holds {len(dataset):,} / {dataset.num_tokens:,}: the record is not this "
                        f"data's; re-preprocess the data, or delete the file to skip the tokenizer checks")
    return record


def merged_record(prefixes: list[str | Path]) -> dict | None:
    """The record of the concatenation of `prefixes` (tools/merge_datasets.py): None when any has none; refused
    when two were built with different tokenizers."""
    records = [read_record(prefix) for prefix in prefixes]
    if not records or any(record is None for record in records):
        return None
    first_tokenizer = records[0]["tokenizer"]
    for prefix, record in zip(prefixes, records, strict=True):
        if (record["tokenizer"] or {}).get("sha256") != (first_tokenizer or {}).get("sha256"):
            raise DataError(f"{prefix} and {prefixes[0]} were built with different tokenizers "
                            f"({_tokenizer_name(record)} vs {_tokenizer_name(records[0])}); merge data of one "
                            f"tokenizer only")
    return {"format": RECORD_FORMAT, "max_token_id": max(record["max_token_id"] for record in records),
            "documents": sum(record.get("documents", 0) for record in records),
            "tokens": sum(record.get("tokens", 0) for record in records), "tokenizer": first_tokenizer}


def _tokenizer_name(record: dict) -> str:
    return record["tokenizer"]["path"] if record["tokenizer"] else "already tokenized, no tokenizer"


def check_tokenizer_for_data(prefixes: list[str], tokenizer_path: str | None, vocab_size: int) -> None:
    """Before any compute: the tokenizer's ids and the data's ids fit a model of `vocab_size`, and the tokenizer is
    the one each prefix was built with. One-line DataError otherwise. A prefix without a record skips the checks
    that need one; no tokenizer (None or "") skips the tokenizer's."""
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
    if tokenizer is not None and tokenizer.max_id >= vocab_size:
        raise DataError(f"{tokenizer_path}: its ids reach {tokenizer.max_id}, the model's vocab_size is {vocab_size} "
                        f"(use the tokenizer the data was built with, or a model.vocab_size above {tokenizer.max_id})")
    fingerprint = None
    for prefix in dict.fromkeys(str(prefix) for prefix in prefixes):
        record = read_record(prefix)
        if record is None:
            continue
        largest = record["max_token_id"]
        if largest >= vocab_size:
            raise DataError(f"{prefix}: its token ids reach {largest} ({record_path(prefix)}), the model's "
                            f"vocab_size is {vocab_size}; re-preprocess it with the model's tokenizer, or raise "
                            f"model.vocab_size above {largest}")
        built_with = record["tokenizer"]
        if tokenizer is None or not built_with:
            continue
        fingerprint = fingerprint or tokenizer.fingerprint()
        if built_with.get("sha256") != fingerprint:
            raise DataError(f"{tokenizer_path} is not the tokenizer {prefix} was built with ({built_with.get('path')}, "
                            f"per {record_path(prefix)}): pass that tokenizer (data.tokenizer), or re-preprocess the "
                            f"data with {tokenizer_path}")
