"""Command-line parts owned by the data package: `data preview`, `data cache`, `tokenizer train` and `bench data`.

gptdist/cli.py calls register_data_commands(subparsers) and register_bench_data(bench_subparsers); each command's
func(args) returns the exit status.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from gptdist.errors import UserError
from gptdist.machine import usable_cores


def register_data_commands(subparsers: Any) -> None:
    data = subparsers.add_parser("data", help="inspect the training data stream")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="WHAT")
    p = data_sub.add_parser(
        "preview",
        help="show what a data-parallel rank receives",
        description="Print the samples rank R of D receives from global sample K on: rank R takes K+R, K+R+D, ...",
    )
    p.add_argument("config", help="run config YAML, e.g. configs/tiny-cpu.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.text_split=line")
    p.add_argument("--rank", type=int, default=0, help="data-parallel rank R (default 0)")
    p.add_argument("--world", type=int, default=1, help="data-parallel size D (default 1)")
    p.add_argument("--start", type=int, default=0, help="global sample index K to start from (default 0)")
    p.add_argument("--count", type=int, default=4, help="samples to show (default 4)")
    p.add_argument("--json", action="store_true", help="one JSON object per line: index and the seq_len+1 ids")
    p.set_defaults(func=preview_command)

    c = data_sub.add_parser(
        "cache",
        help="tokenize a run's data into its token cache ahead of the run",
        description="Fill the token cache a run reads (data.cache: RUN_DIR/token_cache or a shared folder) with the "
        "blocks its steps consume, using the run's own tokenizing workers. Blocks already cached are checked and "
        "kept; a run started afterwards tokenizes nothing that is cached.",
    )
    c.add_argument("config", help="run config YAML")
    c.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.cache=/shared/token_cache")
    c.add_argument("--tokens", type=int, default=None,
                   help="tokens to cache (default: what train.steps consume, steps x global batch x (seq_len+1))")
    c.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: the CPU cores)")
    c.set_defaults(func=cache_command)

    tok = subparsers.add_parser("tokenizer", help="tokenizer tools")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="WHAT")
    t = tok_sub.add_parser(
        "train",
        help="train a byte-level BPE tokenizer (or a character-level one: --char)",
        description="Train a GPT-2 style byte-level BPE on files, globs, folders or pkg://package/glob sources; "
                    "with --char, one token per character the sources hold (sorted), then <|endoftext|>.",
    )
    t.add_argument("sources", nargs="+", metavar="SOURCE")
    t.add_argument("--vocab-size", type=int, help="tokens including <|endoftext|> (>= 257); not with --char")
    t.add_argument("--char", action="store_true", help="character-level: one token per character, ids in sorted "
                   "order")
    t.add_argument("--out", required=True, help="output folder; tokenizer.json is written there")
    t.add_argument("--text-field", default="text", help="JSONL/Parquet field with the text (default text)")
    t.add_argument("--text-split", default="document", choices=["document", "paragraph", "line"],
                   help="how plain-text files are cut into documents (default document)")
    t.add_argument("--hf-files", action="store_true", help="also write vocab.json, merges.txt and configs for "
                   "transformers")
    t.set_defaults(func=tokenizer_train_command)


def register_bench_data(bench_subparsers: Any) -> None:
    b = bench_subparsers.add_parser(
        "data",
        help="loader tokens/s per rank at each world size, vs datasets map() and vs the model's training speed",
        description="Two tables, measured in one run: W loader processes as the data-parallel ranks of one job "
        "sharing a token cache, for each W in --worlds (tokenizing per rank and in total, tokens/s per rank "
        "against the trainer's); then one rank: the loader with 0 and W workers, datasets' non-streaming "
        "load_dataset + map(batched=True) on the same text and tokenizer, and the model's training tokens/s.",
    )
    b.add_argument("config", nargs="?", default="configs/tiny-cpu.yaml", help="run config (default "
                   "configs/tiny-cpu.yaml)")
    b.add_argument("overrides", nargs="*", help="key=value overrides")
    b.add_argument("--tokens", type=int, default=1_000_000,
                   help="tokens per rank and per loader/anchor measurement (default 1e6)")
    b.add_argument("--worlds", default="1,2,4,8", help="world sizes of the first table (default 1,2,4,8)")
    b.add_argument("--workers", type=int, default=2, help="worker processes for the second loader row (default 2)")
    b.add_argument("--repeats", type=int, default=3, help="repeats per row; the table shows medians (default 3)")
    b.add_argument("--model-steps", type=int, default=5, help="timed training steps per repeat (default 5)")
    b.set_defaults(func=bench_data_command)


def preview_command(args: argparse.Namespace) -> int:
    # lazy: a command's modules load only when it runs, so the CLI starts fast
    from gptdist.config import load_config
    from gptdist.data.checks import check_data
    from gptdist.data.loader import iter_samples

    if args.world < 1 or not 0 <= args.rank < args.world:
        raise UserError(f"--rank {args.rank} --world {args.world}: need world >= 1 and 0 <= rank < world")
    if args.start < 0 or args.count < 0:
        raise UserError("--start and --count must not be negative")
    cfg = load_config(args.config, args.overrides)
    tok = check_data(cfg.data, cfg.model.vocab_size)
    samples = iter_samples(cfg.data, seq_len=cfg.model.seq_len, seed=cfg.train.seed, start=args.start)
    shown = 0
    for index, ids in samples:
        if shown >= args.count:
            break
        if (index - args.start - args.rank) % args.world:
            continue
        if args.json:
            print(json.dumps({"index": index, "ids": ids}))
        else:
            print(f"=== sample {index} (rank {args.rank} of {args.world}, {len(ids)} tokens) ===")
            print(tok.decode(ids))
        shown += 1
    return 0


def cache_command(args: argparse.Namespace) -> int:
    # lazy: a command's modules load only when it runs, so the CLI starts fast
    from gptdist.config import load_config
    from gptdist.data.checks import check_data
    from gptdist.data.fill_cache import fill_cache, tokens_for_steps

    cfg = load_config(args.config, args.overrides)
    check_data(cfg.data, cfg.model.vocab_size)
    tokens = args.tokens if args.tokens is not None else tokens_for_steps(cfg)
    cores = usable_cores()
    workers = args.workers if args.workers is not None else cores
    # lazy, as above
    from tqdm import tqdm

    with tqdm(total=tokens, unit="tok", unit_scale=True, desc="token cache", leave=False) as bar:
        def progress(done: int, total: int) -> None:
            bar.update(min(done, total) - bar.n)

        report = fill_cache(cfg, tokens, workers, progress=progress)
    s = report.stats
    rate = s["tokens"] / report.seconds if report.seconds > 0 else 0.0
    print(f"token cache {report.folder}: blocks 0-{report.blocks - 1} hold {report.tokens:,} tokens; "
          f"{s['blocks_tokenized']} block(s) ({s['tokens']:,} tokens) tokenized now by {workers} worker(s) at "
          f"{rate:,.0f} tokens/s, {report.cached_before} already cached, in {report.seconds:.1f} s")
    return 0


def tokenizer_train_command(args: argparse.Namespace) -> int:
    # lazy: a command's modules load only when it runs, so the CLI starts fast
    from gptdist.data.tokenizer_train import train_char_tokenizer, train_tokenizer

    if args.char == (args.vocab_size is not None):
        raise UserError("tokenizer train: give --vocab-size N (byte-level BPE) or --char (characters), one of them")
    if args.char:
        tok = train_char_tokenizer(args.sources, args.out, text_field=args.text_field, text_split=args.text_split)
    else:
        tok = train_tokenizer(args.sources, args.vocab_size, args.out, text_field=args.text_field,
                              text_split=args.text_split)
    if args.hf_files:
        tok.save_hf_files(args.out)
    print(f"wrote {args.out}/tokenizer.json: {tok.vocab_size} tokens, {tok.eos_token} = {tok.eos_id}, identity "
          f"{tok.identity[:12]}")
    return 0


def bench_data_command(args: argparse.Namespace) -> int:
    # lazy: a command's modules load only when it runs, so the CLI starts fast
    from gptdist.bench.data import run_bench

    return run_bench(args)
