"""`gptdist bench train CONFIG [overrides]`: is 1-rank gptdist as fast as a plain PyTorch loop of the same GPT?

One table, measured in one run: the config's model and micro-batch on random tokens, one micro-batch per optimizer
step, the same timed steps after the same warm-up for every row, medians over interleaved repeats (workers.py).
Rows: a real `gptdist train` run of the recipe with its default settings (bench/in_training.py: tokens/s from its
metrics.jsonl, and where its steps' time went), gptdist's DeepSpeed engine alone (ZeRO-0, built by
gptdist.engine.build as training builds it), the plain PyTorch loop with nanoGPT's full-logits loss (the baseline,
1.00x), the same loop with gptdist's chunked loss, transformers' GPT2LMHeadModel, and the matmul ceiling that MFU is
measured against. The training run's data is the recipe's; the other rows train on random tokens.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from gptdist.bench.in_training import FIRST_STEP, ROW, TITLE, breakdown, format_breakdown, run_training
from gptdist.bench.runners import ROWS, TITLES
from gptdist.bench.table import build_lines, format_table
from gptdist.bench.workers import RowResult, measure_rows
from gptdist.config import RunConfig, load_config
from gptdist.engine.ds_config import resolve_precision
from gptdist.machine import usable_cores
from gptdist.model import count_parameters, flops_per_token
from gptdist.telemetry.metrics_file import datasheet_peak_flops


def bench_config(path: str, overrides: Sequence[str]) -> RunConfig:
    """The recipe's model and micro-batch as one rank trains them: no tp/pp, ZeRO-0, one micro-batch per step."""
    raw = load_config(path, overrides).to_dict()
    raw["parallel"].update(tp=1, pp=1, zero_stage=0, activation_checkpointing=False)
    raw["train"]["global_batch_size"] = raw["train"]["micro_batch_size"]
    raw["tracking"]["enabled"] = False
    return RunConfig.model_validate(raw)


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cores = usable_cores()
    return f"CPU, {cores} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def run_bench_train(args: argparse.Namespace) -> int:
    cfg = bench_config(args.config, args.overrides)
    gpu = torch.cuda.is_available()
    precision = resolve_precision(cfg, "cuda" if gpu else "cpu")
    rows = [r for r in ROWS if r not in (args.skip or [])]
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if not args.quiet else (lambda m: None)
    training = TrainingRow(args, cfg.train.micro_batch_size) if ROW not in (args.skip or []) else None
    with tempfile.TemporaryDirectory(prefix="gptdist-bench-train-") as tmp:
        if training is not None:
            training.workdir = Path(tmp)
        results = measure_rows(rows, cfg.to_dict(), steps=args.steps, warmup=args.warmup, repeats=args.repeats,
                               log=log, each_round=training.run if training is not None else None)

    m, t = cfg.model, cfg.train
    tokens = t.micro_batch_size * m.seq_len
    token_flops = flops_per_token(m)
    peak = datasheet_peak_flops(torch.cuda.get_device_name(), precision) if gpu else None
    print(f"gptdist bench train: {args.config} {' '.join(args.overrides)}".rstrip())
    print(f"model: {m.n_layer} layers, d_model {m.d_model}, {m.n_head} heads, vocab {m.vocab_size}, seq {m.seq_len}, "
          f"{count_parameters(m) / 1e6:.2f} M params; micro-batch {t.micro_batch_size} ({tokens} tokens/step), "
          f"{precision}; FLOPs/token 6N+12LdT = {token_flops / 1e6:.1f} M")
    print(f"{machine()}; {args.steps} timed steps after {args.warmup} warm-up, median of {args.repeats} interleaved "
          f"repeats; each row in its own process")
    print()
    if training is not None:
        results = [training.result(tokens)] + results
    lines = build_lines(results, {**TITLES, ROW: TITLE}, tokens_per_step=tokens, flops_per_token=token_flops,
                        datasheet_peak=peak)
    print(format_table(lines, gpu))
    if training is not None and training.times:
        print(f"\nWhere a step of `gptdist train` went (median of {len(training.times)} runs, steps after "
              f"{FIRST_STEP}; validation and checkpoints are scheduled, not paid every step):\n")
        print(format_breakdown(breakdown(training.times)))
    failed = [r for r in results if r.error]
    for res in failed:
        print(f"\n{res.row} failed:\n{res.error}", file=sys.stderr)
    return 1 if failed else 0


class TrainingRow:
    """The real training run, once per round (bench/in_training.py)."""

    def __init__(self, args: argparse.Namespace, micro_batch: int) -> None:
        self.args, self.micro_batch = args, micro_batch
        self.workdir: Optional[Path] = None
        self.rates: List[float] = []  # one per run: the median of its windows after FIRST_STEP
        self.times: List[Dict[str, Any]] = []
        self.error: Optional[str] = None
        self.peak_bytes = 0

    def run(self, round_index: int) -> None:
        if self.error is not None or self.workdir is None:
            return
        try:
            out = run_training(self.args.config, self.args.overrides, self.micro_batch, self.args.train_steps,
                               self.workdir / f"round-{round_index}")
        except Exception as exc:  # noqa: BLE001 - shown in the table's row, like a worker's failure
            self.error = str(exc)
            return
        if out["windows"]:
            self.rates.append(statistics.median(out["windows"]))
        if out["times"]:
            self.times.append(out["times"])
        self.peak_bytes = max(self.peak_bytes, out["peak_rss_bytes"])

    def result(self, tokens_per_step: int) -> RowResult:
        """As a worker row: one 'window' per run, of one step at the run's median rate."""
        res = RowResult(ROW, error=self.error)
        if not self.rates and self.error is None:
            res.error = f"no logging window ended after step {FIRST_STEP}: raise --train-steps"
        res.seconds = [tokens_per_step / rate for rate in self.rates]
        res.steps = 1
        res.info = {"note": "the recipe's data and default settings, a run per round"}
        res.peak_bytes = self.peak_bytes
        return res
