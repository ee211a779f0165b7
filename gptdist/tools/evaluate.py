"""`gptdist eval CHECKPOINT_OR_RUN --data SOURCE`: mean next-token loss and perplexity on held-out text.

The text is read as training reads one source with no shuffling (files in sorted order, documents in file
order, each followed by EOS) and cut into the same non-overlapping seq_len+1 windows, so the windows equal
`gptdist.data.iter_samples` with shuffle_buffer=0. Unlike training, one pass only: the source is not repeated,
and a last window shorter than seq_len+1 tokens is left out (every sample is scored on a full context).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, List, Optional

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
    from gptdist.data.config import DataConfig

    trained = ckpt.cfg.data
    return DataConfig(sources=[source], tokenizer=tokenizer_spec or trained.tokenizer, shuffle_buffer=0,
                      text_field=text_field or trained.text_field, text_split=text_split or trained.text_split,
                      on_bad_file="fail")


def windows(data_cfg, tok, seq_len: int) -> Iterator[List[int]]:
    """The seq_len+1 token windows of one pass over the source."""
    import numpy as np

    from gptdist.data.blocks import tokenize_block
    from gptdist.data.reader import SourceReader
    from gptdist.data.sources import resolve_sources

    try:
        (src,) = resolve_sources(data_cfg)
    except UserError as err:  # the data module names the config key; here the user typed --data
        raise UserError(str(err).replace("data.sources[0].path", "--data")) from None
    reader = SourceReader(src, data_cfg.on_bad_file)
    width = seq_len + 1
    pending = np.empty(0, dtype=np.int32)
    for unit in range(reader.n_units):
        for docs in reader.iter_unit(unit):
            pending = np.concatenate([pending, tokenize_block(tok, docs)])
            n = len(pending) // width
            for k in range(n):
                yield pending[k * width : (k + 1) * width].tolist()
            pending = pending[n * width :]


def evaluate(ckpt: Checkpoint, source: str, *, max_samples: Optional[int] = None, batch_size: int = 8,
             tokenizer_spec: Optional[str] = None, text_field: Optional[str] = None,
             text_split: Optional[str] = None, device: Optional[str] = None) -> EvalResult:
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

    for window in windows(data_cfg, tok, seq_len):
        batch.append(window)
        samples += 1
        if len(batch) == batch_size:
            total += score(batch)
            batch = []
        if max_samples is not None and samples >= max_samples:
            break
    if batch:
        total += score(batch)
    if samples == 0:
        raise UserError(f"--data {source}: fewer than seq_len+1={seq_len + 1} tokens of text; "
                        "nothing to evaluate on a full context")
    tokens = samples * seq_len
    loss = total / tokens
    return EvalResult(loss, math.exp(loss) if loss < 700 else math.inf, samples, tokens)
