"""Per-rank memory of a layout, predicted from the shapes alone: model states exactly, activations by formula.

What a rank holds, in the terms of its memory report (telemetry/memory.py), for N = its parameters (shapes.py: its
stage's layers, its tensor-parallel shard), part = its ZeRO partition of them, e = bytes per parameter element:

    fp32 (CPU, and GPUs with train.precision=fp32)   ZeRO-0   ZeRO-1 / ZeRO-2                 ZeRO-3
    params    the module's parameters                4N       4·flat (N, aligned to 2·dp)      4·part (+ small ones)
    master    fp32 copy the optimizer updates        -        4·part                           4·part
    optimizer Adam's exp_avg and exp_avg_sq          8N       8·part                           8·part
    grads     at the optimizer step                  4N       8·part (bucketed + fp32 copy)    8·part (flat + fp32 copy)
    buffers   DeepSpeed's working buffers            -        -                                reduce bucket

bf16 (DeepSpeed's bf16 optimizer with ZeRO-0; bf16 flat buffers with ZeRO-1/2/3) keeps 2-byte parameters and
gradient buckets and fp32 master weights, gradients and moments; the table in docs/performance.md lists it. These
are DeepSpeed 0.19's buffers as its source allocates them; the fp32 rows were checked against measured runs
(tests/launch/parallel/test_layouts.py), the bf16 rows have not been run on a GPU yet.

Activations per micro-batch of n = micro_batch_size x seq_len tokens, saved for backward (SDPA attention, which
keeps only its output and log-sum-exp, not the T x T scores):

    per block       n·(4d + (4d + 2f)/tp)·e      ln1 in/out, residual, ln2 in/out (replicated under TP), and
                                                 qkv, attention out, fc1 out, GELU out (split by TP)
    with activation checkpointing, n·d·e per block, plus one block's full set while it is recomputed
    head (pp = 1)   the chunked loss keeps its two gradients from forward: n·d and V·d in fp32, plus one chunk of
                    logits (rows x V) while it runs; vocab-parallel (tp > 1): the local logits' softmax, n·V/tp fp32
    head (pp > 1)   the last stage keeps the logits it hands to the loss and their log-softmax: n·V/tp·(e + 4)
    1F1B            stage s of p keeps min(p - s, m) micro-batches' activations at its peak

The peak is the largest of the phases the memory report measures: construction, forward, backward, optimizer
step (Adam's temporary: one group's worth of exp_avg_sq), and for ZeRO-1/2 the all-gather of updated parameters.
What it leaves out: allocator fragmentation and the runtime (CUDA context, NCCL, Python), which `plan` adds as a
stated allowance per hardware preset; dropout masks (dropout > 0); torch.compile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

from gptdist.model.config import GPTConfig
from gptdist.parallel.layout import Layout
from gptdist.plan.shapes import RankParams

FP32 = 4


@dataclass
class RankMemory:
    stage: int
    dp_rank: int
    model_states: Dict[str, int]  # kind -> bytes at the optimizer step (the report's model_state_bytes)
    phases: Dict[str, int]  # phase -> peak live tensor bytes
    activations: int  # bytes saved for backward at this rank's most loaded moment
    notes: Dict[str, int] = field(default_factory=dict)

    @property
    def model_state_bytes(self) -> int:
        return sum(self.model_states.values())

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)


def _ceil_to(n: int, k: int) -> int:
    return -(-n // k) * k


def zero12_partitions(groups, dp: int):
    """(flat numel, partition numel) per parameter group, as DeepSpeed's ZeRO-1/2 flatten and split them: each
    group's flat buffer is padded to a multiple of 2 x dp elements and cut into dp equal partitions."""
    out = []
    for g in groups:
        flat = _ceil_to(sum(g), 2 * dp)
        out.append((flat, flat // dp))
    return out


def straddling(groups, dp: int, dp_rank: int) -> int:
    """Elements of the parameters that cross the edges of this rank's ZeRO-1/2 partition, outside it: DeepSpeed
    keeps such a parameter's whole gradient on every rank that owns a piece of it."""
    extra = 0
    for g, (_, part) in zip(groups, zero12_partitions(groups, dp)):
        lo, hi = dp_rank * part, (dp_rank + 1) * part
        start = 0
        for numel in g:
            end = start + numel
            if start < hi and end > lo and (start < lo or end > hi):
                extra += numel - (min(end, hi) - max(start, lo))
            start = end
    return extra


def zero3_partition(numel: int, dp: int) -> int:
    return -(-numel // dp)


def activation_bytes(cfg: GPTConfig, rp: RankParams, layout: Layout, act_bytes: int, chunk_rows: int) -> Dict[str, int]:
    """Bytes saved for backward by one micro-batch on this rank, by part, and the forward's largest transient."""
    n = layout.micro_batch_size * cfg.seq_len
    d, f, V, t = cfg.d_model, cfg.ffn_dim, cfg.vocab_size, layout.tp
    blocks = len(rp.blocks)
    per_block = n * (4 * d + (4 * d + 2 * f) // t) * act_bytes
    if layout.activation_checkpointing:
        saved_blocks = blocks * n * d * act_bytes
        recompute = per_block  # one block's activations while its backward recomputes them
    else:
        saved_blocks, recompute = blocks * per_block, 0
    head = transient = 0
    if rp.last:
        if layout.pp == 1 and t == 1:
            # ln_f input, and the chunked loss's n x d and V x d gradients (fp32) computed in forward
            head = n * d * act_bytes + n * d * FP32 + V * d * FP32
            transient = min(n, chunk_rows) * V * FP32
        elif layout.pp == 1:
            head = 2 * n * d * act_bytes + n * (V // t) * FP32
            transient = n * (V // t) * FP32
        else:
            head = n * d * act_bytes + n * (V // t) * (act_bytes + FP32)
            transient = n * (V // t) * FP32
    return {"blocks": saved_blocks, "head": head, "recompute": recompute, "forward_transient": transient}


def in_flight(layout: Layout, stage: int) -> int:
    """Micro-batches whose activations a stage holds at once (1F1B: p - s, at most m)."""
    if layout.pp == 1:
        return 1
    return max(1, min(layout.pp - stage, layout.grad_accum))


def predict_rank(cfg: GPTConfig, rp: RankParams, layout: Layout, precision: str, buffers: Dict[str, int],
                 chunk_rows: int, dp_rank: int = 0) -> RankMemory:
    """The model states and per-phase peaks of data-parallel rank `dp_rank` of the stage holding `rp`."""
    z, dp = layout.zero_stage, layout.dp
    e = 2 if precision in ("bf16", "fp16") else FP32  # parameter / activation element
    N = rp.numel
    largest = rp.largest
    bucket = buffers.get("reduce_bucket_size", 0)
    states: Dict[str, int] = {}
    notes: Dict[str, int] = {}
    if z == 0:
        if e == FP32:
            states = {"params": FP32 * N, "grads": FP32 * N, "optimizer": 2 * FP32 * N}
        else:  # DeepSpeed's BF16_Optimizer: bf16 params and grads, fp32 master, fp32 gradient accumulator, moments
            states = {"params": e * N, "grads": e * N + FP32 * N, "master": FP32 * N, "optimizer": 2 * FP32 * N}
        optimizer_temp = FP32 * max(sum(g) for g in rp.groups)  # foreach AdamW: sqrt(exp_avg_sq) of a group
        grads_during = FP32 * N if e == FP32 else (e + FP32) * N
    elif z in (1, 2):
        parts = zero12_partitions(rp.groups, dp)
        flat, part = sum(p[0] for p in parts), sum(p[1] for p in parts)
        states = {"params": e * flat, "master": FP32 * part, "optimizer": 2 * FP32 * part,
                  "grads": 2 * FP32 * part + FP32 * straddling(rp.groups, dp, dp_rank)}
        optimizer_temp = FP32 * max(p[1] for p in parts)
        # ZeRO-1 keeps full gradients until the boundary, ZeRO-2 only its partition; both allocate a reduce
        # bucket at the first backward of a step.
        grads_during = (e * N if z == 1 else FP32 * part) + FP32 * bucket
        notes["allgather"] = e * flat  # the updated partitions gathered back into every rank's flat buffer
        if z == 1 and layout.pp > 1:
            # The pipeline engine reduces after the last backward: the partition is filled while the full
            # gradients still exist.
            notes["boundary"] = FP32 * part
    else:
        threshold = buffers.get("stage3_param_persistence_threshold", 0)
        numels = [n for g in rp.groups for n in g]
        part = sum(zero3_partition(n, dp) for n in numels)
        persistent = sum(n for n in numels if n <= threshold)
        states = {"params": e * (part + persistent), "master": FP32 * part, "optimizer": 2 * FP32 * part,
                  "grads": 2 * FP32 * part, "buffers": FP32 * bucket}
        optimizer_temp = FP32 * max(sum(zero3_partition(n, dp) for n in g) for g in rp.groups)
        grads_during = FP32 * part
        # Gathered for use: measured, twice stage3_max_live_parameters (the modules in use and those prefetched
        # for the next ones, including the first blocks gathered right after the optimizer for the next forward);
        # in backward also the full gradients of the blocks being reduced into their partitions.
        notes["gathered"] = e * min(N, 2 * buffers.get("stage3_max_live_parameters", N))
        notes["reducing"] = 2 * FP32 * buffers.get("stage3_prefetch_bucket_size", 0)
    base = sum(v for k, v in states.items() if k != "grads")  # what lives through forward and backward
    if layout.pp > 1:
        # The pipeline engine keeps each buffer's last input and output between steps: activations, and on the last
        # stage the logits it handed to the loss.
        n = layout.micro_batch_size * cfg.seq_len
        buffers_ = max(2, min(layout.pp - rp.stage, layout.grad_accum))
        out = n * (cfg.vocab_size // layout.tp if rp.last else cfg.d_model) * e
        inp = n * 8 if rp.first else n * cfg.d_model * e
        notes["pipe_buffers"] = buffers_ * (out + inp)
        base += notes["pipe_buffers"]
    acts = activation_bytes(cfg, rp, layout, e, chunk_rows)
    one = acts["blocks"] + acts["head"]  # saved by one micro-batch
    k = in_flight(layout, rp.stage)
    gathered = notes.get("gathered", 0)
    # Gradients of this step already exist during a forward if a backward ran before it: with accumulation on one
    # stage (m > 1), and on a pipeline stage once 1F1B reaches its steady state (m > p - s).
    m = layout.grad_accum
    warm = m > 1 if layout.pp == 1 else m > layout.pp - rp.stage
    g_fwd = grads_during if warm else 0
    # Backward's transient: a new gradient and its accumulation into the existing one, twice the largest tensor
    # involved. On the first stage that is the token embedding's dense V x d gradient, unless ZeRO-1 copies
    # each gradient into its bucket as it appears (measured: tests/launch/parallel/test_layouts.py); elsewhere a block's
    # largest matrix.
    block_matrix = max(3 * cfg.d_model * cfg.d_model, cfg.d_model * cfg.ffn_dim) // layout.tp
    wte = cfg.vocab_size * cfg.d_model // layout.tp
    dense_embedding_grad = rp.first and z != 1
    t_bwd = max(acts["recompute"], 2 * FP32 * (max(wte, block_matrix) if dense_embedding_grad else block_matrix))
    phases = {
        "build": e * N + FP32 * largest
                 + (e * sum(p[0] for p in zero12_partitions(rp.groups, dp)) if z in (1, 2) else 0),
        "forward": base + g_fwd + k * one + acts["forward_transient"] + gathered,
        "backward": base + gathered + notes.get("reducing", 0) + t_bwd
        + max(g_fwd + k * one, (grads_during + one) if m > 1 else 0, grads_during + notes.get("boundary", 0)),
        "optimizer": sum(states.values()) + optimizer_temp,
    }
    if z in (1, 2):
        phases["after optimizer"] = base + notes["allgather"]
    return RankMemory(rp.stage, dp_rank, states, phases, k * one, notes)


def chunk_rows_for(cfg: GPTConfig) -> int:
    # torch: model.head imports torch; `gptdist plan` predicts without it
    from gptdist.model.head import default_chunk_rows

    return default_chunk_rows(cfg.vocab_size)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"

