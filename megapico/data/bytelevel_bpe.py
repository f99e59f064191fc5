"""An exact, faster encoder for GPT-2-style byte-level BPE tokenizer.json files (pico's OLMo/GPT-NeoX one).

The HF `tokenizers` pipeline spends most of its time outside the BPE merges (oniguruma pre-tokenization and
the offset bookkeeping of NormalizedString). tiktoken runs the same two steps, the GPT-2 split regex and BPE
over bytes, about 4x faster per core. This module feeds it the tokenizer.json's vocabulary and reproduces the
rest of what `Tokenizer.encode(text, add_special_tokens=False)` does around it:

1. split the raw text on the added tokens that are not normalized (`<|endoftext|>`, `<|padding|>`),
   leftmost-longest, as HF's AddedVocabulary does;
2. NFC-normalize each piece (when the tokenizer has the NFC normalizer);
3. split the normalized piece on the normalized added tokens (pico's runs of 2..24 spaces, `|||IP_ADDRESS|||`);
4. BPE the remaining text with the GPT-2 pattern.

Equivalence rests on two facts checked when the encoder is built, so a tokenizer that breaks them falls back
to HF (`unsupported_reason`): tiktoken merges by the rank of the merged token, HF by the merge list's order, so
the merged tokens' ids must rise with the merge order; and every vocabulary token, plus a fixed battery of
token concatenations, must BPE to the same ids both ways. Tests compare whole documents against HF.
"""

import json
import random
import re
import unicodedata
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SELF_CHECK_CONCATENATIONS = 20_000
NEVER_IN_UTF8 = frozenset([0xC0, 0xC1, *range(0xF5, 0x100)])  # byte values no UTF-8 text holds


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    stand_ins = {byte: byte for byte in printable} | {byte: 256 + i for i, byte in enumerate(others)}
    return {chr(char): byte for byte, char in stand_ins.items()}


def unsupported_reason(spec: dict) -> str | None:
    """Why this tokenizer.json cannot be encoded exactly by ByteLevelBPE, or None when it can."""
    model = spec.get("model") or {}
    pre_tokenizer = spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        return f"model type {model.get('type')} is not BPE"
    for option in ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(option):
            return f"BPE option {option}={model[option]!r}"
    if model.get("byte_fallback"):
        return "BPE byte_fallback"
    if spec.get("normalizer") not in (None, {"type": "NFC"}):
        return f"normalizer {spec['normalizer'].get('type')}"
    if (pre_tokenizer.get("type"), pre_tokenizer.get("add_prefix_space"), pre_tokenizer.get("use_regex")) != (
            "ByteLevel", False, True):
        return "pre-tokenizer is not ByteLevel(add_prefix_space=False, use_regex=True)"
    if (spec.get("post_processor") or {}).get("type") not in (None, "ByteLevel"):
        return f"post-processor {spec['post_processor']['type']}"
    if any(token.get(flag) for token in spec.get("added_tokens", []) for flag in ("lstrip", "rstrip", "single_word")):
        return "an added token with lstrip/rstrip/single_word"
    alphabet = byte_level_alphabet()
    added = {token["content"] for token in spec.get("added_tokens", [])}
    vocab = model.get("vocab", {})
    if any(char not in vocab for char, byte in alphabet.items() if byte not in NEVER_IN_UTF8):
        return "the vocabulary lacks a byte token that UTF-8 text can hold"
    if any(token not in added and any(char not in alphabet for char in token) for token in vocab):
        return "a vocabulary token outside the byte-level alphabet"
    merged_ids = [vocab.get("".join(_merge_pair(merge))) for merge in model.get("merges", [])]
    if None in merged_ids or any(a >= b for a, b in zip(merged_ids, merged_ids[1:], strict=False)):
        return "merged tokens' ids do not rise with the merge order"
    return None


def _merge_pair(merge: str | list[str]) -> list[str]:
    return merge.split(" ") if isinstance(merge, str) else merge


class _AddedTokenSplitter:
    """Leftmost-longest split on a fixed set of strings (HF matches added tokens with aho-corasick in that
    mode; a regex alternation ordered longest first finds the same matches)."""

    def __init__(self, token_ids: dict[str, int]) -> None:
        self.token_ids = token_ids
        ordered = sorted(token_ids, key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        # A text can only hold a token if it holds one of the tokens that contain no other (a cheap C scan).
        self.witnesses = [t for t in token_ids if not any(other != t and other in t for other in token_ids)]

    def holds_any(self, text: str) -> bool:
        for witness in self.witnesses:  # a plain loop: this runs for every document, any() + a generator cost 20% more
            if witness in text:
                return True
        return False

    def split(self, text: str) -> Iterator[tuple[str, int | None]]:
        """(text before, the added token's id) pairs; the last pair's id is None."""
        if self.pattern is None or not self.holds_any(text):
            yield text, None
            return
        start = 0
        for match in self.pattern.finditer(text):
            yield text[start:match.start()], self.token_ids[match.group()]
            start = match.end()
        yield text[start:], None


def _nfc(text: str) -> str:
    return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)


class ByteLevelBPE:
    """encode(text) == tokenizers.Tokenizer.encode(text, add_special_tokens=False).ids for supported files."""

    def __init__(self, tokenizer_json: str | Path) -> None:
        import tiktoken

        spec = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
        reason = unsupported_reason(spec)
        if reason:
            raise ValueError(f"{tokenizer_json}: {reason}")
        alphabet = byte_level_alphabet()
        added = spec.get("added_tokens", [])
        added_contents = {token["content"] for token in added}
        self._ranks = {bytes(alphabet[char] for char in token): token_id
                       for token, token_id in spec["model"]["vocab"].items() if token not in added_contents}
        self._tiktoken = tiktoken.Encoding(str(tokenizer_json), pat_str=GPT2_SPLIT_PATTERN,
                                           mergeable_ranks=self._ranks, special_tokens={})
        self._normalize = _nfc if spec.get("normalizer") else str
        self._raw_added = _AddedTokenSplitter({t["content"]: t["id"] for t in added if not t["normalized"]})
        self._normalized_added = _AddedTokenSplitter(
            {self._normalize(t["content"]): t["id"] for t in added if t["normalized"]})
        self._check_bpe_against(tokenizer_json)

    def _check_bpe_against(self, tokenizer_json: str | Path) -> None:
        """Rank-ordered BPE (tiktoken) vs merge-ordered BPE (HF) on every vocabulary token and a seeded
        battery of token concatenations; any difference means this vocabulary needs HF's own encoder."""
        from tokenizers import Tokenizer

        hf_model = Tokenizer.from_file(str(tokenizer_json)).model
        to_stand_ins = {byte: char for char, byte in byte_level_alphabet().items()}
        tokens = list(self._ranks)
        rng = random.Random(0)
        pieces = tokens + [b"".join(rng.choices(tokens, k=rng.randint(2, 4))) for _ in range(SELF_CHECK_CONCATENATIONS)]
        for piece in pieces:
            hf_ids = [token.id for token in hf_model.tokenize("".join(to_stand_ins[byte] for byte in piece))]
            if self._tiktoken._encode_single_piece(piece) != hf_ids:
                raise ValueError(f"{tokenizer_json}: rank-ordered BPE differs from the merge list on {piece!r}")

    def encode(self, text: str) -> list[int]:
        if not self._raw_added.holds_any(text):  # most documents: one piece, no added token, no generators
            normalized = self._normalize(text)
            if not self._normalized_added.holds_any(normalized):
                return self._tiktoken.encode_ordinary(normalized)
        ids: list[int] = []
        bpe = self._tiktoken.encode_ordinary
        for raw_piece, raw_added_id in self._raw_added.split(text):
            if raw_piece:
                for piece, added_id in self._normalized_added.split(self._normalize(raw_piece)):
                    if piece:
                        ids += bpe(piece)
                    if added_id is not None:
                        ids.append(added_id)
            if raw_added_id is not None:
                ids.append(raw_added_id)
        return ids
