"""`gptdist train CONFIG [key=value ...]`: the per-rank entry point of a training run."""

from __future__ import annotations

import argparse


def register_train_commands(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser(
        "train",
        help="train (one rank; run it under the deepspeed launcher, srun, or alone)",
        description="Train a GPT from a YAML recipe. Overrides are dotted keys: train.steps=100 parallel.zero_stage=2.",
    )
    train.add_argument("config", help="YAML recipe, e.g. configs/tiny-cpu.yaml")
    train.add_argument("overrides", nargs="*", metavar="key=value")
    train.set_defaults(func=_run_train)

    check = sub.add_parser(
        "check",
        help="validate a recipe, its layout and its data without training",
        description="Exit 0 if `gptdist train CONFIG ...` would start on WORLD ranks; else one line and exit 2.",
    )
    check.add_argument("config")
    check.add_argument("overrides", nargs="*", metavar="key=value")
    check.add_argument("--world", type=int, default=1, help="number of ranks the run will have (default 1)")
    check.set_defaults(func=_run_check)


def _run_train(args: argparse.Namespace) -> int:
    from gptdist.config import load_config
    from gptdist.train.loop import train
    from gptdist.train.runtime import finish_process

    cfg = load_config(args.config, args.overrides)
    code = train(cfg)
    finish_process(code)
    return code


def _run_check(args: argparse.Namespace) -> int:
    from gptdist.config import load_config
    from gptdist.data import check_data
    from gptdist.parallel.layout import Layout

    cfg = load_config(args.config, args.overrides)
    layout = Layout.resolve(cfg, args.world)
    check_data(cfg.data, cfg.model.vocab_size)
    print(f"gptdist: {args.config} is valid for {args.world} rank(s): {layout.describe()}")
    return 0
