"""`gptdist train CONFIG [key=value ...]`: the per-rank entry point of a training run."""

from __future__ import annotations

import argparse
import os
import sys

from gptdist.errors import UserError


def register_train_commands(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser(
        "train",
        help="train (one rank; run it under the deepspeed launcher, srun, or alone)",
        description="Train a GPT from a YAML recipe. Overrides are dotted keys: train.steps=100 parallel.zero_stage=2.",
    )
    train.add_argument("config", help="YAML recipe, e.g. configs/tiny-cpu.yaml")
    train.add_argument("overrides", nargs="*", metavar="key=value")
    _add_accelerate_config(train)
    train.set_defaults(func=_run_train)

    check = sub.add_parser(
        "check",
        help="validate a recipe, its layout and its data without training",
        description="Exit 0 if `gptdist train CONFIG ...` would start on WORLD ranks; else one line and exit 2.",
    )
    check.add_argument("config")
    check.add_argument("overrides", nargs="*", metavar="key=value")
    check.add_argument("--world", type=int, default=1, help="number of ranks the run will have (default 1)")
    _add_accelerate_config(check)
    check.set_defaults(func=_run_check)


def _add_accelerate_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--accelerate-config", metavar="FILE", default=None,
                        help="an accelerate config YAML whose settings (zero_stage, mixed_precision, "
                             "gradient_clipping, deepspeed_config_file) apply where the recipe is silent "
                             "(gptdist/launchers/)")


def _run_train(args: argparse.Namespace) -> int:
    # lazy: a command's modules load only when it runs, so the CLI starts fast
    from gptdist.launchers.run_config import resolve_run_config

    try:
        cfg = resolve_run_config(args.config, args.overrides, accelerate_config=args.accelerate_config,
                                 local_rank_arg=args.local_rank)
    except UserError:
        # Every rank refuses the same config; one line per node is enough (a launcher without gptdist's own
        # pre-check, such as `accelerate launch`, shows each node's output).
        if os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")) != "0":
            return UserError.exit_code
        raise
    # lazy, as above
    from gptdist.engine.process import discover_world, finish_process, keep_mlflow_out

    if not (cfg.tracking.enabled and discover_world().is_main):
        keep_mlflow_out()
    # ordering: after keep_mlflow_out, which must run before deepspeed (and mlflow) are imported
    from gptdist.train.loop import train

    code = train(cfg)
    finish_process(code)
    return code


def _run_check(args: argparse.Namespace) -> int:
    # lazy: a command's modules load only when it runs, so the CLI starts fast
    from gptdist.launchers.run_config import resolve_run_config
    from gptdist.train.preflight import preflight

    # Run by the launch scripts before any launcher: no launcher environment to read, the world size is given.
    cfg = resolve_run_config(args.config, args.overrides, env={}, world_size=args.world,
                             accelerate_config=args.accelerate_config)
    warnings = []
    checked = preflight(cfg, args.world, warnings.append)
    if checked.tracking_warning:
        warnings.append(checked.tracking_warning)
    for warning in warnings:
        print(f"gptdist | warning: {warning}", file=sys.stderr)
    # lazy, as above
    from gptdist.data.sources import resolve_sources

    for src in resolve_sources(cfg.data):  # what each source stands for: symlinks followed, duplicates removed
        what = f"{len(src.files)} file(s)"
        if src.hub is not None:
            revision = src.hub[3]
            what = f"`datasets` hub dataset {src.hub[0]} at revision {revision}" if revision else (
                f"`datasets` hub dataset {src.hub[0]}, not pinned: its newest version is read, and a resume may read "
                "another; set the source's revision: to a commit sha or tag")
        print(f"gptdist | {src.describe()}: {what}")
    print(f"gptdist: {args.config} is valid for {args.world} rank(s): {checked.layout.describe()}")
    return 0
