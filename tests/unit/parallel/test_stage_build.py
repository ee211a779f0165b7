"""A rank builds only its own part of the model, with the values the full model would have.

No process group here: tensor-parallel pieces are cut with explicit (rank, size), as every rank would cut them.
The multi-rank runs that build stages for real are the layout, resume and memory tests.
"""

from __future__ import annotations

import json

import pytest
import torch

from gptdist.checkpoint.layout_free import LayoutFreeReader, build_index, tensor_key
from gptdist.checkpoint.safetensors_io import write_safetensors
from gptdist.model import GPT, GPTConfig
from gptdist.parallel.materialize import CheckpointValues, InitValues, materialize
from gptdist.parallel.pipeline import BlockLayer, FinalNormLayer, PositionLayer, StageLayers, TokenEmbeddingLayer
from gptdist.parallel.tp.shard import Partition, shard

CFG = GPTConfig(n_layer=3, n_head=4, d_model=32, vocab_size=96, seq_len=16)
PARTITIONS = {  # how the tensor-parallel plan splits each kind of parameter (parallel/tp/plan.py)
    "attn.qkv.weight": Partition(0, 3), "attn.qkv.bias": Partition(0, 3),
    "attn.proj.weight": Partition(1, 1), "mlp.fc1.weight": Partition(0, 1), "mlp.fc1.bias": Partition(0, 1),
    "mlp.fc2.weight": Partition(1, 1), "embed.wte.weight": Partition(0, 1),
}


def partition(name: str) -> Partition:
    return next((p for suffix, p in PARTITIONS.items() if name.endswith(suffix)), Partition(None, 1))


def test_stage_layers_build_their_piece_with_the_full_models_values():
    full = dict(GPT(CFG, seed=5).named_parameters())
    build = StageLayers(CFG, None, torch.device("cpu"), InitValues(CFG, 5))
    layers = {"blocks.1": BlockLayer(build, 1).block, "ln_f": FinalNormLayer(build).ln_f,
              "embed.wte": TokenEmbeddingLayer(build).wte, "embed": PositionLayer(build).embed}
    for prefix, module in layers.items():
        params = dict(module.named_parameters())
        assert params, prefix
        for local, value in params.items():
            name = f"{prefix}.{local}"
            assert value.gptdist_name == name
            torch.testing.assert_close(value, full[name], rtol=0, atol=0)
    # One block's layer holds one block: nothing of the other blocks, the embedding or the head.
    one_block = sum(p.numel() for p in BlockLayer(build, 2).parameters())
    assert one_block == sum(p.numel() for p in GPT(CFG).blocks[2].parameters())


def _save_pieces(folder, tensors, tp, dp=2):
    """A layout-free folder as tp x dp ranks would write it under ZeRO: each tensor-parallel piece, flattened, cut
    into `dp` contiguous fragments at uneven offsets, each fragment in its writer's file."""
    folder.mkdir(parents=True)
    per_rank = []
    for r in range(tp):
        for d in range(dp):
            file, files = f"model/rank{r * dp + d:05d}.safetensors", {}
            pieces, fragments = {}, []
            for n in sorted(tensors):
                split = partition(n) if tp > 1 else Partition(None, 1)
                if split.dim is None and r > 0:
                    continue  # replicated: tensor-parallel rank 0 writes it
                piece = shard(tensors[n], split, r, tp).contiguous()
                pieces[n] = {"shape": list(piece.shape), "partition_dim": split.dim, "stride": split.stride,
                             "stage": 0}
                cut = [0, piece.numel() // 3, piece.numel()]  # two fragments of unequal size
                lo, hi = cut[d], cut[d + 1]
                if lo < hi:
                    files[tensor_key("weight", n, lo)] = piece.reshape(-1)[lo:hi].clone()
                    fragments.append((n, lo, hi - lo))
            write_safetensors(folder.parent / file, files)
            per_rank.append(((file, pieces, fragments), r))
    index = build_index(tp, [x for x, _ in per_rank], [r for _, r in per_rank])
    (folder / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("saved_tp", [1, 2, 4])
def test_checkpoint_pieces_are_read_by_slices_for_any_tensor_parallel_size(tmp_path, saved_tp):
    tensors = {n: p.detach().clone() for n, p in GPT(CFG, seed=9).named_parameters()}
    _save_pieces(tmp_path / "model", tensors, saved_tp)
    reader = LayoutFreeReader(tmp_path / "model")
    for name, full in tensors.items():
        torch.testing.assert_close(reader.full(name), full, rtol=0, atol=0)
        for tp in (1, 2, 4):
            for r in range(tp):
                want = shard(full, partition(name), r, tp)
                torch.testing.assert_close(reader.read_piece(name, partition(name), r, tp), want, rtol=0, atol=0)


def test_a_stage_materialized_from_a_checkpoint_reads_only_its_own_tensors(tmp_path, monkeypatch):
    tensors = {n: p.detach().clone() for n, p in GPT(CFG, seed=9).named_parameters()}
    _save_pieces(tmp_path / "model", tensors, 2)
    reader = LayoutFreeReader(tmp_path / "model")
    asked = []
    original = reader.saved_range
    monkeypatch.setattr(reader, "saved_range", lambda name, *a, **k: asked.append(name) or original(name, *a, **k))
    build = StageLayers(CFG, None, torch.device("cpu"), CheckpointValues(reader))
    block = BlockLayer(build, 2).block
    assert asked and all(name.startswith("blocks.2.") for name in asked)
    for local, value in block.named_parameters():
        torch.testing.assert_close(value, tensors[f"blocks.2.{local}"], rtol=0, atol=0)


def test_materialize_refuses_a_value_of_the_wrong_shape():
    with torch.device("meta"):
        model = GPT(CFG, seed=None)
    other = GPTConfig(**{**CFG.model_dump(), "d_model": 64})
    with pytest.raises(ValueError, match="shape"):
        from gptdist.parallel.materialize import TensorValues

        materialize(model, TensorValues(dict(GPT(other, seed=1).named_parameters())), device="cpu")
    materialize(model, InitValues(CFG, 1), device="cpu")  # the model is still usable
    ids = torch.zeros(1, 4, dtype=torch.long)
    torch.testing.assert_close(model(ids), GPT(CFG, seed=1)(ids))
