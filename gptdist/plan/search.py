"""Every layout a run could use on N devices, each predicted, and the one to recommend.

A candidate is (tp, pp, dp, zero_stage, micro_batch_size, activation_checkpointing) with the recipe's global batch
and model. Candidates that DeepSpeed or gptdist would refuse are never listed: tp must divide the heads, the
vocabulary and the MLP width and stay inside one node; pp at most the layers; ZeRO 2/3 only without a pipeline;
ZeRO > 0 only with dp > 1 (at dp = 1 it partitions nothing and adds a master copy); micro x dp must divide the
global batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from gptdist.engine.ds_config import zero_buffers
from gptdist.model import flops_per_token
from gptdist.model.config import GPTConfig
from gptdist.parallel.layout import Layout
from gptdist.plan.hardware import Hardware
from gptdist.plan.memory_model import RankMemory, chunk_rows_for, predict_rank
from gptdist.plan.shapes import rank_params
from gptdist.plan.timing import StepTime, step_time


@dataclass
class Plan:
    layout: Layout
    ranks: List[RankMemory]  # one per (pipeline stage, data-parallel rank); tensor-parallel ranks hold the same
    time: StepTime
    hardware: Hardware
    headroom: float
    tokens_per_step: int
    flops_per_step: float
    recommended: bool = False
    reason: str = ""
    notes: Dict[str, str] = field(default_factory=dict)

    @property
    def largest(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.peak)

    @property
    def model_state_bytes(self) -> int:
        return max(r.model_state_bytes for r in self.ranks)

    @property
    def peak_bytes(self) -> int:
        return self.largest.peak

    @property
    def required_bytes(self) -> int:
        """Peak live tensors, plus allocator slack, plus the runtime allowance: what the device must hold."""
        return int(self.peak_bytes * (1 + self.hardware.fragmentation)) + self.hardware.runtime_bytes

    @property
    def fits(self) -> bool:
        return self.required_bytes <= self.hardware.memory_bytes * (1 - self.headroom)

    @property
    def snapshot_bytes(self) -> int:
        """Host memory of the largest rank's checkpoint snapshot (checkpoint.async): the fp32 weight and two Adam
        moments of what its optimizer owns, 12 bytes each; at ZeRO-0 a data-parallel rank owns 1/dp of the
        parameters it holds (checkpoint/fragments.py)."""
        owned = max(r.model_states.get("optimizer", 0) for r in self.ranks) // 8
        if self.layout.zero_stage == 0:
            owned = -(-owned // self.layout.dp)
        return 12 * owned

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.time.total

    @property
    def mfu(self) -> float:
        world = self.layout.world_size
        return self.flops_per_step / self.time.total / (world * self.hardware.peak_flops)

    def to_json(self) -> dict:
        lay = self.layout
        big = self.largest
        return {
            "tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "zero_stage": lay.zero_stage,
            "micro_batch_size": lay.micro_batch_size, "grad_accum": lay.grad_accum,
            "activation_checkpointing": lay.activation_checkpointing,
            "model_state_bytes": self.model_state_bytes, "peak_bytes": self.peak_bytes,
            "required_bytes": self.required_bytes, "device_memory_bytes": self.hardware.memory_bytes,
            "checkpoint_snapshot_host_bytes": self.snapshot_bytes,
            "peak_stage": big.stage, "peak_phase": big.peak_phase,
            "model_states_by_kind": max(self.ranks, key=lambda r: r.model_state_bytes).model_states,
            "step_time_s": self.time.total, "step_time_parts_s": self.time.parts,
            "tokens_per_s": self.tokens_per_s, "mfu": self.mfu, "fits": self.fits,
            "recommended": self.recommended, "reason": self.reason,
            "hardware": self.hardware.name, "checked_on_hardware": self.hardware.checked,
            "ranks": [{"stage": r.stage, "dp_rank": r.dp_rank, "model_state_bytes": r.model_state_bytes,
                       "peak_bytes": r.peak, "peak_phase": r.peak_phase, "phases": r.phases} for r in self.ranks],
        }


def divisors(n: int) -> List[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def candidates(cfg: GPTConfig, world: int, global_batch: int, gpus_per_node: int,
               micro_sizes: Optional[List[int]] = None, zero_stages=(0, 1, 2, 3),
               checkpointing=(False, True)) -> List[Layout]:
    out = []
    for tp in divisors(world):
        if tp > gpus_per_node or cfg.n_head % tp or cfg.vocab_size % tp or cfg.ffn_dim % tp:
            continue
        for pp in divisors(world // tp):
            if pp > cfg.n_layer:
                continue
            dp = world // (tp * pp)
            for z in zero_stages:
                if (pp > 1 and z > 1) or (dp == 1 and z > 0):
                    continue
                for mb in micro_sizes or divisors(global_batch):
                    if global_batch % (mb * dp):
                        continue
                    for ac in checkpointing:
                        out.append(Layout(tp, pp, dp, z, mb, global_batch // (mb * dp), ac))
    return out


def evaluate(cfg: GPTConfig, layout: Layout, hw: Hardware, gpus_per_node: int, headroom: float,
             global_batch: int) -> Plan:
    buffers = zero_buffers(cfg, layout.tp) if layout.zero_stage else {}
    chunk = chunk_rows_for(cfg)
    stages = [rank_params(cfg, layout.tp, layout.pp, s) for s in range(layout.pp)]
    # ZeRO-1/2 ranks differ by the parameters that straddle their partitions' edges; otherwise one is enough.
    dp_ranks = range(layout.dp) if layout.zero_stage in (1, 2) else range(1)
    ranks = [predict_rank(cfg, rp, layout, hw.precision, buffers, chunk, r) for rp in stages for r in dp_ranks]
    time = step_time(cfg, layout, stages, hw, gpus_per_node)
    tokens = global_batch * cfg.seq_len
    flops = tokens * flops_per_token(cfg) * (4 / 3 if layout.activation_checkpointing else 1)
    return Plan(layout, ranks, time, hw, headroom, tokens, flops)


def search(cfg: GPTConfig, world: int, global_batch: int, hw: Hardware, gpus_per_node: int,
           headroom: float = 0.1, **limits) -> List[Plan]:
    """Every candidate, predicted, fitting ones first by step time; the first fitting one is recommended."""
    plans = [evaluate(cfg, lay, hw, gpus_per_node, headroom, global_batch)
             for lay in candidates(cfg, world, global_batch, gpus_per_node, **limits)]
    plans.sort(key=lambda p: (not p.fits, p.time.total, p.peak_bytes))
    fitting = [p for p in plans if p.fits]
    if fitting:
        best = fitting[0]
        best.recommended = True
        best.reason = _reason(best, fitting, plans)
    return plans


def _reason(best: Plan, fitting: List[Plan], plans: List[Plan]) -> str:
    lay = best.layout
    parts = [f"fastest predicted step ({best.time.total:.3g} s, {best.tokens_per_s:,.0f} tokens/s) of the "
             f"{len(fitting)} of {len(plans)} layouts that fit in {best.hardware.memory_bytes / 2**30:.0f} GiB with "
             f"{best.headroom:.0%} headroom"]
    runner = next((p for p in fitting[1:] if p.layout.key()[:4] != lay.key()[:4]), None)
    if runner is not None:
        r = runner.layout
        parts.append(f"next other layout tp{r.tp} pp{r.pp} dp{r.dp} zero{r.zero_stage} is "
                     f"{runner.time.total / best.time.total:.2f}x slower")
    parts.append(f"peak {best.peak_bytes / 2**30:.1f} GiB of live tensors on stage {best.largest.stage} "
                 f"({best.largest.peak_phase}); most time in {best.time.main_cost()}")
    return "; ".join(parts)
