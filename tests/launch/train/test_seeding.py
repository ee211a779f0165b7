"""Seeds per rank (gptdist/train/seeding.py), on 4 real ranks (tp 2 x dp 2, gloo): the dropout masks of a GPT
with dropout 0.1 differ between data-parallel replicas, agree between the tensor-parallel ranks of a replica, and
train.seed changes them (and so the loss); pipeline stages get streams of their own."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gptdist.model import GPT, GPTConfig
from gptdist.parallel.tp.plan import apply_tensor_parallel
from gptdist.train.seeding import rank_seed, seed_rank

CFG = GPTConfig(n_layer=2, n_head=4, d_model=32, vocab_size=64, seq_len=16, dropout=0.1)


def _masks_and_loss(seed: int, tp_group, dp_rank: int):
    seed_rank(seed, dp_rank, pp_rank=0)
    model = apply_tensor_parallel(GPT(CFG, seed=7), tp_group)  # the same weights on every rank and seed
    model.train()
    masks = []
    for module in (model.embed.drop, model.blocks[0].mlp.drop):
        module.register_forward_hook(lambda mod, inp, out: masks.append((out == 0) & (inp[0] != 0)))
    g = torch.Generator().manual_seed(3)  # the same batch everywhere: only the dropout streams differ
    idx = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len), generator=g)
    loss = model(idx, idx)
    return torch.cat([m.flatten() for m in masks]).to(torch.uint8), loss.detach().reshape(1)


def _gather(t: torch.Tensor):
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return out


def _worker(rank: int, port: int, failures) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=4)
    try:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # tp groups: ranks 2r, 2r+1 are replica r
        tp_group, dp_rank = pairs[rank // 2], rank // 2
        masks1, loss1 = _masks_and_loss(1, tp_group, dp_rank)
        masks2, loss2 = _masks_and_loss(2, tp_group, dp_rank)
        m1, l1, m2, l2 = _gather(masks1), _gather(loss1), _gather(masks2), _gather(loss2)
        if rank == 0:
            problems = []
            if not 0.05 < m1[0].float().mean() < 0.15:
                problems.append(f"mask density {m1[0].float().mean():.3f} for dropout 0.1")
            if not (torch.equal(m1[0], m1[1]) and torch.equal(m1[2], m1[3])):
                problems.append("tensor-parallel ranks of a replica drew different masks")
            if torch.equal(m1[0], m1[2]):
                problems.append("data-parallel replicas drew the same masks")
            if torch.equal(m1[0], m2[0]):
                problems.append("train.seed=1 and train.seed=2 drew the same masks")
            if not (l1[0] == l1[1] and l1[2] == l1[3]):
                problems.append("tensor-parallel ranks of a replica computed different losses")
            if l1[0] == l2[0] or l1[0] == l1[2]:
                problems.append(f"losses: seed 1 {l1.tolist()}, seed 2 {l2.tolist()}")
            failures.extend(problems)
    finally:
        dist.destroy_process_group()


def test_dropout_masks_per_rank():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        failures = manager.list()
        mp.spawn(_worker, args=(port, failures), nprocs=4, join=True)
        assert list(failures) == []


def test_streams_differ_by_replica_and_stage_not_by_tensor_rank():
    seeds = {(dp, pp): rank_seed(1, dp, pp) for dp in range(4) for pp in range(4)}
    assert len(set(seeds.values())) == 16  # every replica and stage its own stream
    assert rank_seed(1, 0, 0) != rank_seed(2, 0, 0) and rank_seed(1, 0, 0, 10) != rank_seed(1, 0, 0)
    assert 0 <= min(seeds.values()) and max(seeds.values()) < 2**63
