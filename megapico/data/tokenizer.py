"""Tokenizers for preprocessing: a HF `tokenizers` JSON file or HF tokenizer directory, or a sentencepiece
.model. Each encodes a batch of texts into one flat numpy array plus per-document lengths, and knows its
end-of-document id, vocabulary size, largest id, and a fingerprint of its vocabulary (provenance.py records it
beside the data it tokenized).

A HF tokenizer encodes with one of two backends giving the same ids: `huggingface` (the Rust batch API) or
`tiktoken` (bytelevel_bpe.py: about 4x faster per core, for GPT-2-style byte-level BPE files such as pico's).
`auto` takes tiktoken when the file qualifies and says why when it does not."""

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np

from megapico.data.bytelevel_bpe import ByteLevelBPE
from megapico.data.indexed_dataset import DataError

EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
BACKENDS = ("auto", "huggingface", "tiktoken")


class Tokenizer:
    """Common interface: encode_batch(texts) -> (flat ids, lengths); eod_id; vocab_size (entries); max_id (the
    largest id, which may exceed vocab_size - 1 when ids have gaps); path; fingerprint()."""

    path: str
    vocab_size: int
    max_id: int
    eod_id: int
    backend: str = "sentencepiece"
    backend_note: str = ""

    def encode_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def decode_batch(self, id_lists: list[list[int]]) -> list[str]:
        """Texts of token-id lists, special tokens left out (pico-train's decode for its train_data/)."""
        raise NotImplementedError

    def tokenizers_json(self) -> str | None:
        """The tokenizer as the `tokenizers` library serialises it (what a run keeps as its own copy and its exports
        ship: only what that library understands), or None for a tokenizer it cannot hold (sentencepiece)."""
        return None

    def fingerprint(self) -> str:
        """sha256 of the canonical vocabulary (and merges): equal for the same tokenizer however its file is
        formatted (an export re-serialises it), different when any token, id or merge differs."""
        raise NotImplementedError


def _sha256_of(canonical: object) -> str:
    return hashlib.sha256(json.dumps(canonical, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def _flatten(id_lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Flat int32 ids (every vocabulary's ids fit; half the bytes of int64 to hand between processes) + lengths."""
    lengths = np.fromiter((len(ids) for ids in id_lists), dtype=np.int64, count=len(id_lists))
    flat = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


class HuggingFaceTokenizer(Tokenizer):
    def __init__(self, path: str, backend: str = "huggingface") -> None:
        from tokenizers import Tokenizer as RustTokenizer

        file = Path(path)
        eos_hint = None
        if file.is_dir():
            config = file / "tokenizer_config.json"
            if config.is_file():
                eos = json.loads(config.read_text()).get("eos_token")
                eos_hint = eos.get("content") if isinstance(eos, dict) else eos
            file = file / "tokenizer.json"
        if not file.is_file():
            raise DataError(f"{path}: no HF tokenizer here (want a tokenizer.json file or a directory holding one)")
        try:
            self._tokenizer = RustTokenizer.from_file(str(file))
        except Exception as err:
            raise DataError(f"{file}: not a HF tokenizers JSON ({str(err).splitlines()[0]})") from None
        self.path = str(path)
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.max_id = max(self._tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
        for candidate in (eos_hint, *EOD_CANDIDATES):
            if candidate and self._tokenizer.token_to_id(candidate) is not None:
                self.eod_id = self._tokenizer.token_to_id(candidate)
                break
        else:
            raise DataError(f"{path}: no end-of-document token found (looked for {', '.join(EOD_CANDIDATES)})")
        self._byte_level_bpe = None
        self.backend = "huggingface"
        self.backend_note = "asked for" if backend == "huggingface" else ""
        if backend != "huggingface":
            try:
                self._byte_level_bpe = ByteLevelBPE(file)
                self.backend = "tiktoken"
            except (ValueError, ImportError) as err:
                if backend == "tiktoken":
                    message = f"--tokenizer-backend tiktoken cannot encode {err} (use auto or huggingface)"
                    raise DataError(message) from None
                self.backend_note = f"tiktoken not usable: {err}"

    def encode_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self._byte_level_bpe is not None:
            return _flatten([self._byte_level_bpe.encode(text) for text in texts])
        encodings = self._tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return _flatten([encoding.ids for encoding in encodings])

    def decode_batch(self, id_lists: list[list[int]]) -> list[str]:
        return self._tokenizer.decode_batch(id_lists, skip_special_tokens=True)

    def tokenizers_json(self) -> str:
        return self._tokenizer.to_str()

    def fingerprint(self) -> str:
        """Over the model type, every (token, id) added tokens included, and the BPE merges (written as "a b"
        or ["a", "b"] depending on the tokenizers version: both read as "a b")."""
        model = json.loads(self._tokenizer.to_str())["model"]
        vocab = sorted(self._tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda item: (item[1], item[0]))
        merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges") or []]
        return _sha256_of({"type": model.get("type"), "vocab": vocab, "merges": merges})


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: str) -> None:
        import sentencepiece

        if not Path(path).is_file():
            raise DataError(f"{path}: sentencepiece model not found")
        try:
            self._processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception as err:
            raise DataError(f"{path}: not a sentencepiece model ({str(err).splitlines()[0]})") from None
        self.path = str(path)
        self.vocab_size = self._processor.get_piece_size()
        self.max_id = self.vocab_size - 1
        self.eod_id = self._processor.eos_id()
        if self.eod_id < 0:
            raise DataError(f"{path}: the sentencepiece model has no eos piece to use as end-of-document")

    def encode_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return _flatten(self._processor.encode(texts))

    def decode_batch(self, id_lists: list[list[int]]) -> list[str]:
        return self._processor.decode(id_lists)

    def fingerprint(self) -> str:
        """Over every piece and its score, in id order."""
        pieces = [(self._processor.id_to_piece(i), self._processor.get_score(i)) for i in range(self.vocab_size)]
        return _sha256_of({"type": "sentencepiece", "pieces": pieces})


TOKENIZER_TYPES = {"HuggingFaceTokenizer": HuggingFaceTokenizer, "SentencePieceTokenizer": SentencePieceTokenizer}


def load_tokenizer(path: str, tokenizer_type: str | None = None, backend: str = "huggingface") -> Tokenizer:
    """Load by explicit Megatron type name, or guess from the path (.model = sentencepiece, else HF).
    `backend` picks a HF tokenizer's encoder (BACKENDS); sentencepiece has one."""
    if tokenizer_type is None:
        tokenizer_type = "SentencePieceTokenizer" if str(path).endswith(".model") else "HuggingFaceTokenizer"
    if tokenizer_type not in TOKENIZER_TYPES:
        raise DataError(f"tokenizer type '{tokenizer_type}' is not one of {sorted(TOKENIZER_TYPES)}")
    if tokenizer_type == "SentencePieceTokenizer":
        if backend == "tiktoken":
            raise DataError(f"{path}: --tokenizer-backend tiktoken is for HF byte-level BPE files, not sentencepiece")
        return SentencePieceTokenizer(path)
    if backend not in BACKENDS:
        raise DataError(f"tokenizer backend '{backend}' is not one of {list(BACKENDS)}")
    return HuggingFaceTokenizer(path, backend)
