"""Which documents a training sample is made of, where each came from, and the source records' text.

A Megatron sample (GPTDataset) is seq_len + 1 tokens of the shuffled document stream, so it spans one or more
documents, the first and last possibly cut; a blend's sample is a sample of one of its datasets; a pretokenized
sample is one whole document. `SampleTracer.pieces` names those documents with the token range taken from each
and, from each prefix's document sources (document_sources.py), the source file and line (or row). The pieces are
checked against the dataset's own sample (their tokens must be the sample's tokens), so a trace can never disagree
with what training read.
"""

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megapico.data.blended_dataset import BlendedDataset
from megapico.data.document_sources import DocumentSources, read_document_sources
from megapico.data.gpt_dataset import GPTDataset
from megapico.data.indexed_dataset import DataError, IndexedDataset
from megapico.data.pretokenized_dataset import PretokenizedDataset
from megapico.data.readers import read_chunks


@dataclass(frozen=True)
class Piece:
    """Tokens [offset, offset + length) of `document` of `prefix`, from `source` at 1-based line (or row) `row`."""

    prefix: str
    document: int
    offset: int
    length: int
    source: str
    row: int


class SampleTracer:
    """The pieces of samples of one training dataset (GPTDataset, BlendedDataset or PretokenizedDataset), each
    prefix's document sources read (and checked) once, on first use."""

    def __init__(self, dataset: GPTDataset | BlendedDataset | PretokenizedDataset) -> None:
        self.dataset = dataset
        self._sources: dict[str, DocumentSources] = {}

    def sources(self, prefix: str | Path) -> DocumentSources:
        key = str(prefix)
        if key not in self._sources:
            self._sources[key] = read_document_sources(prefix)
        return self._sources[key]

    def pieces(self, index: int) -> list[Piece]:
        """The documents sample `index` (in the dataset's order) is made of, in sample order."""
        spans = _spans(self.dataset, index)
        tokens = np.concatenate([indexed.get(document, offset, length) for indexed, document, offset, length in spans],
                                dtype=np.int64)
        if not np.array_equal(tokens, self.dataset[index]):
            raise RuntimeError(f"sample {index}: the traced documents' tokens differ from the dataset's sample (the "
                               f"sample scheme changed without sample_trace.py)")
        pieces = []
        for indexed, document, offset, length in spans:
            source, row = self.sources(indexed.prefix).source_of(document)
            pieces.append(Piece(str(indexed.prefix), document, offset, length, source, row))
        return pieces


def _spans(dataset: GPTDataset | BlendedDataset | PretokenizedDataset,
           index: int) -> list[tuple[IndexedDataset, int, int, int]]:
    """(indexed dataset, document, first token, tokens) of each document sample `index` reads, as the datasets'
    __getitem__ read them."""
    if isinstance(dataset, BlendedDataset):
        part = dataset.datasets[int(dataset.dataset_index[index])]
        return _spans(part, int(dataset.dataset_sample_index[index]) % len(part))
    if isinstance(dataset, PretokenizedDataset):
        return [(dataset.indexed, int(index), 0, int(dataset.indexed.sequence_lengths[index]))]
    return [(dataset.indexed, *span) for span in dataset.spans(index)]


def source_texts(wanted: Iterable[tuple[str, int]], key: str = "text") -> dict[tuple[str, int], str | None]:
    """The text of each (source, 1-based row) record: field `key` of a JSON line (the whole line when it is not a
    JSON object holding a string there) or the `key` column of a parquet / HF dataset row; None for a row of token
    ids. One streaming pass per source, read with the preprocessing readers, stopping after the last row wanted."""
    by_source: dict[str, set[int]] = defaultdict(set)
    for source, row in wanted:
        by_source[source].add(row)
    texts: dict[tuple[str, int], str | None] = {}
    for source, rows in by_source.items():
        try:
            for chunk in read_chunks(source, [key]):
                texts.update(((source, row), text) for row, text in _chunk_records(chunk, key) if row in rows)
                if all((source, row) in texts for row in rows):
                    break
        except DataError as err:
            raise DataError(f"{err} (run from the directory the data was preprocessed in, or leave out --show-text)"
                            ) from None
        missing = sorted(row for row in rows if (source, row) not in texts)
        if missing:
            raise DataError(f"{source}: has no line or row {missing[0]} (changed since it was preprocessed?); "
                            f"re-preprocess it, or leave out --show-text")
    return texts


def _chunk_records(chunk, key: str) -> Iterable[tuple[int, str | None]]:  # noqa: ANN001
    """(1-based row, text) of every record of a readers.Chunk."""
    if chunk.lines is not None:
        for offset, line in enumerate(chunk.lines.split(b"\n")[:-1]):
            yield chunk.first_row + offset, _json_text(line, key)
    elif chunk.texts is not None:
        for offset, text in enumerate(chunk.texts[key]):
            yield chunk.first_row + offset, text
    else:
        for offset in range(len(next(iter(chunk.token_ids.values()))[1])):
            yield chunk.first_row + offset, None


def _json_text(line: bytes, key: str) -> str:
    text = line.decode("utf-8", errors="replace")
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return text
    return record[key] if isinstance(record, dict) and isinstance(record.get(key), str) else text
