"""`gptdist eval CHECKPOINT_OR_RUN --data SOURCE`: mean next-token loss and perplexity on held-out text, read as
gptdist/data/held_out.py reads it (the same windows as the validation loss during training).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

from gptdist.data.held_out import held_out_config, spread_windows, windows
from gptdist.errors import UserError
from gptdist.tools.resolve import Checkpoint


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    samples: int
    tokens: int  # predicted tokens: samples * seq_len

    def to_json(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "samples": self.samples, "tokens": self.tokens}


def eval_data_config(ckpt: Checkpoint, source: str, tokenizer_spec: Optional[str] = None,
                     text_field: Optional[str] = None, text_split: Optional[str] = None):
    """The held-out source, read the way the checkpoint's training data was (same text_field and text_split)."""
    trained = ckpt.cfg.data
    return held_out_config(source, tokenizer_spec or trained.tokenizer, text_field or trained.text_field,
                           text_split or trained.text_split)


def evaluate(ckpt: Checkpoint, source: str, *, max_samples: Optional[int] = None, batch_size: int = 8,
             tokenizer_spec: Optional[str] = None, text_field: Optional[str] = None,
             text_split: Optional[str] = None, device: Optional[str] = None) -> EvalResult:
    # torch: only when evaluating; the tools' modules import without it
    import torch
    import torch.nn.functional as F

    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be >= 1")
    if max_samples is not None and max_samples < 1:
        raise UserError(f"--max-samples {max_samples}: must be >= 1")
    tok = ckpt.tokenizer(tokenizer_spec)
    data_cfg = eval_data_config(ckpt, source, tokenizer_spec, text_field, text_split)
    seq_len = ckpt.cfg.model.seq_len
    model = ckpt.model(device)
    dev = next(model.parameters()).device

    total, samples = 0.0, 0  # summed in float64 on the host: a long evaluation must not lose low bits
    batch: List[List[int]] = []

    @torch.no_grad()
    def score(rows: List[List[int]]) -> float:
        w = torch.tensor(rows, dtype=torch.long, device=dev)
        logits = model(w[:, :-1]).float()
        return float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), w[:, 1:].reshape(-1), reduction="sum"))

    if max_samples is None:
        chosen = windows(data_cfg, tok, seq_len)
    else:  # spread over the whole source, as validation during training takes them
        chosen = iter(spread_windows(data_cfg, tok, seq_len, max_samples, f"--data {source}"))
    for window in chosen:
        batch.append(window)
        samples += 1
        if len(batch) == batch_size:
            total += score(batch)
            batch = []
    if batch:
        total += score(batch)
    if samples == 0:
        raise UserError(f"--data {source}: fewer than seq_len+1={seq_len + 1} tokens of text; "
                        "nothing to evaluate on a full context")
    tokens = samples * seq_len
    loss = total / tokens
    return EvalResult(loss, math.exp(loss) if loss < 700 else math.inf, samples, tokens)
