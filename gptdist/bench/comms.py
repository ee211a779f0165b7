"""The `bench parallel` tables: tokens/s per layout, ZeRO's communication volume, the pipeline's idle fraction.

Communication volume, in the ZeRO paper's units (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward
Training Trillion Parameter Models", section 7): per rank and optimizer step, with Ψ the parameter bytes, plain data
parallelism and ZeRO-1/2 move 2Ψ (a reduce-scatter of the gradients, Ψ, and an all-gather of the updated
parameters, Ψ), ZeRO-3 3Ψ (parameters all-gathered in forward and again in backward, gradients reduce-scattered).
The paper counts an all-reduce of Ψ as 2Ψ (reduce-scatter + all-gather), and leaves out the (n-1)/n factor of ring
collectives. DeepSpeed's comms logger records, per call, the size of the tensor argument as DeepSpeed 0.19 passes it:
the full buffer for all_reduce, reduce and reduce_scatter_tensor, this rank's shard for all_gather_into_tensor. So
each logged size becomes paper units by a factor per collective (PAPER_FACTOR; shard-sized ones times n).
"""

from __future__ import annotations

import statistics
from typing import Dict, List, Optional, Sequence

PAPER_FACTOR = {"all_reduce": 2.0, "reduce": 1.0, "reduce_scatter_tensor": 1.0, "reduce_scatter": 1.0,
                "broadcast": 1.0}
SHARD_SIZED = {"all_gather_into_tensor", "all_gather", "allgather_fn"}
EXPECTED = {1: 2.0, 2: 2.0, 3: 3.0}  # the paper's volume per rank per step, in Ψ


def _mb(n: float) -> str:
    return f"{n / 2**20:.2f}"


def throughput_table(results: Sequence) -> str:
    base = next((o.tokens_per_s for o in results if o.run.name == "1 rank" and o.tokens_per_s), None)
    lines = ["| layout | ranks | threads/rank | tokens/s | vs 1 rank | spread | note |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for o in results:
        ratio = f"{o.tokens_per_s / base:.2f}x" if base and o.tokens_per_s else ""
        rate = f"{o.tokens_per_s:,.0f}" if o.tokens_per_s else ""
        rates = getattr(o, "rates", [])
        spread = f"{(max(rates) - min(rates)) / o.tokens_per_s:.0%}" if len(rates) > 1 and o.tokens_per_s else ""
        default = "DeepSpeed's default use_multi_rank_bucket_allreduce=true" if o.run.ds_json else ""
        note = ("failed: " + o.error) if o.error else default
        lines.append(f"| {o.run.name} | {o.run.ranks} | {o.threads} | {rate} | {ratio} | {spread} | {note} |")
    return "\n".join(lines)


def volume_per_step(comms: Dict[str, Dict[str, int]], steps: int, dp: int) -> Dict[str, Dict[str, float]]:
    """op -> {calls, logged bytes, paper-unit bytes} per step, from a profile record's {op: {bytes: count}}."""
    out = {}
    for op, sizes in comms.items():
        calls = sum(sizes.values())
        logged = sum(int(size) * count for size, count in sizes.items())
        # calls moving at least 1 KiB: what the table lists (the per-step 4-byte flags would blur the sizes)
        big = {int(size): count for size, count in sizes.items() if int(size) >= 1024}
        factor = dp if op in SHARD_SIZED else PAPER_FACTOR.get(op, 1.0)
        out[op] = {"calls": calls / steps, "logged": logged / steps, "paper": logged * factor / steps,
                   "big_calls": sum(big.values()) / steps, "big_logged": sum(s * c for s, c in big.items()) / steps}
    return out


def comms_table(results: Sequence, psi_bytes: int, dp: int, steps: int, throughput: Sequence = ()) -> str:
    rates = {o.run.name: o.tokens_per_s for o in throughput}
    lines = [
        f"ZeRO communication per rank per optimizer step at dp={dp}, one micro-batch per rank per step, from "
        f"DeepSpeed's comms logger (rank 0); Ψ = parameter bytes = {_mb(psi_bytes)} MiB (fp32).",
        "",
        "| layout | collectives per step (calls x mean logged MiB, calls >= 1 KiB) | paper units | paper expects "
        "| wire MiB/rank (ring) | tokens/s (main run) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for o in results:
        rank0 = o.profile.get(0)
        if o.error or rank0 is None:
            lines.append(f"| {o.run.name} | failed: {o.error or 'no comms record from rank 0'} | | | | |")
            continue
        vol = volume_per_step(rank0["comms"], steps, dp)
        parts = [f"{op} {v['big_calls']:g} x {_mb(v['big_logged'] / v['big_calls'])}"
                 for op, v in sorted(vol.items(), key=lambda kv: -kv[1]["logged"]) if v["big_calls"]]
        paper = sum(v["paper"] for v in vol.values())
        stage = int(o.run.overrides[0].split("=")[1])
        rate = rates.get(o.run.name)
        lines.append(f"| {o.run.name} | {', '.join(parts)} | {paper / psi_bytes:.2f} Ψ | {EXPECTED[stage]:.0f} Ψ | "
                     f"{_mb(paper * (dp - 1) / dp)} | {f'{rate:,.0f}' if rate else ''} |")
    return "\n".join(lines)


def idle_fraction(steps: List[Dict[str, float]], skip: int = 2) -> Optional[float]:
    """1 - (forward + backward + batch loading) / (train_batch - optimizer step - gradient reductions): the share
    of the 1F1B schedule a stage spends waiting on its neighbours (send/recv block on CPU, so waiting shows there)."""
    values = []
    for s in steps[skip:] or steps:
        schedule = s["train_batch"] - sum(s.get(k, 0.0) for k in ("OptimizerStep", "ReduceGrads", "ReduceTiedGrads"))
        busy = sum(s.get(k, 0.0) for k in ("ForwardPass", "BackwardPass", "LoadMicroBatch"))
        if schedule > 0:
            values.append(1.0 - busy / schedule)
    return statistics.median(values) if values else None


def pipeline_table(pp_results: Sequence, measured: Sequence, micro: int, global_batch: int) -> str:
    lines = ["| layout | stages p | micro-batches m | (p-1)/(m+p-1) | measured idle, per stage | note |",
             "|---|---:|---:|---:|---|---|"]
    for o in pp_results:
        pp = 2
        tp = 2 if "tp2" in o.run.name else 1
        dp = o.run.ranks // (pp * tp)
        m = global_batch // (micro * dp)
        formula = (pp - 1) / (m + pp - 1)
        by_stage: Dict[int, List[float]] = {}
        for rec in o.profile.values():
            frac = idle_fraction(rec.get("pipe_steps") or [])
            if frac is not None and rec.get("stage") is not None:
                by_stage.setdefault(int(rec["stage"]), []).append(frac)
        shown = ", ".join(f"stage {s}: {statistics.mean(v):.0%}" for s, v in sorted(by_stage.items()))
        note = "failed: " + o.error if o.error else ("" if shown else "not measured (no pipeline timings)")
        if o.run.ranks > 4:
            note = note or "ranks oversubscribe the cores: waiting includes time-slicing"
        lines.append(f"| {o.run.name} | {pp} | {m} | {formula:.0%} | {shown} | {note} |")
    return "\n".join(lines)
