"""`gptdist bench quality CONFIG [overrides]`: does gptdist's data order train as well as random windows?

Two sides, the same model, optimizer, schedule and steps, one process each in turn, no DeepSpeed: only where the
training windows come from differs.

    gptdist    the training loader (build_train_loader, dp=1): the config's data order, documents shuffled in
               blocks, windows shuffled in spans (data.window_shuffle)
    random     windows at uniformly random offsets of one pass over the training sources, drawn with replacement
               from a seeded generator (the sampling of nanoGPT's train.py, written here)

Both final models are scored on the same validation windows: eval.max_samples (or --eval-windows) windows spread
evenly over eval.data, read as validation during training reads them. With --seeds, each seed trains both sides.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch

from gptdist.config import RunConfig, load_config
from gptdist.data import build_train_loader
from gptdist.data.blocks import tokenize_block
from gptdist.data.held_out import held_out_config, spread_windows
from gptdist.data.reader import SourceReader
from gptdist.data.sources import resolve_sources
from gptdist.data.tokenizer import load_tokenizer
from gptdist.engine.optim import build_optimizer, build_scheduler
from gptdist.errors import UserError
from gptdist.model import GPT

Batch = Tuple[torch.Tensor, torch.Tensor]


def quality_config(path: str, overrides: Sequence[str]) -> RunConfig:
    raw = load_config(path, overrides).to_dict()
    raw["tracking"]["enabled"] = False
    cfg = RunConfig.model_validate(raw)
    if cfg.eval.data is None:
        raise UserError("bench quality: the config needs eval.data (the held-out text both sides are scored on)")
    return cfg


def one_pass(cfg: RunConfig, tok) -> np.ndarray:
    """The training sources read once, unshuffled, each document followed by EOS: the stream random windows come
    from. Several sources are concatenated (their weights do not apply to random windows)."""
    parts = []
    for src in resolve_sources(cfg.data):
        reader = SourceReader(src, cfg.data.on_bad_file)
        for unit in range(reader.n_units):
            for docs in reader.iter_unit(unit):
                parts.append(tokenize_block(tok, docs))
    stream = np.concatenate(parts) if parts else np.empty(0, np.int32)
    if len(stream) <= cfg.model.seq_len + 1:
        raise UserError("bench quality: the training sources hold fewer than seq_len+2 tokens")
    return stream


def random_batches(stream: np.ndarray, rows: int, seq_len: int, seed: int) -> Iterator[Batch]:
    """Batches of `rows` windows at random offsets (with replacement), seeded."""
    data = torch.from_numpy(stream.astype(np.int64))
    g = torch.Generator().manual_seed(seed)
    while True:
        ix = torch.randint(len(data) - seq_len - 1, (rows,), generator=g)
        w = torch.stack([data[i:i + seq_len + 1] for i in ix.tolist()])
        yield w[:, :-1].clone(), w[:, 1:].clone()


def loader_batches(cfg: RunConfig) -> Iterator[Batch]:
    with build_train_loader(cfg.data, seq_len=cfg.model.seq_len, micro_batch_size=cfg.train.micro_batch_size,
                            dp_rank=0, dp_size=1, seed=cfg.train.seed) as loader:
        for batch in loader:
            yield batch.inputs, batch.targets


def train(cfg: RunConfig, batches: Iterator[Batch], steps: int) -> Tuple[torch.nn.Module, float, float]:
    """(model, last training loss, median ms per step): global_batch_size // micro_batch_size micro-batches per
    optimizer step, torch AdamW with gptdist's parameter groups and schedule, gradient clipping."""
    model = GPT(cfg.model, seed=cfg.train.seed).train()
    opt = build_optimizer(model, cfg.train, "cpu")
    sched = build_scheduler(opt, cfg.train)
    accum = max(1, (cfg.train.global_batch_size or cfg.train.micro_batch_size) // cfg.train.micro_batch_size)
    params = list(model.parameters())
    times: List[float] = []
    loss_value = math.nan
    for _ in range(steps):
        began = time.perf_counter()
        total = 0.0
        for _ in range(accum):
            x, y = next(batches)
            loss = model(x, y) / accum
            loss.backward()
            total += float(loss.detach())
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip, foreach=True)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - began)
        loss_value = total
    return model, loss_value, 1000 * statistics.median(times)


@torch.no_grad()
def score(model: torch.nn.Module, windows: List[List[int]], rows: int = 32) -> float:
    """Mean next-token loss over the windows (all full length: the mean of batch means weighted by rows)."""
    model.eval()
    total = 0.0
    for i in range(0, len(windows), rows):
        w = torch.tensor(windows[i:i + rows], dtype=torch.long)
        total += float(model(w[:, :-1], w[:, 1:])) * len(w)
    model.train()
    return total / len(windows)


def run(cfg: RunConfig, seeds: Sequence[int], eval_windows: int, out=sys.stdout) -> Dict[str, List[float]]:
    tok = load_tokenizer(cfg.data.tokenizer)
    source = cfg.eval.source
    held = held_out_config(source, cfg.data.tokenizer, source.text_field or cfg.data.text_field, cfg.data.text_split)
    windows = spread_windows(held, tok, cfg.model.seq_len, eval_windows, key="eval.data")
    stream = one_pass(cfg, tok)
    steps, rows = cfg.train.steps, cfg.train.micro_batch_size
    print(f"bench quality: {steps} steps of {cfg.train.global_batch_size or rows} windows of {cfg.model.seq_len}+1 "
          f"tokens; validation on {len(windows)} windows spread over {source.path}; random windows from "
          f"{len(stream):,} training tokens; data.window_shuffle={cfg.data.window_shuffle}, "
          f"data.shuffle_buffer={cfg.data.shuffle_buffer}", file=out, flush=True)
    results: Dict[str, List[float]] = {"gptdist": [], "random": []}
    print(f"{'seed':>6} {'side':<32} {'train loss':>10} {'val loss':>9} {'ms/step':>8}", file=out, flush=True)
    for seed in seeds:
        run_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": seed})})
        sides = (("gptdist", "gptdist loader", loader_batches(run_cfg)),
                 ("random", "random windows (nanoGPT sampling)", random_batches(stream, rows, cfg.model.seq_len,
                                                                                seed)))
        for key, title, batches in sides:
            model, last, ms = train(run_cfg, batches, steps)
            batches.close()
            val = score(model, windows)
            results[key].append(val)
            print(f"{seed:>6} {title:<32} {last:>10.4f} {val:>9.4f} {ms:>8.1f}", file=out, flush=True)
    g, r = statistics.mean(results["gptdist"]), statistics.mean(results["random"])
    print(f"mean val loss over {len(seeds)} seed(s): gptdist {g:.4f}, random windows {r:.4f}, "
          f"difference {g - r:+.4f}", file=out, flush=True)
    return results
