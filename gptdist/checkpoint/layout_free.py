"""The layout-free form of a checkpoint: weights and Adam moments by canonical parameter name.

DeepSpeed's own files are tied to the layout that wrote them (flattened ZeRO partitions, `layer_XX` pipeline files,
per-TP-rank model states). Next to them every save writes `model/`:

    model/index.json                 {"tp": T, "pp": P, "params": {name: {shape, partition_dim, stride, stage}}}
    model/tp{t}_pp{p}.safetensors    this (tp, pp) slice: "<name>" fp32 weight, "exp_avg/<name>", "exp_avg_sq/<name>"

Names are the plain GPT's (`blocks.3.attn.qkv.weight`), tensors are whole across data-parallel ranks (ZeRO
partitions gathered) and split only along tensor parallelism, with the split recorded, so any other layout, an
export or a single-process tool can assemble the full tensor and cut its own piece. safetensors: loading never
unpickles anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from gptdist.parallel.tp_shard import Partition, shard, unshard

MOMENTS = ("exp_avg", "exp_avg_sq")


def _partition(param: torch.Tensor) -> Partition:
    return Partition(getattr(param, "tp_partition_dim", None), getattr(param, "tp_partition_stride", 1))


def owned_parameters(engine, names: Dict[int, str]) -> Iterator[Tuple[str, torch.nn.Parameter]]:
    """(canonical name, parameter) for every parameter this rank holds, the pipeline's second copy of the tied
    embedding excepted (it equals the first stage's)."""
    for param in engine.module.parameters():
        if getattr(param, "ds_pipe_replicated", False):
            continue
        yield names[id(param)], param


def _full_across_dp(engine, param: torch.nn.Parameter) -> Tuple[torch.Tensor, Dict[str, Optional[torch.Tensor]]]:
    """The fp32 weight and Adam moments of this rank's (tensor-parallel) piece, whole across ZeRO partitions.

    With ZeRO these are collectives over the data-parallel group: every data-parallel rank calls them for the
    same parameters in the same order."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if engine.zero_optimization_stage() > 0 or hasattr(param, "_hp_mapping"):
        weight = safe_get_full_fp32_param(param)
        moments = {key: safe_get_full_optimizer_state(param, key) for key in MOMENTS}
    else:
        weight = param.detach().float()
        state = engine.optimizer.state.get(param, {})
        moments = {key: state.get(key) for key in MOMENTS}
    return weight, moments


def _relink_optimizer_state(engine) -> None:
    """ZeRO-1/2 link each parameter to its slice of the Adam state once, after the first step. Under the pipeline
    engine that first link can precede a parameter group's state (its slice then has no moments); linking again
    now reads the state as it is."""
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state") and hasattr(opt, "_hp_optimizer_states_linked"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def write_layout_free(engine, names: Dict[int, str], topology, cfg, folder: Path) -> None:
    """Called by every rank (the ZeRO gathers are collective); data-parallel rank 0 of each (tp, pp) writes."""
    from safetensors.torch import save_file

    _relink_optimizer_state(engine)

    tensors: Dict[str, torch.Tensor] = {}
    meta: Dict[str, Dict] = {}
    for name, param in owned_parameters(engine, names):
        weight, moments = _full_across_dp(engine, param)
        if topology.dp_rank != 0:
            continue
        part = _partition(param)
        tensors[name] = weight.detach().float().cpu().contiguous()
        for key, value in moments.items():
            if value is not None:
                tensors[f"{key}/{name}"] = value.detach().float().cpu().contiguous()
        meta[name] = {"partition_dim": part.dim, "stride": part.stride, "stage": topology.pp_rank}
    if topology.dp_rank != 0:
        return
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / f"tp{topology.tp_rank}_pp{topology.pp_rank}.safetensors"))
    if topology.tp_rank == 0:
        # One index per pipeline stage; merged into index.json by rank 0 once every stage has written.
        (folder / f"index_pp{topology.pp_rank}.json").write_text(json.dumps(meta))


def merge_index(folder: Path, tp: int, pp: int) -> None:
    """Rank 0, after a barrier: one index.json for the whole model."""
    params: Dict[str, Dict] = {}
    for stage in range(pp):
        part = folder / f"index_pp{stage}.json"
        params.update(json.loads(part.read_text()))
        part.unlink()
    (folder / "index.json").write_text(json.dumps({"tp": tp, "pp": pp, "params": params}, indent=1))


class LayoutFreeReader:
    """Full tensors by canonical name, assembled from whatever layout wrote them. Opens files lazily."""

    def __init__(self, folder: Path):
        index = json.loads((folder / "index.json").read_text())
        self.folder, self.tp, self.pp, self.params = folder, index["tp"], index["pp"], index["params"]
        self._open: Dict[str, object] = {}

    def _file(self, tp_rank: int, stage: int):
        from safetensors import safe_open

        key = f"tp{tp_rank}_pp{stage}.safetensors"
        if key not in self._open:
            self._open[key] = safe_open(str(self.folder / key), framework="pt")
        return self._open[key]

    def names(self) -> List[str]:
        return list(self.params)

    def has(self, key: str, name: str) -> bool:
        meta = self.params[name]
        return f"{key}/{name}" in self._file(0, meta["stage"]).keys()

    def full(self, name: str, key: Optional[str] = None) -> torch.Tensor:
        """The full weight (key None) or Adam moment (key 'exp_avg' / 'exp_avg_sq') of `name`."""
        meta = self.params[name]
        tensor_name = name if key is None else f"{key}/{name}"
        part = Partition(meta["partition_dim"], meta["stride"])
        ranks = range(self.tp) if part.dim is not None else range(1)
        pieces = [self._file(r, meta["stage"]).get_tensor(tensor_name) for r in ranks]
        return unshard(pieces, part)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {name: self.full(name) for name in self.names()}

    def piece(self, name: str, param: torch.Tensor, tp_rank: int, tp: int, key: Optional[str] = None) -> torch.Tensor:
        """The piece of `name` that `param` (a tensor-parallel shard on this rank, or a full parameter) holds."""
        return shard(self.full(name, key), _partition(param), tp_rank, tp)
