"""`gptdist bench train`, `parallel`, `checkpoint` and `quality`: gptdist/cli.py calls
register_bench_commands(bench_subparsers). Each command's func(args) returns the exit status;
the heavy imports happen inside them."""

from __future__ import annotations

import argparse
from typing import Any


def register_bench_commands(bench_subparsers: Any) -> None:
    t = bench_subparsers.add_parser(
        "train",
        help="1-rank gptdist vs a plain PyTorch loop, transformers' GPT-2 and the matmul ceiling",
        description="One table measured in one run: tokens/s, step time, MFU, peak memory and the ratio to the plain "
        "PyTorch loop, for the config's model and micro-batch on random tokens.",
    )
    t.add_argument("config", nargs="?", default="configs/tiny-cpu.yaml", help="run config (default "
                   "configs/tiny-cpu.yaml)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.vocab_size=50304 model.n_layer=6")
    t.add_argument("--steps", type=int, default=5, help="timed steps per repeat (default 5)")
    t.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    t.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the table shows medians (default 3)")
    t.add_argument("--train-steps", type=int, default=60, help="steps of each real `gptdist train` run; its "
                   "tokens/s is the median of metrics.jsonl's windows after step 10 (default 60)")
    t.add_argument("--skip", action="append", choices=["plain-chunked", "transformers", "gptdist", "in-training"],
                   help="leave a row out (repeatable)")
    t.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    t.set_defaults(func=_train)

    q = bench_subparsers.add_parser(
        "peers",
        help="gptdist against the HF Trainer with DeepSpeed ZeRO and the deepspeed.initialize loop, in-training",
        description="gptdist, transformers' Trainer with a DeepSpeed ZeRO config and DeepSpeed's getting-started loop "
        "train the recipe's GPT shape under the deepspeed launcher at world 1 and 2, ZeRO 1 and 2, with the same "
        "tokens per optimizer step; runs interleaved in rounds.",
    )
    q.add_argument("config", nargs="?", default="configs/tiny-cpu.yaml", help="run config (default "
                   "configs/tiny-cpu.yaml)")
    q.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")
    q.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default 40)")
    q.add_argument("--repeats", type=int, default=2, help="interleaved runs per cell (default 2)")
    q.add_argument("--layouts", default="", help="comma-separated subset of w1z1,w1z2,w2z1,w2z2 (default all)")
    q.add_argument("--skip", action="append", choices=["hf-trainer", "ds-loop"], help="leave a peer out")
    q.add_argument("--timeout", type=float, default=900, help="seconds per launch before its process group is "
                   "killed (default 900)")
    q.add_argument("--out", default="", help="keep every run's folder and log here (default: a temporary folder)")
    q.set_defaults(func=_peers)

    p = bench_subparsers.add_parser(
        "parallel",
        help="tokens/s per parallel layout under the deepspeed launcher, ZeRO comms volume, pipeline bubble",
        description="Short runs of a fixed tiny model under launch/train.sh (OMP_NUM_THREADS=1) for 1 rank, dp=2 with "
        "ZeRO 1/2/3, tp=2, pp=2 and tp2 x pp2 x dp2; DeepSpeed's comms logger totals per step for ZeRO 1/2/3 against "
        "the ZeRO paper's volumes; the pipeline's idle fraction.",
    )
    p.add_argument("config", nargs="?", default=None,
                   help="a recipe for the data section (default: a built-in tiny run on the Shakespeare recipe's data)")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every layout")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run; tokens/s is the median after the "
                   "first log window (default 12)")
    p.add_argument("--repeats", type=int, default=1, help="runs per layout, interleaved in rounds; the table shows "
                   "the median (default 1)")
    p.add_argument("--layouts", default=None, help="comma-separated subset of layout names (default: all)")
    p.add_argument("--out", default=None, help="folder for the runs (default: a temporary one, removed after)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run before it is stopped (default 600)")
    p.add_argument("--no-comms", action="store_true", help="skip the comms-logger runs")
    p.set_defaults(func=_parallel)

    c = bench_subparsers.add_parser(
        "checkpoint",
        help="what a save costs training, with checkpoint.async on and off, and the bytes per parameter",
        description="Short runs of a ~60 M-parameter model under launch/train.sh saving every few steps, background "
        "writer on and off, interleaved: seconds training waited per save, write seconds, bytes on disk.")
    c.add_argument("config", nargs="?", default="configs/tiny-cpu.yaml", help="recipe for data and tokenizer")
    c.add_argument("overrides", nargs="*", help="key=value overrides (e.g. model.n_layer=4 for a smaller model)")
    c.add_argument("--ranks", type=int, default=2, help="ranks (default 2)")
    c.add_argument("--steps", type=int, default=8, help="optimizer steps per run (default 8)")
    c.add_argument("--every", type=int, default=2, help="steps between saves (default 2)")
    c.add_argument("--repeats", type=int, default=1, help="runs per mode, interleaved (default 1)")
    c.add_argument("--timeout", type=float, default=900, help="seconds per run before it is stopped (default 900)")
    c.add_argument("--out", default=None, help="folder for the runs (default: a temporary one, removed after)")
    c.set_defaults(func=_checkpoint)

    q = bench_subparsers.add_parser(
        "quality",
        help="validation loss of gptdist's data order against random windows of the same tokens, same model",
        description="Trains the config's model twice per seed in one process (no DeepSpeed), the same optimizer, "
        "schedule and steps: once on gptdist's training loader, once on windows at random offsets of one pass over "
        "the training sources (nanoGPT's sampling); prints both validation losses on the same windows of eval.data.")
    q.add_argument("config", nargs="?", default="configs/shakespeare-char.yaml", help="run config with eval.data "
                   "(default configs/shakespeare-char.yaml)")
    q.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=200")
    q.add_argument("--seeds", default=None, help="comma-separated train seeds (default: train.seed)")
    q.add_argument("--eval-windows", type=int, default=None, help="validation windows, spread over eval.data "
                   "(default eval.max_samples)")
    q.set_defaults(func=_quality)


def _checkpoint(args: argparse.Namespace) -> int:
    # lazy: a bench's modules load only when it runs, so the CLI starts fast
    from gptdist.bench.checkpoint import run_bench_checkpoint

    return run_bench_checkpoint(args)


def _quality(args: argparse.Namespace) -> int:
    # lazy: a bench's modules load only when it runs, so the CLI starts fast
    from gptdist.bench.quality import quality_config, run

    cfg = quality_config(args.config, args.overrides)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [cfg.train.seed]
    run(cfg, seeds, args.eval_windows or cfg.eval.max_samples)
    return 0


def _train(args: argparse.Namespace) -> int:
    # lazy: a bench's modules load only when it runs, so the CLI starts fast
    from gptdist.bench.train import run_bench_train

    return run_bench_train(args)


def _parallel(args: argparse.Namespace) -> int:
    # lazy: a bench's modules load only when it runs, so the CLI starts fast
    from gptdist.bench.parallel import run_bench_parallel

    return run_bench_parallel(args)


def _peers(args: argparse.Namespace) -> int:
    # lazy: a bench's modules load only when it runs, so the CLI starts fast
    from gptdist.bench.peers import run_bench_peers

    return run_bench_peers(args)
