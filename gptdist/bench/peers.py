"""`gptdist bench peers [CONFIG]`: gptdist against what its users would otherwise run, in-training, side by side.

Three systems train the recipe's GPT shape with the same tokens per optimizer step (one micro-batch per rank) under
the deepspeed launcher, at world 1 and 2 with ZeRO 1 and 2:

* gptdist: `launch/train.sh CONFIG` with the recipe's default settings (its data, validation, memory report, MLflow);
  tokens/s from its metrics.jsonl;
* transformers' Trainer with a DeepSpeed ZeRO config (peer_runs/hf_trainer.py);
* DeepSpeed's getting-started loop around `deepspeed.initialize` (peer_runs/ds_loop.py).

The peers train transformers' GPT2LMHeadModel on random tokens. Every system's tokens/s is the median over windows
of 10 optimizer steps after step 10 (as gptdist's metrics.jsonl reports), and the runs are interleaved in rounds
(every system of every layout in round r before round r+1) so a busy spell on a shared machine hits all alike.
Every launch runs in a session of its own and a time-out kills the whole group: launcher and ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from gptdist.bench.in_training import step_windows
from gptdist.config import load_config
from gptdist.errors import UserError
from gptdist.machine import usable_cores

ROOT = Path(__file__).resolve().parents[2]
PEERS = Path(__file__).resolve().parent / "peer_runs"
SYSTEMS = ("gptdist", "hf-trainer", "ds-loop")
TITLES = {"gptdist": "gptdist train", "hf-trainer": "HF Trainer + DeepSpeed", "ds-loop": "deepspeed.initialize loop"}
LAYOUTS = ((1, 1), (1, 2), (2, 1), (2, 2))  # (world, ZeRO stage)
WINDOW, AFTER = 10, 10


@dataclass
class Cell:
    rates: List[float] = field(default_factory=list)  # one median per run
    error: Optional[str] = None

    @property
    def tokens_per_s(self) -> Optional[float]:
        return statistics.median(self.rates) if self.rates else None


def window_rates(step_ends: Sequence[float], tokens_per_step: int) -> List[float]:
    """tokens/s of each window of WINDOW steps after step AFTER, from the times at which steps ended."""
    rates = []
    for end in range(AFTER + WINDOW, len(step_ends) + 1, WINDOW):
        seconds = step_ends[end - 1] - step_ends[end - WINDOW - 1]
        rates.append(WINDOW * tokens_per_step / seconds)
    return rates


def _launch(cmd: List[str], env: Dict[str, str], log: Path, timeout: float) -> Optional[str]:
    """Run a launch in its own session; on time-out kill the whole group. None, or what went wrong."""
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return f"timed out after {timeout:.0f} s (log: {log})"
    return None


def run_one(system: str, world: int, zero: int, cfg, config: str, overrides: Sequence[str], steps: int,
            out: Path, timeout: float) -> List[float]:
    """One launch; returns its window rates (raises RuntimeError with the log's tail when it fails)."""
    folder = out / f"{system}-w{world}-z{zero}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(OMP_NUM_THREADS=str(max(1, usable_cores() // world)), DS_ACCELERATOR=env.get("DS_ACCELERATOR", "cpu")
               if not _has_gpu() else "cuda", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    m, t = cfg.model, cfg.train
    log = folder / "log.txt"
    if system == "gptdist":
        env["GPUS_PER_NODE"] = str(world)
        cmd = ["bash", str(ROOT / "launch" / "train.sh"), config, *overrides, "parallel.tp=1", "parallel.pp=1",
               f"parallel.zero_stage={zero}", f"train.global_batch_size={t.micro_batch_size * world}",
               f"train.steps={steps}", f"run.dir={folder / 'run'}", "resume=never"]
    else:
        script = PEERS / ("hf_trainer.py" if system == "hf-trainer" else "ds_loop.py")
        cmd = ["deepspeed", "--num_gpus", str(world), "--master_port", str(_free_port()), str(script),
               f"--n-layer={m.n_layer}", f"--n-head={m.n_head}", f"--d-model={m.d_model}",
               f"--vocab={m.vocab_size}", f"--seq={m.seq_len}", f"--micro-batch={t.micro_batch_size}",
               f"--steps={steps}", f"--zero={zero}", f"--warmup-steps={t.warmup_steps}", f"--lr={t.lr}",
               f"--min-lr={t.min_lr}", f"--weight-decay={t.weight_decay}", f"--beta1={t.beta1}",
               f"--beta2={t.beta2}", f"--eps={t.eps}", f"--clip={t.grad_clip}", f"--seed={t.seed}",
               f"--out={folder / 'steps.json'}"]
    problem = _launch(cmd, env, log, timeout)
    if problem is not None:
        raise RuntimeError(problem)
    if system == "gptdist":
        metrics = folder / "run" / "metrics.jsonl"
        if not (folder / "run" / "run_complete.json").exists() or not metrics.exists():
            raise RuntimeError(_tail(log))
        return step_windows(metrics)
    found = folder / "steps.json"
    if not found.exists():
        raise RuntimeError(_tail(log))
    record = json.loads(found.read_text())
    return window_rates(record["step_ends"], record["tokens_per_step"])


def _tail(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines()[-4:]
    return f"{' / '.join(lines)[-400:]} (log: {log})"


def _has_gpu() -> bool:
    # torch: only to ask for a GPU; `gptdist bench peers` starts without it
    import torch

    return torch.cuda.is_available()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def format_peers(cells: Dict[tuple, Cell], layouts: Sequence[tuple] = LAYOUTS) -> str:
    head = ["world", "ZeRO", *(TITLES[s] + " tokens/s" for s in SYSTEMS), "gptdist vs HF Trainer",
            "gptdist vs deepspeed loop"]
    out = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for world, zero in layouts:
        rates = {s: cells[(s, world, zero)].tokens_per_s for s in SYSTEMS}
        row = [str(world), str(zero)]
        for s in SYSTEMS:
            cell = cells[(s, world, zero)]
            row.append(f"{rates[s]:,.0f}" if rates[s] else "failed" if cell.error else "not run")
        for peer in ("hf-trainer", "ds-loop"):
            ok = rates["gptdist"] and rates[peer]
            row.append(f"{rates['gptdist'] / rates[peer]:.2f}x" if ok else "")
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


def run_bench_peers(args: argparse.Namespace) -> int:
    if not (ROOT / "launch" / "train.sh").exists():
        raise UserError("bench peers needs a source checkout of gptdist (it runs launch/train.sh)")
    if shutil.which("deepspeed") is None:
        raise UserError("bench peers needs the `deepspeed` launcher on PATH (pip install deepspeed)")
    if args.steps < AFTER + WINDOW or args.repeats < 1:
        raise UserError(f"--steps must be at least {AFTER + WINDOW} (windows of {WINDOW} after step {AFTER}), "
                        "--repeats at least 1")
    config = str(Path(args.config).resolve())
    cfg = load_config(config, list(args.overrides))  # refuses bad overrides before any launch
    wanted = [(w, z) for w, z in LAYOUTS if not args.layouts or f"w{w}z{z}" in args.layouts.split(",")]
    systems = [s for s in SYSTEMS if s not in (args.skip or [])]
    cells = {(s, w, z): Cell() for s in SYSTEMS for w, z in LAYOUTS}
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gptdist-bench-peers-"))
    try:
        for r in range(args.repeats):
            for world, zero in wanted:
                for system in systems[r % len(systems):] + systems[: r % len(systems)]:
                    cell = cells[(system, world, zero)]
                    if cell.error:
                        continue
                    print(f"bench | round {r + 1}/{args.repeats}: {system}, world {world}, ZeRO {zero}",
                          file=sys.stderr, flush=True)
                    try:
                        rates = run_one(system, world, zero, cfg, config, args.overrides, args.steps, out,
                                        args.timeout)
                    except RuntimeError as exc:
                        cell.error = str(exc)
                        continue
                    if rates:
                        cell.rates.append(statistics.median(rates))
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    m, t = cfg.model, cfg.train
    print(f"gptdist bench peers: {args.config} {' '.join(args.overrides)}".rstrip())
    print(f"model: {m.n_layer} layers, d_model {m.d_model}, {m.n_head} heads, vocab {m.vocab_size}, seq {m.seq_len}; "
          f"micro-batch {t.micro_batch_size} per rank, one per optimizer step; {args.steps} steps per run, tokens/s "
          f"the median of {WINDOW}-step windows after step {AFTER}, median of {args.repeats} interleaved run(s); "
          f"{usable_cores()} CPU cores, OMP threads per rank = cores / ranks")
    print()
    print(format_peers(cells, wanted))
    failed = [(k, c) for k, c in cells.items() if c.error and k[0] in systems and (k[1], k[2]) in wanted]
    for (system, world, zero), cell in failed:
        print(f"\n{system} world {world} ZeRO {zero} failed: {cell.error}", file=sys.stderr)
    return 1 if failed else 0
