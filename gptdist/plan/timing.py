"""Step time of a layout, predicted: compute at a declared (GPU) or measured (CPU) matmul rate, plus the
communication each kind of parallelism adds, from the hardware's bandwidths.

    compute per micro-batch on stage s   tokens x (6 x block params x blocks_s + 12 x d x T x blocks_s
                                         [+ 6 x V x d on the last stage]) / tp, at peak x efficiency;
                                         activation checkpointing adds one more forward (8 instead of 6);
                                         plus a fixed cost per micro-batch (Python and DeepSpeed's per
                                         micro-step work: declared 5 ms on GPUs, 0.1 s on the CPU)
    tensor parallel                      4 all-reduces of n x d per block per micro-batch (2 forward,
                                         2 backward) and 2 for the embedding and head; ring all-reduce of B
                                         bytes over t ranks = 2(t-1)/t x B / bandwidth + 2(t-1) x latency
    pipeline (1F1B)                      (m + p - 1) x the slowest stage's micro-batch time (forward,
                                         backward, its TP all-reduces and its two activation sends)
    data parallel, per optimizer step    ZeRO-0 all-reduces the gradients (2(d-1)/d x Ψ); ZeRO-1/2 reduce
                                         them to their owners and all-gather the updated parameters
                                         (2(d-1)/d x Ψ; ZeRO-2 reduces every micro-batch); ZeRO-3 all-gathers
                                         parameters in forward and backward and reduce-scatters gradients,
                                         every micro-batch (3m(d-1)/d x Ψ). Ψ = this rank's parameter bytes.
    optimizer                            Adam reads and writes ~16 bytes per updated element, at the
                                         device's memory bandwidth

Communication is counted as exposed (not overlapped with compute), an upper bound: DeepSpeed overlaps some of it
(ZeRO-3 prefetch, ZeRO-2 with overlap_comm), which gptdist does not switch on by default. Bandwidths: inside a
node when the group's ranks fit in one node (tensor-parallel ranks are adjacent, then data-parallel), else across
nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

from gptdist.engine.ds_config import block_numel
from gptdist.model.config import GPTConfig
from gptdist.parallel.layout import Layout
from gptdist.plan.hardware import Hardware
from gptdist.plan.shapes import RankParams

MEMORY_BANDWIDTH = {"H100 SXM 80GB": 3.35e12, "H200 SXM 141GB": 4.8e12, "A100 SXM 80GB": 2.0e12,
                    "A100 SXM 40GB": 1.55e12}
CPU_MEMORY_BANDWIDTH = 8e9  # per rank, bytes/s: what one core's Adam update reaches on the CI machines


@dataclass
class StepTime:
    total: float
    parts: Dict[str, float]

    def main_cost(self) -> str:
        return max(self.parts, key=self.parts.get)


def _all_reduce(nbytes: float, ranks: int, gbps: float, latency: float) -> float:
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / (gbps * 1e9) + 2 * (ranks - 1) * latency


def _one_way(nbytes: float, ranks: int, gbps: float, latency: float) -> float:
    """Reduce-scatter, all-gather or reduce: (n-1)/n of the bytes."""
    if ranks <= 1:
        return 0.0
    return (ranks - 1) / ranks * nbytes / (gbps * 1e9) + (ranks - 1) * latency


def step_time(cfg: GPTConfig, layout: Layout, stages: List[RankParams], hw: Hardware, gpus_per_node: int) -> StepTime:
    tp, pp, dp, m = layout.tp, layout.pp, layout.dp, layout.grad_accum
    e = 2 if hw.precision in ("bf16", "fp16") else 4
    n = layout.micro_batch_size * cfg.seq_len  # tokens per micro-batch
    d, V, T = cfg.d_model, cfg.vocab_size, cfg.seq_len
    rate = hw.peak_flops * hw.matmul_efficiency
    factor = 8 if layout.activation_checkpointing else 6
    block = block_numel(cfg, 1)
    intra = lambda ranks: ranks <= gpus_per_node  # noqa: E731 - adjacent ranks share a node
    tp_bw = hw.intra_node_gbps if intra(tp) else hw.inter_node_gbps
    dp_bw = hw.intra_node_gbps if intra(tp * dp) else hw.inter_node_gbps
    pp_bw = hw.intra_node_gbps if intra(tp * dp * pp) else hw.inter_node_gbps

    per_stage = []
    for rp in stages:
        flops = n * len(rp.blocks) * (factor * block + factor * 2 * d * T)
        if rp.last:
            flops += n * 6 * V * d
        compute = flops / tp / rate + hw.micro_step_s
        allreduces = 4 * len(rp.blocks) + (1 if rp.first else 0) + (1 if rp.last else 0)
        tp_comm = allreduces * _all_reduce(n * d * e, tp, tp_bw, hw.latency_s)
        sends = (0 if rp.first else 1) + (0 if rp.last else 1)  # activations in, gradients out, per direction
        p2p = sends * (n * d * e / (pp_bw * 1e9) + hw.latency_s) if pp > 1 else 0.0
        per_stage.append((compute, tp_comm, p2p))
    slowest = max(per_stage, key=sum)
    slots = m + pp - 1 if pp > 1 else m
    compute = slots * slowest[0]
    tp_comm = slots * slowest[1]
    p2p = slots * slowest[2]

    psi = max(rp.numel for rp in stages) * e  # the largest stage's parameter bytes per rank
    z = layout.zero_stage
    if z == 0:
        dp_comm = _all_reduce(psi, dp, dp_bw, hw.latency_s)
    elif z == 1:
        dp_comm = 2 * _one_way(psi, dp, dp_bw, hw.latency_s)
    elif z == 2:
        dp_comm = m * _one_way(psi, dp, dp_bw, hw.latency_s) + _one_way(psi, dp, dp_bw, hw.latency_s)
    else:
        dp_comm = 3 * m * _one_way(psi, dp, dp_bw, hw.latency_s)
    if pp > 1:  # the tied embedding's gradients, summed between the first and last stage
        dp_comm += _all_reduce(V * d // tp * e, 2, pp_bw, hw.latency_s)
    updated = max(rp.numel for rp in stages) / (dp if z > 0 else 1)
    bandwidth = MEMORY_BANDWIDTH.get(hw.name, CPU_MEMORY_BANDWIDTH if hw.device == "cpu" else 2e12)
    optimizer = 16 * updated / bandwidth
    parts = {"compute": compute, "tensor parallel": tp_comm, "pipeline sends": p2p,
             "pipeline bubble": (pp - 1) * sum(slowest) if pp > 1 else 0.0,
             "data parallel": dp_comm, "optimizer": optimizer}
    # The bubble is inside `slots` already; it is listed so the table can say what it costs.
    total = compute + tp_comm + p2p + dp_comm + optimizer
    return StepTime(total, parts)
