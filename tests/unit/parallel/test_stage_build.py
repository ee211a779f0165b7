"""A rank builds only its own part of the model, with the values the full model would have.

No process group here: tensor-parallel pieces are cut with explicit (rank, size), as every rank would cut them.
The multi-rank runs that build stages for real are the layout, resume and memory tests.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from gptdist.checkpoint.layout_free import LayoutFreeReader
from gptdist.model import GPT, GPTConfig
from gptdist.parallel.materialize import CheckpointValues, InitValues, materialize
from gptdist.parallel.pipeline import BlockLayer, FinalNormLayer, PositionLayer, StageLayers, TokenEmbeddingLayer
from gptdist.parallel.tp.shard import Partition, shard

CFG = GPTConfig(n_layer=3, n_head=4, d_model=32, vocab_size=96, seq_len=16)
PARTITIONS = {  # how the tensor-parallel plan splits each kind of parameter (tp_plan.py)
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
    assert sum(p.numel() for p in BlockLayer(build,
                                             2).parameters()) == sum(p.numel() for p in GPT(CFG).blocks[2].parameters())


def _save_pieces(folder, tensors, tp, files_per_rank=2):
    """A layout-free folder as `tp` tensor-parallel ranks would write it, each rank's tensors over several files."""
    import json

    folder.mkdir(parents=True)
    names = sorted(tensors)
    for r in range(tp):
        pieces = {n: shard(tensors[n], partition(n) if tp > 1 else Partition(None, 1), r,
                           tp).contiguous() for n in names}
        for f in range(files_per_rank):
            part = {n: pieces[n] for n in names[f::files_per_rank]}
            save_file(part, str(folder / f"tp{r}_pp0_dp{f}_000.safetensors"))
    params = {n: {"partition_dim": (partition(n) if tp > 1 else Partition(None, 1)).dim,
                  "stride": (partition(n) if tp > 1 else Partition(None, 1)).stride, "stage": 0} for n in names}
    (folder / "index.json").write_text(json.dumps({"tp": tp, "pp": 1, "params": params}))


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
    original = reader._slice
    monkeypatch.setattr(reader, "_slice", lambda r, name: asked.append(name) or original(r, name))
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
    torch.testing.assert_close(model(torch.zeros(1, 4, dtype=torch.long)), GPT(CFG, seed=1)(torch.zeros(1, 4,
                                                                                                        dtype=torch.long)))


def test_safetensors_slices_equal_the_library_reader(tmp_path):
    from safetensors.torch import load_file

    from gptdist.checkpoint.safetensors_slices import SafetensorsFile

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(6, 10, generator=g), "b": torch.randn(4, 3, 5, generator=g).to(torch.bfloat16),
               "c": torch.arange(7, dtype=torch.int64), "s": torch.tensor(2.5)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    ref = load_file(str(tmp_path / "t.safetensors"))
    f = SafetensorsFile(tmp_path / "t.safetensors")
    assert sorted(f.keys()) == sorted(tensors)
    for name, value in ref.items():
        torch.testing.assert_close(f.read(name), value, rtol=0, atol=0)
    torch.testing.assert_close(f.read("a", 0, 2, 5), ref["a"][2:5], rtol=0, atol=0)
    torch.testing.assert_close(f.read("a", 1, 3, 9), ref["a"][:, 3:9], rtol=0, atol=0)
    torch.testing.assert_close(f.read("b", 1, 1, 3), ref["b"][:, 1:3], rtol=0, atol=0)
    torch.testing.assert_close(f.read("b", 2, 0, 2), ref["b"][:, :, 0:2], rtol=0, atol=0)
    with pytest.raises(ValueError, match="outside"):
        f.read("a", 0, 4, 9)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes((tmp_path / "t.safetensors").read_bytes()[:-40])
    with pytest.raises(ValueError, match="truncated"):
        cut = SafetensorsFile(truncated)
        [cut.read(name) for name in cut.keys()]
