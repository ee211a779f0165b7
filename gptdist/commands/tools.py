"""The command line of gptdist.tools: export, import-hf, generate, eval and compare-loss (gptdist/tools/__init__.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gptdist.errors import UserError

CKPT_HELP = "a run directory (its newest complete checkpoint), its checkpoints/ folder, or one step_* checkpoint"
TOK_HELP = "the training tokenizer, when the checkpoint's data.tokenizer path does not resolve from here"


def register_tool_commands(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="write a checkpoint as a transformers GPT-2 directory",
                            description="Write CHECKPOINT as a directory GPT2LMHeadModel.from_pretrained loads "
                                        "(config.json, model.safetensors) with its tokenizer files.")
    export.add_argument("checkpoint", help=CKPT_HELP)
    export.add_argument("--hf", required=True, metavar="OUT_DIR", help="directory to write (new or empty)")
    export.add_argument("--force", action="store_true", help="replace what OUT_DIR holds")
    export.add_argument("--tokenizer", help=TOK_HELP)
    export.set_defaults(func=_run_export)

    imp = sub.add_parser("import-hf", help="turn a local GPT-2 directory into a checkpoint training resumes from",
                         description="Read HF_DIR (config.json + model.safetensors or pytorch_model.bin; nothing is "
                                     "downloaded) and write a step-0 checkpoint for `gptdist train CONFIG resume=OUT`.")
    _import_options(imp)
    # argparse cannot take positionals on both sides of options (HF_DIR --out X key=value): everything from
    # HF_DIR on is collected here and parsed again, intermixed, in _run_import.
    imp.add_argument("rest", nargs=argparse.REMAINDER, metavar="HF_DIR [key=value ...]",
                     help="a local transformers GPT-2 directory, then run-config overrides")
    imp.set_defaults(func=_run_import)

    gen = sub.add_parser("generate", help="continue a prompt with a checkpoint's model",
                         description="KV-cache decoding, greedy unless a sampling option is given; stops at EOS.")
    gen.add_argument("checkpoint", help=CKPT_HELP)
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text ('' starts from end-of-text)")
    prompt.add_argument("--prompt-file", type=Path, help="read the prompt from a UTF-8 file")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    gen.add_argument("--sample", action="store_true", help="sample from softmax(logits / temperature)")
    gen.add_argument("--temperature", type=float, help="sampling temperature (implies --sample)")
    gen.add_argument("--top-k", type=int, help="sample among the k most likely tokens (implies --sample)")
    gen.add_argument("--top-p", type=float, help="nucleus sampling mass (implies --sample)")
    gen.add_argument("--seed", type=int, help="seed of the sampling generator (reproducible samples)")
    gen.add_argument("--json", action="store_true", help='one JSON object: {"prompt_ids", "ids", "text"}')
    gen.add_argument("--tokenizer", help=TOK_HELP)
    gen.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    gen.set_defaults(func=_run_generate)

    ev = sub.add_parser("eval", help="mean loss and perplexity of a checkpoint on held-out text",
                        description="One pass over SOURCE in source order, packed in seq_len+1 windows.")
    ev.add_argument("checkpoint", help=CKPT_HELP)
    ev.add_argument("--data", required=True, metavar="SOURCE", help="file, glob, folder or pkg://package/glob")
    ev.add_argument("--max-samples", type=int, help="stop after N windows (default: the whole source)")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--text-field", help="JSONL/Parquet text column (default: the training run's)")
    ev.add_argument("--text-split", choices=["document", "paragraph", "line"],
                    help="how text files are cut into documents (default: the training run's)")
    ev.add_argument("--json", action="store_true", help='one JSON object: {"loss", "perplexity", "samples", "tokens"}')
    ev.add_argument("--tokenizer", help=TOK_HELP)
    ev.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    ev.set_defaults(func=_run_eval)


def _import_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="a run directory (writes checkpoints/step_00000000) or a step_XXXXXXXX folder "
                                      "(required)")
    parser.add_argument("--config", help="the YAML recipe the checkpoint will be trained with (model.* comes from "
                                         "HF_DIR; shapes the recipe states must agree)")
    parser.add_argument("--force", action="store_true", help="replace an existing checkpoint folder")


def _run_export(args: argparse.Namespace) -> int:
    # lazy: a command's modules load only when it runs, so the CLI starts fast
    from gptdist.tools.export_hf import export_hf
    from gptdist.tools.resolve import open_checkpoint

    ckpt = open_checkpoint(args.checkpoint)
    out = export_hf(ckpt, Path(args.hf), force=args.force, tokenizer_spec=args.tokenizer)
    print(f"gptdist: exported {ckpt.folder} (step {ckpt.step}) to {out}")
    return 0


def _run_import(args: argparse.Namespace) -> int:
    # lazy: a command's modules load only when it runs, so the CLI starts fast
    from gptdist.tools.import_hf import import_hf, summary

    inner = argparse.ArgumentParser(prog="gptdist import-hf")
    _import_options(inner)
    inner.add_argument("hf_dir")
    inner.add_argument("overrides", nargs="*", metavar="key=value")
    rest = inner.parse_intermixed_args(args.rest)
    out = rest.out or args.out
    if out is None:
        raise UserError("import-hf needs --out: a run directory or a step_XXXXXXXX checkpoint folder to write")
    folder = import_hf(Path(rest.hf_dir), Path(out), rest.config or args.config, rest.overrides,
                       force=rest.force or args.force)
    print("\n".join(summary(folder)))
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    # lazy: a command's modules load only when it runs, so the CLI starts fast
    from gptdist.tools.generate_text import Sampling, generate_text
    from gptdist.tools.resolve import open_checkpoint

    sampling_opts = args.temperature is not None or args.top_k is not None or args.top_p is not None
    if args.greedy and (args.sample or sampling_opts):
        raise UserError("--greedy cannot be combined with --sample, --temperature, --top-k or --top-p")
    if args.prompt_file is not None:
        try:
            prompt = args.prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"--prompt-file {args.prompt_file}: cannot be read as UTF-8 text ({exc})") from None
    else:
        prompt = args.prompt
    sampling = Sampling(greedy=not (args.sample or sampling_opts),
                        temperature=1.0 if args.temperature is None else args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    ckpt = open_checkpoint(args.checkpoint)
    result = generate_text(ckpt, prompt, args.max_new_tokens, sampling, args.tokenizer, args.device)
    if args.json:
        print(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        sys.stdout.write(prompt + result.text + "\n")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    # lazy: a command's modules load only when it runs, so the CLI starts fast
    from gptdist.tools.evaluate import evaluate
    from gptdist.tools.resolve import open_checkpoint

    ckpt = open_checkpoint(args.checkpoint)
    result = evaluate(ckpt, args.data, max_samples=args.max_samples, batch_size=args.batch_size,
                      tokenizer_spec=args.tokenizer, text_field=args.text_field, text_split=args.text_split,
                      device=args.device)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(f"gptdist: {ckpt.folder} (step {ckpt.step}) on {args.data}: loss {result.loss:.4f}, "
              f"perplexity {result.perplexity:.2f} over {result.samples} samples ({result.tokens} tokens)")
    return 0


def register_compare_command(sub: argparse._SubParsersAction) -> None:
    cmd = sub.add_parser("compare-loss", help="compare two runs' per-step losses",
                         description="Exit 0 if every common step's losses agree within --rtol, else 1.")
    cmd.add_argument("run_a")
    cmd.add_argument("run_b")
    cmd.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance per step (default 1e-4)")
    cmd.add_argument("--steps", type=str, default=None, help="only steps FIRST:LAST (inclusive)")
    cmd.set_defaults(func=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    # lazy: a command's modules load only when it runs, so the CLI starts fast
    from gptdist.tools.compare_loss import compare, load_losses

    a, b = load_losses(args.run_a), load_losses(args.run_b)
    if args.steps:
        first, _, last = args.steps.partition(":")
        keep = range(int(first or 0), int(last or 10**12) + 1)
        a = {s: v for s, v in a.items() if s in keep}
        b = {s: v for s, v in b.items() if s in keep}
    rows, ok = compare(a, b, args.rtol)
    if not rows:
        print("compare-loss: the runs have no step in common")
        return 1
    missing = sorted(set(a) ^ set(b))
    print(f"{'step':>6} {'loss A':>14} {'loss B':>14} {'rel diff':>10}")
    for step, x, y, rel in rows:
        flag = "" if rel <= args.rtol else "  <-- over rtol"
        print(f"{step:>6} {x:>14.8f} {y:>14.8f} {rel:>10.2e}{flag}")
    worst = max(rel for *_, rel in rows)
    if missing:
        print(f"steps in only one run: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    verdict = "MATCH" if ok and not missing else "MISMATCH"
    print(f"{verdict}: {len(rows)} common steps, max relative difference {worst:.2e} (rtol {args.rtol:g})")
    return 0 if verdict == "MATCH" else 1
