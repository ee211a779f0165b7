"""Tensor parallelism (gptdist.parallel.tp): every sharded piece equals its single-rank counterpart.

Multi-rank checks run in spawned processes over gloo on 127.0.0.1. Each rank computes the unsharded
reference itself (same seed everywhere), so it can compare its own shard with the matching slice of
the reference: forward values, input gradients, and parameter gradients.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from gptdist.model import GPT, GPTConfig, generate
from gptdist.parallel.activation_checkpointing import apply_activation_checkpointing
from gptdist.parallel.tp.grad import tp_grad_norm
from gptdist.parallel.tp.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from gptdist.parallel.tp.plan import apply_tensor_parallel
from gptdist.parallel.tp.shard import Partition, shard, unshard
from gptdist.parallel.tp.state import (
    gather_full_state_dict,
    gather_full_tensor,
    load_full_state_dict,
    parameter_partitions,
)

ATOL = 1e-5
LAST = Partition(-1, 1)  # activations are split along their last dim


def tiny(**kw) -> GPTConfig:
    return GPTConfig(**{**dict(n_layer=2, n_head=4, d_model=32, vocab_size=64, seq_len=16), **kw})


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = (a.float() - b.float()).abs().max().item()
    assert err <= ATOL, f"{what}: max abs error {err:.3g}"


def batch(cfg: GPTConfig, seed: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=g)
    targets[0, :3] = -100  # ignored positions must drop out of the mean, as in F.cross_entropy
    targets[1, -2:] = -100
    return idx, targets


# ---------------------------------------------------------------- multi-process harness


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, check_name: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # Besides the whole world, tp=2 sub-groups at world 4: layers must use their group's rank,
        # not the global one. new_group is collective, so every rank creates every group.
        groups = [dist.new_group(list(range(world)))]
        if world == 4:
            pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
            groups.append(pairs[rank // 2])
        for group in groups:
            globals()[check_name](group)
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, check_name: str) -> None:
    mp.spawn(_worker, args=(world, _free_port(), check_name), nprocs=world, join=True)


# ---------------------------------------------------------------- layer checks (run on every rank)


def check_layers(group) -> None:
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    torch.manual_seed(0)  # same reference on every rank
    x = torch.randn(3, 5, 8)

    # column-parallel, plain and fused-qkv (stride 3) weights, output split or gathered
    for stride, gather in [(1, False), (1, True), (3, False)]:
        ref = nn.Linear(8, 12)  # 12 splits into 3 chunks x 4 ranks
        part = Partition(-1, stride)
        col = ColumnParallelLinear(8, ref.out_features, True, group, gather_output=gather, stride=stride)
        col.load_full(weight=ref.weight, bias=ref.bias)
        gy = torch.randn(3, 5, ref.out_features)
        xr, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        (ref(xr) * gy).sum().backward()
        y = col(xt)
        with torch.no_grad():
            full_y = ref(x)
        close(y, full_y if gather else shard(full_y, part, rank, size), f"column{stride}{gather} out")
        (y * (gy if gather else shard(gy, part, rank, size))).sum().backward()
        close(xt.grad, xr.grad, "column x.grad")
        close(col.weight.grad, shard(ref.weight.grad, Partition(0, stride), rank, size), "column w.grad")
        close(col.bias.grad, shard(ref.bias.grad, Partition(0, stride), rank, size), "column b.grad")

    # row-parallel, input already split or full
    for input_is_parallel in (True, False):
        ref = nn.Linear(12, 6)
        row = RowParallelLinear(12, 6, True, group, input_is_parallel=input_is_parallel)
        row.load_full(weight=ref.weight, bias=ref.bias)
        x12, gy = torch.randn(3, 5, 12), torch.randn(3, 5, 6)
        xr = x12.clone().requires_grad_()
        (ref(xr) * gy).sum().backward()
        xt = (shard(x12, LAST, rank, size) if input_is_parallel else x12.clone()).requires_grad_()
        y = row(xt)
        close(y, ref(x12).detach(), "row out")
        (y * gy).sum().backward()
        close(xt.grad, shard(xr.grad, LAST, rank, size) if input_is_parallel else xr.grad, "row x.grad")
        close(row.weight.grad, shard(ref.weight.grad, Partition(1), rank, size), "row w.grad")
        close(row.bias.grad, ref.bias.grad, "row b.grad (replicated)")

    # vocab-parallel embedding: ids of every shard, and repeated ids
    ref = nn.Embedding(16, 6)
    emb = VocabParallelEmbedding(16, 6, group)
    emb.load_full(weight=ref.weight)
    ids = torch.randint(0, 16, (4, 7))
    gy = torch.randn(4, 7, 6)
    (ref(ids) * gy).sum().backward()
    out = emb(ids)
    close(out, ref(ids).detach(), "embedding out")
    (out * gy).sum().backward()
    close(emb.weight.grad, shard(ref.weight.grad, Partition(0), rank, size), "embedding w.grad")

    # vocab-parallel cross-entropy against F.cross_entropy on the full logits, with ignored targets
    logits = (torch.randn(4, 5, 16) * 3).requires_grad_()
    targets = torch.randint(0, 16, (4, 5))
    targets[0, :2] = -100
    targets[3, 4] = -100
    w = torch.rand(4, 5)  # unequal per-token weights exercise the backward's scaling
    ref_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(4, 5)
    (ref_loss * w).sum().backward()
    local = shard(logits.detach(), LAST, rank, size).requires_grad_()
    loss = vocab_parallel_cross_entropy(local, targets, group)
    close(loss, ref_loss.detach(), "cross-entropy per token")
    assert loss.dtype == torch.float32 and bool((loss[targets == -100] == 0).all())
    (loss * w).sum().backward()
    close(local.grad, shard(logits.grad, LAST, rank, size), "cross-entropy logits.grad")


# ---------------------------------------------------------------- whole-model checks


def check_gpt(group) -> None:
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    for tie in (True, False):
        cfg = tiny(tie_embeddings=tie)
        idx, targets = batch(cfg)
        ref = GPT(cfg, seed=3)
        ref_loss = ref(idx, targets)
        ref_loss.backward()

        model = apply_tensor_parallel(GPT(cfg, seed=3), group)
        assert model.blocks[0].attn.qkv.weight.shape == (3 * 32 // size, 32)
        assert model.embed.wte.weight.shape == (64 // size, 32)
        # layout-free state: the shards put back together are exactly the unsharded model
        full = gather_full_state_dict(model, group)
        ref_sd = ref.state_dict()
        assert full.keys() == ref_sd.keys()
        assert all(torch.equal(full[k], ref_sd[k]) for k in ref_sd), "gathered state differs"
        only_dst = gather_full_state_dict(model, group, dst=1)  # a collective: every rank calls it
        assert (only_dst.keys() == ref_sd.keys()) if rank == 1 else only_dst == {}

        loss = model(idx, targets)
        close(loss, ref_loss.detach(), f"loss tie={tie}")
        loss.backward()
        parts = parameter_partitions(model)
        for name, p in model.named_parameters():
            assert p.tensor_model_parallel == (parts[name].dim is not None)
            close(gather_full_tensor(p.grad, parts[name], group), ref.get_parameter(name).grad, f"grad {name}")
        ref_norm = torch.stack([p.grad.norm() for p in ref.parameters()]).norm()
        close(tp_grad_norm(model.parameters(), group), ref_norm, "grad norm")

        with torch.no_grad():
            close(model(idx), ref(idx), "logits")
            # the two halves a pipeline's last stage and loss function call separately
            hidden = model.final_hidden(model.blocks(model.embed(idx)))
            split = model.head.loss(model.head.local_logits(hidden, model.head_weight()), targets)
            close(split, ref_loss.detach(), "local_logits + loss")
        assert generate(model, [1, 2, 3], 5) == generate(ref, [1, 2, 3], 5)

        # meta-device build: the shards come from init_value, never from a full model
        with torch.device("meta"):
            lazy = GPT(cfg, seed=None)
        lazy = apply_tensor_parallel(lazy, group, seed=3)
        sharded_sd = model.state_dict()
        for k, v in lazy.state_dict().items():
            assert not v.is_meta and torch.equal(v, sharded_sd[k]), f"meta build differs at {k}"
        close(lazy(idx, targets), ref_loss.detach(), "meta-built loss")

        # recomputing blocks in backward repeats their collectives in the same order on every rank
        recomputed = apply_tensor_parallel(GPT(cfg, seed=3), group)
        apply_activation_checkpointing(recomputed)
        recomputed(idx, targets).backward()
        for (name, p), q in zip(model.named_parameters(), recomputed.parameters()):
            close(q.grad, p.grad, f"checkpointed grad {name}")

        # and back: a full state dict loaded into a sharded model reproduces its shards
        fresh = apply_tensor_parallel(GPT(cfg, seed=5), group)
        load_full_state_dict(fresh, ref_sd, group)
        assert all(torch.equal(v, sharded_sd[k]) for k, v in fresh.state_dict().items())


@pytest.mark.parametrize("world", [2, 4])
def test_layers_match_single_rank(world):
    run_ranks(world, "check_layers")


@pytest.mark.parametrize("world", [2, 4])
def test_gpt_matches_unsharded(world):
    run_ranks(world, "check_gpt")


# ---------------------------------------------------------------- single process


def test_qkv_shard_holds_this_ranks_heads_of_q_k_and_v():
    d, h, tp = 8, 4, 2
    full = torch.arange(3 * d * d, dtype=torch.float32).view(3 * d, d)
    for r in range(tp):
        want = full.view(3, h, d // h, d)[:, r * h // tp : (r + 1) * h // tp].reshape(3 * d // tp, d)
        assert torch.equal(shard(full, Partition(0, 3), r, tp), want)
    assert torch.equal(unshard([shard(full, Partition(0, 3), r, tp) for r in range(tp)], Partition(0, 3)), full)


def test_group_none_is_plain_single_rank():
    cfg = tiny(tie_embeddings=False)
    idx, targets = batch(cfg)
    ref = GPT(cfg, seed=1)
    model = apply_tensor_parallel(GPT(cfg, seed=1), None)
    assert isinstance(model.blocks[1].mlp.fc2, RowParallelLinear)
    close(model(idx, targets), ref(idx, targets).detach(), "tp=1 loss")
    assert gather_full_state_dict(model, None).keys() == ref.state_dict().keys()


def test_divisibility_and_misuse_errors():
    with pytest.raises(ValueError, match="n_head=4"):
        from gptdist.parallel.tp.plan import check_tp_divisibility

        check_tp_divisibility(tiny(n_head=4, d_model=32), 3)
    with pytest.raises(ValueError, match="vocab_size=61"):
        check_tp_divisibility(tiny(n_head=2, vocab_size=61), 2)
    with pytest.raises(ValueError, match="ffn_dim=30"):
        check_tp_divisibility(tiny(n_head=2, d_ff=30), 4)
    with torch.device("meta"):
        lazy = GPT(tiny(), seed=None)
    with pytest.raises(ValueError, match="seed"):
        apply_tensor_parallel(lazy, None)
    with pytest.raises(ValueError, match="already"):
        apply_tensor_parallel(apply_tensor_parallel(GPT(tiny()), None), None)
    with pytest.raises(ValueError, match="gather_output"):
        ColumnParallelLinear(4, 12, gather_output=True, stride=3)


def test_deepspeed_sees_sharded_parameters():
    # DeepSpeed's gradient-norm code counts a parameter on every tp rank only if this says so
    from deepspeed.runtime.utils import is_model_parallel_parameter

    model = apply_tensor_parallel(GPT(tiny(tie_embeddings=False)), None)
    sharded = {n for n, p in model.named_parameters() if is_model_parallel_parameter(p)}
    split = ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight")
    block = {f"blocks.{i}.{m}" for i in range(2) for m in split}
    assert sharded == block | {"embed.wte.weight", "lm_head.weight"}
    assert all(p.tp_partition_dim is None for n, p in model.named_parameters() if n not in sharded)
