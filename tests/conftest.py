import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DOCUMENTS = REPO / "data" / "sample" / "documents"
TOKENIZER = REPO / "data" / "tokenizers" / "olmo-gpt-neox-dolma-v1_5.json"


@pytest.fixture(scope="session")
def sample_prefix(tmp_path_factory):
    """The shipped Dolma sample tokenized once with pico's tokenizer (+ EOD) for the whole session."""
    from megapico.data.preprocess import PreprocessOptions, preprocess

    out = tmp_path_factory.mktemp("sample-data") / "sample"
    preprocess(PreprocessOptions(input=str(SAMPLE_DOCUMENTS), output_prefix=str(out),
                                 tokenizer_model=str(TOKENIZER), append_eod=True))
    return f"{out}_text_document"
