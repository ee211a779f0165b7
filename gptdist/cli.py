"""The `gptdist` command line: one entry point, a sub-command per job.

    gptdist train CONFIG [key=value ...]        one rank of a training run (under deepspeed/srun, or alone)
    gptdist data preview CONFIG ...             what a data-parallel rank receives
    gptdist tokenizer train SOURCE ...          train a byte-level BPE tokenizer
    gptdist check CONFIG --world N              validate a recipe, its layout and data
    gptdist compare-loss RUN_A RUN_B            do two runs' per-step losses agree?
    gptdist plan CONFIG --gpus N                predict memory and step time of every layout; recommend one
    gptdist export | import-hf | generate | eval   checkpoints <-> transformers, text, perplexity
    gptdist bench data|train|parallel ...       benchmarks that print a table

A UserError anywhere becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from gptdist.commands.bench import register_bench_commands
from gptdist.commands.data import register_bench_data, register_data_commands
from gptdist.commands.plan import register_plan_command
from gptdist.commands.tools import register_compare_command, register_tool_commands
from gptdist.commands.train import register_train_commands
from gptdist.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptdist", description=__doc__.split("\n\n")[0])
    # The deepspeed launcher started without --no_local_rank puts --local_rank=N before the command; `gptdist train`
    # checks it against LOCAL_RANK (gptdist/launchers/run_config.py).
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    register_train_commands(sub)
    register_compare_command(sub)
    register_tool_commands(sub)
    register_data_commands(sub)
    register_plan_command(sub)
    bench = sub.add_parser("bench", help="benchmarks: print a table measured in one run")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="WHAT")
    register_bench_data(bench_sub)
    register_bench_commands(bench_sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # `gptdist check CONFIG --world 2 train.steps=5`: argparse ends a positional list at the first option, so
    # key=value overrides after an option arrive here; they are overrides all the same.
    if rest and hasattr(args, "overrides") and all("=" in r and not r.startswith("-") for r in rest):
        args.overrides = [*args.overrides, *rest]
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"gptdist: {one_line(str(err))}", file=sys.stderr)
        return UserError.exit_code


def one_line(message: str, limit: int = 1000) -> str:
    """A refusal as one line of at most `limit` characters: a value echoed from the input (a path, a YAML value)
    cannot stretch it; the start (what is wrong) and the end (the fix) are kept."""
    text = " ".join(message.split())
    if len(text) <= limit:
        return text
    keep = (limit - 5) // 2
    return f"{text[:keep]} ... {text[-keep:]}"


if __name__ == "__main__":
    sys.exit(main())
