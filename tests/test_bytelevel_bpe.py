"""The tiktoken encoder (megapico/data/bytelevel_bpe.py) against HF tokenizers' own, id for id."""

import gzip
import json
import random

import pytest
from check_tokenizer_backend import differing, probe_texts
from check_tokenizer_backend import main as check_main
from conftest import SAMPLE_DOCUMENTS, TOKENIZER
from tokenizers import Tokenizer

from megapico.data.bytelevel_bpe import ByteLevelBPE, byte_level_alphabet, unsupported_reason
from megapico.data.indexed_dataset import DataError
from megapico.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def encoders():
    return ByteLevelBPE(TOKENIZER), Tokenizer.from_file(str(TOKENIZER))


@pytest.fixture(scope="module")
def spec():
    return json.loads(TOKENIZER.read_text())


def test_pico_tokenizer_takes_the_tiktoken_backend_by_default():
    assert load_tokenizer(str(TOKENIZER), backend="auto").backend == "tiktoken"
    assert load_tokenizer(str(TOKENIZER), backend="huggingface").backend == "huggingface"


def test_sample_documents_and_random_probes_match_hf(encoders, spec):
    fast, reference = encoders
    documents = []
    for path in sorted(SAMPLE_DOCUMENTS.glob("*.json.gz")):
        with gzip.open(path, "rt") as handle:
            documents += [json.loads(line)["text"] for line in handle]
    assert differing(fast, reference, documents) == []
    added = [token["content"] for token in spec["added_tokens"]]
    assert differing(fast, reference, probe_texts(random.Random(1), 20_000, added)) == []


EDGE_TEXTS = [
    "", " ", "a" + " " * 60 + "b", " " * 25, "\t  \n   \r\n", "x<|endoftext|><|endoftext|>y", "<|padding|>",
    "a||||IP_ADDRESS|||b", "|||EMAIL_ADDRESS||||||PHONE_NUMBER|||", "<|endoftext", "e\u0301 A\u030a \u212b",
    "don't I'LL we've 's", "１２３ ٣ ½", "👍🏽🏳️‍🌈", "def f():\n        return  1\n",
]


@pytest.mark.parametrize("text", EDGE_TEXTS)
def test_edge_texts_match_hf(encoders, text):
    fast, reference = encoders
    assert fast.encode(text) == reference.encode(text, add_special_tokens=False).ids


def test_whitespace_runs_use_the_added_space_tokens(encoders):
    """pico's tokenizer has added tokens for 2..24 spaces; they win over BPE's own space merges."""
    fast, _ = encoders
    assert fast.encode("a" + " " * 30 + "b") == [66, 50254, 50272, 67]  # 24 + 6 spaces


def _write(tmp_path, spec):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    return path


def _changed(spec, change):
    changed = json.loads(json.dumps(spec))
    change(changed)
    return changed


TEMPLATE = {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {}}
UNSUPPORTED = [
    (lambda s: s.update(normalizer={"type": "NFKC"}), "normalizer NFKC"),
    (lambda s: s["pre_tokenizer"].update(add_prefix_space=True), "pre-tokenizer is not ByteLevel"),
    (lambda s: s["model"].update(dropout=0.1), "dropout=0.1"),
    (lambda s: s["added_tokens"][0].update(lstrip=True), "lstrip/rstrip/single_word"),
    (lambda s: s["model"]["merges"].reverse(), "ids do not rise with the merge order"),
    (lambda s: s.update(post_processor=TEMPLATE), "post-processor TemplateProcessing"),
]


@pytest.mark.parametrize("change, reason", UNSUPPORTED)
def test_unsupported_files_fall_back_to_hf_or_error_when_forced(tmp_path, spec, change, reason):
    path = _write(tmp_path, _changed(spec, change))
    assert reason in unsupported_reason(json.loads(path.read_text()))
    tokenizer = load_tokenizer(str(path), backend="auto")
    assert tokenizer.backend == "huggingface" and reason in tokenizer.backend_note
    with pytest.raises(DataError, match=f"tiktoken cannot encode .*{reason}.*use auto or huggingface"):
        load_tokenizer(str(path), backend="tiktoken")


def test_self_check_rejects_a_vocabulary_where_merge_order_and_rank_order_disagree(tmp_path, spec):
    """bc merges first, then ab, and abc is only reachable from ab + c: HF leaves "abc" as a + bc, while
    merging by rank would join a + bc into abc. Ids still rise with the merge order, so only the check sees it."""
    alphabet = sorted(byte_level_alphabet(), key=byte_level_alphabet().get)
    vocab = {char: i for i, char in enumerate(alphabet)} | {"bc": 256, "ab": 257, "abc": 258}
    eod = {"id": 259, "content": "<|endoftext|>", "single_word": False, "lstrip": False, "rstrip": False,
           "normalized": False, "special": True}
    toy = _changed(spec, lambda s: s.update(added_tokens=[eod], normalizer=None, post_processor=None))
    toy["model"].update(vocab=vocab, merges=["b c", "a b", "ab c"])
    path = _write(tmp_path, toy)
    assert Tokenizer.from_file(str(path)).encode("abc").tokens == ["a", "bc"]
    assert unsupported_reason(toy) is None
    with pytest.raises(ValueError, match="rank-ordered BPE differs from the merge list on b'abc'"):
        ByteLevelBPE(path)
    assert "rank-ordered BPE differs" in load_tokenizer(str(path), backend="auto").backend_note


def test_check_tool_reports_agreement_and_refuses_unsupported_files(tmp_path, spec, capsys):
    assert check_main(["--tokenizer-model", str(TOKENIZER), "--input", str(SAMPLE_DOCUMENTS), "--seconds", "1"]) == 0
    assert "3,187 documents" in capsys.readouterr().out
    path = _write(tmp_path, _changed(spec, lambda s: s.update(normalizer={"type": "NFKC"})))
    assert check_main(["--tokenizer-model", str(path), "--seconds", "0"]) == 1
    assert "normalizer NFKC" in capsys.readouterr().err
