"""Merge prefixes into one: the .bin/.idx, the data record (.megapico.json) and the per-document sources, each the
bytes that one write of the same documents gives, so merged parts (preprocess.py's per-file parts, the tasks of a
build on many machines, tools/merge_datasets.py) equal a single build byte for byte.

Old files under the output's names (its record, its document sources) are removed before anything is written: a
record or a sources file must never describe data it was not written with. The record comes last, so an output
with a record is complete.
"""

import os
from pathlib import Path

from megapico.data.document_sources import document_sources_paths, has_document_sources, merge_document_sources
from megapico.data.indexed_dataset import IndexedDataset, data_file_paths, merge_datasets
from megapico.data.provenance import merged_record, remove_record, write_record


def merge_prefixes(prefixes: list[str | Path], output_prefix: str | Path, workers: int = 1,
                   copied_bin: Path | None = None) -> IndexedDataset:
    """Concatenate `prefixes` in the order given into `output_prefix`, copying the .bin files with `workers`
    threads, or taking `copied_bin` as the .bin where merge tasks already copied them (merge_datasets). The merged
    record is written when every prefix has one (two tokenizers are refused before anything is written), the document
    sources when every prefix has them."""
    record = merged_record(prefixes)
    with_sources = all(has_document_sources(prefix) for prefix in prefixes)
    remove_record(output_prefix)
    for path in document_sources_paths(output_prefix):
        path.unlink(missing_ok=True)
    merged = merge_datasets(prefixes, output_prefix, workers, copied_bin)
    if with_sources:
        merge_document_sources(prefixes, output_prefix)
    if record is not None:
        write_record(output_prefix, record)
    return merged


def move_prefix(prefix: str | Path, output_prefix: str | Path) -> IndexedDataset:
    """merge_prefixes of one prefix no one needs afterwards (preprocess's lone part, a task of a build on many
    machines): its .bin/.idx and document sources renamed into place, not copied (they lie beside the output, on its
    filesystem). As in a write, the output's old record and sources go first and its old .idx before the new .bin
    arrives, so an old file is never paired with a new one. A prefix's record is its builder's to write."""
    remove_record(output_prefix)
    for path in document_sources_paths(output_prefix):
        path.unlink(missing_ok=True)
    (bin_from, idx_from), (bin_to, idx_to) = data_file_paths(prefix), data_file_paths(output_prefix)
    idx_to.unlink(missing_ok=True)
    os.replace(bin_from, bin_to)
    os.replace(idx_from, idx_to)
    if has_document_sources(prefix):
        (header, entries), (final_header, final_entries) = map(document_sources_paths, (prefix, output_prefix))
        os.replace(entries, final_entries)  # the header last: it is what has_document_sources looks for first
        os.replace(header, final_header)
    return IndexedDataset(output_prefix)

