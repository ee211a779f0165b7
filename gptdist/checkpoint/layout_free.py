"""The layout-free form of a checkpoint: weights and Adam moments by canonical parameter name.

DeepSpeed's own files are tied to the layout that wrote them (flattened ZeRO partitions, `layer_XX` pipeline files,
per-TP-rank model states). Next to them every save writes `model/`:

    model/index.json                         {"tp": T, "pp": P, "params": {name: {partition_dim, stride, stage}}}
    model/tp{t}_pp{p}_dp{d}_{k}.safetensors  tensors of tensor-parallel rank t, stage p: "<name>" fp32 weight,
                                             "exp_avg/<name>", "exp_avg_sq/<name>"

Names are the plain GPT's (`blocks.3.attn.qkv.weight`), tensors are whole across data-parallel ranks (ZeRO
partitions gathered) and split only along tensor parallelism, with the split recorded, so any other layout, an
export or a single-process tool can assemble the full tensor and cut its own piece. safetensors: loading never
unpickles anything.

Memory, both ways. Writing: the data-parallel ranks of each (tp, pp) take the parameters in turn (parameter i goes
to data-parallel rank i mod dp), and each writes a file whenever its buffer passes FILE_BYTES, so no rank holds more
than about that much of the copy at once (plus the one parameter being gathered). Reading: a rank reads only the
tensors of its own stage, and of each only the rows or columns of its own tensor-parallel piece (safetensors
slices, read with plain positioned reads rather than a memory map: safetensors_slices.py), whatever the writer's
layout; the file holding each tensor is found from the files' headers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from gptdist.checkpoint.safetensors_slices import SafetensorsFile
from gptdist.parallel.tp.shard import Partition, shard, unshard

MOMENTS = ("exp_avg", "exp_avg_sq")


def _partition(param: torch.Tensor) -> Partition:
    return Partition(getattr(param, "tp_partition_dim", None), getattr(param, "tp_partition_stride", 1))


def owned_parameters(engine, param_names: Dict[int, str]) -> Iterator[Tuple[str, torch.nn.Parameter]]:
    """(canonical name, parameter) for every parameter this rank holds, the pipeline's second copy of the tied
    embedding excepted (it equals the first stage's)."""
    for param in engine.module.parameters():
        if getattr(param, "ds_pipe_replicated", False):
            continue
        yield param_names[id(param)], param


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


FILE_BYTES = 512 << 20  # a rank writes a file whenever its buffered tensors pass this size (or 1/8 of its share)
MIN_FILE_BYTES = 16 << 20
_FILE_NAME = re.compile(r"^tp(\d+)_pp(\d+)(?:_.*)?\.safetensors$")


def write_layout_free(engine, param_names: Dict[int, str], topology, cfg, folder: Path,
                      file_bytes: int = FILE_BYTES) -> None:
    """Called by every rank (the ZeRO gathers are collective); the data-parallel ranks of each (tp, pp) share the
    writing, parameter by parameter. A rank's buffer stays under 1/8 of the bytes it writes in all (weights and
    moments, fp32), so a save adds little to what training itself holds."""
    from safetensors.torch import save_file

    _relink_optimizer_state(engine)
    dp, dp_rank = topology.layout.dp, topology.dp_rank
    owned = list(owned_parameters(engine, param_names))
    share = 12 * sum(int(getattr(p, "ds_numel", p.numel())) for _, p in owned) // dp
    file_bytes = min(file_bytes, max(MIN_FILE_BYTES, share // 8))
    prefix = f"tp{topology.tp_rank}_pp{topology.pp_rank}_dp{dp_rank}"
    buffer: Dict[str, torch.Tensor] = {}
    files = 0

    def flush() -> None:
        nonlocal buffer, files
        if buffer:
            folder.mkdir(parents=True, exist_ok=True)
            save_file(buffer, str(folder / f"{prefix}_{files:03d}.safetensors"))
            files += 1
            buffer = {}

    meta: Dict[str, Dict] = {}
    for i, (name, param) in enumerate(owned):
        weight, moments = _full_across_dp(engine, param)  # collective under ZeRO: every rank, same order
        part = _partition(param)
        meta[name] = {"partition_dim": part.dim, "stride": part.stride, "stage": topology.pp_rank}
        if i % dp != dp_rank:
            continue
        buffer[name] = weight.detach().float().cpu().contiguous()
        for key, value in moments.items():
            if value is not None:
                buffer[f"{key}/{name}"] = value.detach().float().cpu().contiguous()
        del weight, moments
        if sum(t.numel() * t.element_size() for t in buffer.values()) >= file_bytes:
            flush()
    flush()
    if dp_rank == 0 and topology.tp_rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
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


class _Slice:
    """One saved tensor: its shape, and reads of all of it or of one range along one dimension."""

    def __init__(self, file: SafetensorsFile, name: str) -> None:
        self.file, self.name = file, name

    def get_shape(self) -> Tuple[int, ...]:
        return self.file.shape(self.name)

    def all(self) -> torch.Tensor:
        return self.file.read(self.name)

    def range(self, dim: int, start: int, stop: int) -> torch.Tensor:
        return self.file.read(self.name, dim, start, stop)


class LayoutFreeReader:
    """Tensors by canonical name, whole or as one tensor-parallel piece, from whatever layout wrote them. Reads
    only the files' headers up front and then the bytes asked for."""

    def __init__(self, folder: Path):
        index = json.loads((folder / "index.json").read_text())
        self.folder, self.tp, self.pp, self.params = folder, index["tp"], index["pp"], index["params"]
        self._where: Dict[Tuple[int, str], SafetensorsFile] = {}  # (tensor-parallel rank, tensor name) -> file
        for path in sorted(folder.glob("*.safetensors")):
            match = _FILE_NAME.match(path.name)
            if match is None:
                continue
            file = SafetensorsFile(path)
            for key in file.keys():
                self._where[(int(match.group(1)), key)] = file

    def _slice(self, tp_rank: int, tensor_name: str) -> "_Slice":
        file = self._where.get((tp_rank, tensor_name))
        if file is None:
            raise ValueError(f"{self.folder}: no file holds {tensor_name!r} of tensor-parallel rank {tp_rank}")
        return _Slice(file, tensor_name)

    def names(self) -> List[str]:
        return list(self.params)

    def has(self, key: str, name: str) -> bool:
        return (0, f"{key}/{name}") in self._where

    def _saved(self, name: str) -> Tuple[Partition, int]:
        meta = self.params[name]
        part = Partition(meta["partition_dim"], meta["stride"])
        return part, (self.tp if part.dim is not None else 1)

    def full(self, name: str, key: Optional[str] = None) -> torch.Tensor:
        """The full weight (key None) or Adam moment (key 'exp_avg' / 'exp_avg_sq') of `name`."""
        tensor_name = name if key is None else f"{key}/{name}"
        part, pieces = self._saved(name)
        return unshard([self._slice(r, tensor_name).all() for r in range(pieces)], part)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {name: self.full(name) for name in self.names()}

    def read_piece(self, name: str, partition: Partition, tp_rank: int, tp: int,
                   key: Optional[str] = None) -> torch.Tensor:
        """Tensor-parallel rank `tp_rank` of `tp`'s piece of `name` split as `partition`, reading only its rows
        (or columns) from the saved pieces, whatever tensor-parallel size wrote them."""
        tensor_name = name if key is None else f"{key}/{name}"
        saved, pieces = self._saved(name)
        if partition.dim is None or tp == 1:
            return self.full(name, key)
        if saved.dim is not None and saved != partition:
            return shard(self.full(name, key), partition, tp_rank, tp)  # another split of the same tensor: rare
        dim, stride = partition
        slices = [self._slice(r, tensor_name) for r in range(pieces)]
        length = slices[0].get_shape()[dim] * pieces // stride  # rows of one chunk ([q | k | v] has 3) in full
        want, have = length // tp, length // pieces  # rows of a chunk in the new piece, in each saved piece
        parts = []
        for chunk in range(stride):
            lo, hi = tp_rank * want, (tp_rank + 1) * want  # within the chunk
            for q in range(pieces):
                a, b = max(lo, q * have), min(hi, (q + 1) * have)
                if a < b:  # saved piece q holds rows [q*have, (q+1)*have) of each chunk, chunk after chunk
                    base = chunk * have - q * have
                    parts.append(slices[q].range(dim, base + a, base + b))
        return torch.cat(parts, dim) if len(parts) > 1 else parts[0]

    def piece(self, name: str, param: torch.Tensor, tp_rank: int, tp: int, key: Optional[str] = None) -> torch.Tensor:
        """The piece of `name` that `param` (a tensor-parallel shard on this rank, or a full parameter) holds."""
        return self.read_piece(name, _partition(param), tp_rank, tp, key)
