"""Shared by the benchmark tests: a tiny model for every row, and the table read back."""

from __future__ import annotations

TINY = ["model.n_layer=2", "model.n_head=2", "model.d_model=64", "model.vocab_size=512", "model.seq_len=32",
        "train.micro_batch_size=2"]


def table_rows(out: str) -> dict:
    rows = {}
    for line in out.splitlines():
        if line.startswith("| ") and not line.startswith("| row"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


# ---------------------------------------------------------------- bench train
