"""Check that the tiktoken encoder gives HF's ids for a tokenizer.json, on your corpus and on random probes.

preprocess_data.py encodes byte-level BPE tokenizers with tiktoken (--tokenizer-backend auto) after a quick
self-check of the BPE; this runs the long check: every document of --input and random strings built to stress
the GPT-2 split pattern, NFC normalization and the added tokens, for --seconds.
    python tools/check_tokenizer_backend.py --tokenizer-model data/tokenizers/olmo-gpt-neox-dolma-v1_5.json \\
        --input data/sample/documents --seconds 60
Exits 1, printing the first texts that differ, when any do.
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

import tokenizers
from tqdm import tqdm

from megapico.data.bytelevel_bpe import ByteLevelBPE
from megapico.data.readers import discover_sources, read_chunks

PROBE_PIECES = [
    *"abcXYZ019 '.,;:!?-_\"()[]{}<>|/\\@#$%^&*~`+=\n\t\r", *[" "] * 20,  # ASCII, spaces weighted up
    *"\x0b\x0c\x85\xa0\u1680\u2000\u2002\u2009\u200a\u2028\u2029\u202f\u205f\u3000\u200b\ufeff",  # other spaces
    *"éèüßçñøåÆŒ", "e\u0301", "a\u0308", "\u0301", "\u0327", "\u1100\u1161", "\uac00",  # NFC composes these
    "\u212b", "\u2126", "\ufb01", "\u00c5", *"αβγΔЖжщ中文字日本語한국어العربيةहिन्दीไทย",
    *"٠١٢٣۴۵०१２３①Ⅻ½²", "😀", "👍🏽", "🏳️‍🌈", "𝔘", "𐍈", "\u0378", "\U000e0001", "\u061c", "\u00ad", "\u0600",
    "'s", "'ll", "'RE", "'t", "<|", "|||",
]


def probe_texts(rng: random.Random, count: int, added_tokens: list[str]) -> list[str]:
    """Random strings of 1..40 pieces drawn from PROBE_PIECES and the tokenizer's added tokens."""
    pieces = PROBE_PIECES + added_tokens
    return ["".join(rng.choices(pieces, k=rng.randint(1, 40))) for _ in range(count)]


def differing(fast: ByteLevelBPE, reference: tokenizers.Tokenizer, texts: list[str]) -> list[str]:
    """The texts whose ids differ between the two encoders."""
    expected = reference.encode_batch_fast(texts, add_special_tokens=False)
    return [text for text, encoding in zip(texts, expected, strict=True) if fast.encode(text) != encoding.ids]


def corpus_texts(path: str, key: str):
    """Batches of the --input documents' `key` texts (records that do not parse are left out)."""
    for source in discover_sources(path):
        for chunk in read_chunks(source, [key], "train"):
            if chunk.texts is not None:
                yield [text for text in chunk.texts[key] if isinstance(text, str)]
                continue
            records = []
            for line in chunk.lines.split(b"\n"):
                try:
                    records.append(json.loads(line)[key])
                except (ValueError, KeyError, TypeError):
                    continue
            yield [text for text in records if isinstance(text, str)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-model", required=True, help="a HF tokenizer.json")
    parser.add_argument("--input", help="documents to compare (any input preprocess_data.py reads)")
    parser.add_argument("--json-key", default="text", help="field (column) of --input holding the text")
    parser.add_argument("--seconds", type=float, default=60.0, help="time for random probes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random probes (the same seed, the same "
                                                              "probes)")
    args = parser.parse_args(argv)
    try:
        fast = ByteLevelBPE(args.tokenizer_model)
    except (ValueError, OSError) as err:
        print(f"error: tiktoken cannot encode this tokenizer: {err}", file=sys.stderr)
        return 1
    reference = tokenizers.Tokenizer.from_file(str(args.tokenizer_model))
    added = [token["content"] for token in json.loads(Path(args.tokenizer_model).read_text())["added_tokens"]]
    bad: list[str] = []
    checked = {"documents": 0, "probes": 0}
    if args.input:
        for texts in tqdm(corpus_texts(args.input, args.json_key), desc="documents", unit="chunk"):
            bad += differing(fast, reference, texts)
            checked["documents"] += len(texts)
    rng = random.Random(args.seed)
    deadline = time.monotonic() + args.seconds
    with tqdm(desc="probes", unit="text", unit_scale=True) as progress:
        while time.monotonic() < deadline:
            texts = probe_texts(rng, 2000, added)
            bad += differing(fast, reference, texts)
            checked["probes"] += len(texts)
            progress.update(len(texts))
    print(f"{args.tokenizer_model}: {checked['documents']:,} documents and {checked['probes']:,} random probes, "
          f"{len(bad):,} differ")
    for text in bad[:10]:
        print(f"  differs: {text!r}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
