"""The tables `gptdist plan` prints: every layout predicted, and predicted against measured."""

from __future__ import annotations

from typing import List, Sequence, Tuple

from gptdist.model import count_parameters

GiB = 2**30


def _g(n) -> str:
    return "" if n is None else f"{n / GiB:.2f}"


def _name(lay) -> str:
    return (f"tp{lay.tp} pp{lay.pp} dp{lay.dp} zero{lay.zero_stage} micro {lay.micro_batch_size}"
            + (" ckpt" if lay.activation_checkpointing else ""))


def plan_table(cfg, args, hw, per_node: int, global_batch: int, plans: Sequence) -> str:
    m = cfg.model
    lines = [
        f"gptdist plan: {args.config}: {count_parameters(m) / 1e9:.3g} B parameters ({m.n_layer} layers, d_model "
        f"{m.d_model}, vocab {m.vocab_size}, seq {m.seq_len}); global batch {global_batch} sequences; "
        f"{args.gpus} x {hw.name}, {per_node} per node, {hw.precision}; {len(plans)} valid layouts, "
        f"{sum(p.fits for p in plans)} fit",
        f"memory per rank (the largest rank): model states and peak live tensors predicted from the shapes; required "
        f"= peak x {1 + hw.fragmentation:.2f} (allocator) + {hw.runtime_bytes / GiB:.2f} GiB runtime; fits: required "
        f"<= {1 - args.headroom:.0%} of {hw.memory_bytes / GiB:.0f} GiB",
    ]
    if not hw.checked:
        lines.append(f"note: predictions for {hw.name} come from datasheet figures and DeepSpeed's source and have "
                     "not yet been checked against a run on that GPU (the CPU figures have: docs/performance.md)")
    lines += ["",
              "| layout | accum | model states GiB | peak GiB | required GiB | fits | step s | tokens/s | MFU "
              "| most time |",
              "|---|---:|---:|---:|---:|:---:|---:|---:|---:|---|"]
    for p in plans[: args.top]:
        mark = " **recommended**" if p.recommended else ""
        lines.append(
            f"| {_name(p.layout)}{mark} | {p.layout.grad_accum} | {_g(p.model_state_bytes)} | {_g(p.peak_bytes)} | "
            f"{_g(p.required_bytes)} | {'yes' if p.fits else 'no'} | {p.time.total:.3g} | {p.tokens_per_s:,.0f} | "
            f"{p.mfu:.0%} | {p.time.main_cost()} |")
    if len(plans) > args.top:
        lines.append(f"({len(plans) - args.top} more layouts: --top N or --json)")
    best = next((p for p in plans if p.recommended), None)
    lines.append("")
    if best is None:
        smallest = min(plans, key=lambda p: p.required_bytes)
        lines.append(f"no layout fits: the smallest needs {_g(smallest.required_bytes)} GiB per device "
                     f"({_name(smallest.layout)}); use more devices, activation checkpointing or a smaller micro-batch")
    else:
        lines.append(f"recommended: {_name(best.layout)} (accumulation {best.layout.grad_accum}): {best.reason}")
        lay = best.layout
        lines.append(f"  run it with: parallel.tp={lay.tp} parallel.pp={lay.pp} parallel.zero_stage={lay.zero_stage} "
                     f"train.micro_batch_size={lay.micro_batch_size} train.global_batch_size={global_batch}"
                     + (" parallel.activation_checkpointing=true" if lay.activation_checkpointing else ""))
        lines.append(f"  checkpoints: {12 * count_parameters(m) / 1e9:.3g} GB on disk each (12 bytes per parameter); "
                     f"the background save's snapshot takes {_g(best.snapshot_bytes)} GiB of host memory per rank")
    return "\n".join(lines)


def measured_table(results: List[Tuple]) -> str:
    lines = ["predicted against measured on this machine (largest rank; measured peak live tensor bytes from the "
             "memory report, peak RSS from /proc/PID/status; step time: median after the first step)", "",
             "| layout | model states GiB pred / meas | peak GiB pred / meas | peak RSS GiB | step s pred / meas "
             "| note |",
             "|---|---|---|---:|---|---|"]
    for plan, m in results:
        reports = list(m.reports.values())
        states = max((r.get("model_state_bytes") or 0 for r in reports), default=None)
        peak = max((r.get("peak_live_bytes") or 0 for r in reports), default=None)
        rss = max(m.vm_hwm.values(), default=None)
        step = m.step_time()
        note = m.error if not m.ok else ""
        lines.append(f"| {_name(plan.layout)} | {_g(plan.model_state_bytes)} / {_g(states)} | "
                     f"{_g(plan.peak_bytes)} / {_g(peak)} | {_g(rss)} | {plan.time.total:.3g} / "
                     f"{'' if step is None else f'{step:.3g}'} | {note} |")
    return "\n".join(lines)
