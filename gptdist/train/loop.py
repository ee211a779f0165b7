"""One rank of a training run, from validated config to the completion record.

    config -> layout and data checks (no process group yet) -> process group -> model -> DeepSpeed engine
      -> loop over optimizer steps (micro-batches from the streaming loader) -> metrics, MLflow, checkpoints
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List

import torch

from gptdist.config import RunConfig, dump_config
from gptdist.model import count_parameters, flops_per_token
from gptdist.parallel.layout import Layout
from gptdist.train import runtime
from gptdist.train.metrics import MetricsLog, peak_flops

COMPLETE_FILE = "run_complete.json"


def train(cfg: RunConfig) -> int:
    place = runtime.discover_place()
    # Everything that can be refused is refused here, before any rank waits on another.
    layout = Layout.resolve(cfg, place.world_size)
    if layout.tp > 1 or layout.pp > 1:
        from gptdist.errors import UserError

        raise UserError("layout error: parallel.tp and parallel.pp > 1 need the tensor/pipeline-parallel engine, "
                        "which this version of gptdist does not include yet; use parallel.tp=1 parallel.pp=1")
    from gptdist.data import build_train_loader, check_data

    tokenizer = check_data(cfg.data, cfg.model.vocab_size)
    device_type = runtime.prepare_process(place)
    from gptdist.train.ds_config import resolve_precision

    precision = resolve_precision(cfg, device_type)
    if not place.is_main:
        warnings.filterwarnings("ignore")
    # torch.distributed's deprecation notices are about DeepSpeed's calls, not anything a user can act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")

    runtime.init_process_group(device_type, timeout_s=600)
    from gptdist.train.checkpoint import save_checkpoint
    from gptdist.train.engine import build_engine, build_model, quiet_deepspeed
    from gptdist.train.tracking import NullTracker, start_tracker, flatten

    quiet_deepspeed(place.is_main)
    run_dir = Path(cfg.run.dir)
    log = _RankZeroLog(place.is_main)
    tracker = NullTracker()
    metrics = None
    if place.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
        metrics = MetricsLog(run_dir / "metrics.jsonl")
        tracker = start_tracker(cfg.tracking, run_dir, cfg.run.name or run_dir.name, flatten(cfg.to_dict()))
        tracker.log_artifact(run_dir / "config.yaml")

    model = build_model(cfg)
    engine = build_engine(cfg, layout, model, device_type, precision)
    device = engine.device
    dp_rank = place.rank  # tp = pp = 1: every rank is its own data-parallel replica

    n_params = count_parameters(cfg.model)
    fpt = flops_per_token(cfg.model)
    peak = peak_flops(cfg.train.peak_flops, device_type, precision)
    tokens_per_step = layout.global_batch_size * cfg.model.seq_len
    log.info(f"gptdist | {n_params / 1e6:.2f} M parameters | {layout.describe()} | {precision} on {device_type}")
    log.info(f"gptdist | run dir {run_dir} | {tokens_per_step} tokens/step | tracking run {tracker.run_id}")

    loader = build_train_loader(
        cfg.data, seq_len=cfg.model.seq_len, micro_batch_size=layout.micro_batch_size,
        dp_rank=dp_rank, dp_size=layout.dp, seed=cfg.train.seed, state=None,
    )
    batches = iter(loader)
    start_step, steps = 0, cfg.train.steps
    progress = _progress(place.is_main, start_step, steps)
    pending: List[Dict[str, Any]] = []
    window_start = time.perf_counter()
    data_state: Dict[str, Any] = {}

    def flush() -> None:
        nonlocal window_start
        if not pending:
            return
        losses = torch.stack([p["loss"] for p in pending]).float()
        # One collective per window, not per step: the mean over data-parallel replicas.
        torch.distributed.all_reduce(losses, op=torch.distributed.ReduceOp.SUM)
        losses = (losses / layout.dp).tolist()
        elapsed = (time.perf_counter() - window_start) / len(pending)
        window_start = time.perf_counter()
        tokens_per_s = tokens_per_step / elapsed
        mfu = tokens_per_s / place.world_size * fpt / peak
        records = []
        for item, loss in zip(pending, losses):
            norm = item["grad_norm"]
            records.append({
                "step": item["step"], "loss": loss, "lr": item["lr"],
                "grad_norm": float(norm) if norm is not None else None,
                "tokens": item["step"] * tokens_per_step, "samples": item["step"] * layout.global_batch_size,
                "tokens_per_s": tokens_per_s, "step_time_s": elapsed, "mfu": mfu,
            })
        pending.clear()
        if metrics is not None:
            metrics.write(records)
            tracker.log_metrics(records)
            progress.set_postfix(loss=f"{records[-1]['loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}", mfu=f"{mfu:.1%}")

    def client_state(step: int) -> Dict[str, Any]:
        return {
            "step": step, "data_state": data_state, "config": cfg.to_dict(), "config_digest": cfg.digest(),
            "tokenizer": tokenizer.identity, "mlflow_run_id": tracker.run_id, "layout": layout.__dict__,
        }

    model.train()
    for step in range(start_step, steps):
        step_loss = torch.zeros((), device=device)
        lr = engine.get_lr()[0]  # the rate this step uses; the scheduler advances inside the last engine.step()
        for _ in range(layout.grad_accum):
            batch = next(batches)
            loss = engine(batch.inputs.to(device, non_blocking=True), batch.targets.to(device, non_blocking=True))
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach().float()
            data_state = batch.state
        done = step + 1
        pending.append({
            "step": done, "loss": step_loss / layout.grad_accum,
            "lr": lr, "grad_norm": engine.get_global_grad_norm(),
        })
        progress.update(1)
        last = done == steps
        if done % cfg.train.log_every == 0 or last:
            flush()
        if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or (last and cfg.checkpoint.at_end):
            flush()
            save_checkpoint(engine, run_dir, done, client_state(done))

    progress.close()
    loader.close()
    if place.is_main:
        metrics.close()
        (run_dir / COMPLETE_FILE).write_text(json.dumps({"steps": steps, "mlflow_run_id": tracker.run_id}) + "\n")
        tracker.finish("FINISHED")
        log.info(f"gptdist | finished {steps} steps; metrics in {run_dir / 'metrics.jsonl'}")
    torch.distributed.barrier()
    return 0


class _RankZeroLog:
    def __init__(self, is_main: bool):
        self.is_main = is_main

    def info(self, message: str) -> None:
        if self.is_main:
            print(message, file=sys.stderr, flush=True)


def _progress(is_main: bool, start: int, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not is_main, unit="step", dynamic_ncols=True,
                mininterval=1.0 if sys.stderr.isatty() else 30.0, file=sys.stderr)
