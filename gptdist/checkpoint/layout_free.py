"""The layout-free form of a checkpoint's weights and Adam moments: the one copy a checkpoint holds.

    model/index.json              {"format": 2, "tp": T, "params": {name: {shape, partition_dim, stride, stage,
                                   "fragments": [[tp rank, start, numel, file], ...]}}}
    model/rank<r>.safetensors     rank r's fragments: "weight/<name>@<start>", "exp_avg/<name>@<start>",
                                   "exp_avg_sq/<name>@<start>": fp32, 1-D

Names are the plain GPT's (`blocks.3.attn.qkv.weight`). A parameter's tensor-parallel piece `shape` is flattened,
and its elements are stored as fragments written by whichever ranks owned them (checkpoint/fragments.py): together
they cover each piece exactly once. A reader asks for a range of a piece, or a whole piece, or a whole parameter, and
reads the overlapping byte ranges of the files that hold them and nothing else, whatever layout wrote them; another
tensor-parallel size is re-cut from the saved pieces (partition dim and stride recorded). Only the files the index
names are opened, and the manifest allows no others in the folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from gptdist.checkpoint.safetensors_io import SafetensorsFile
from gptdist.errors import UserError
from gptdist.parallel.tp.shard import Partition, shard, unshard

MOMENTS = ("exp_avg", "exp_avg_sq")
FORMAT = 2
_FILE = re.compile(r"^model/rank\d{5}\.safetensors$")


def tensor_key(kind: str, name: str, start: int) -> str:
    """kind: 'weight', 'exp_avg' or 'exp_avg_sq'."""
    return f"{kind}/{name}@{start}"


def build_index(tp: int, per_rank: List[Tuple[str, Dict[str, Dict], List[Tuple[str, int, int]]]],
                tp_ranks: List[int]) -> Dict:
    """The index from every rank's (file, {name: piece info}, [(name, start, numel)]), gathered at commit."""
    params: Dict[str, Dict] = {}
    for (file, pieces, fragments), tp_rank in zip(per_rank, tp_ranks):
        for name, info in pieces.items():
            entry = params.setdefault(name, {**info, "fragments": []})
            if entry["shape"] != info["shape"] or entry["partition_dim"] != info["partition_dim"]:
                raise RuntimeError(f"ranks disagree on the shape or split of {name}")
        for name, start, numel in fragments:
            params[name]["fragments"].append([tp_rank, start, numel, file])
    for entry in params.values():
        entry["fragments"].sort()
    return {"format": FORMAT, "tp": tp, "params": dict(sorted(params.items()))}


class LayoutFreeReader:
    """Tensors by canonical name: a range of a tensor-parallel piece, a piece, or the whole tensor."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self._read_index()
        self.tp: int = index["tp"]
        self.params: Dict[str, Dict] = index["params"]
        self._files: Dict[str, SafetensorsFile] = {}
        self.has_moments = False
        for entry in self.params.values():
            for *_, file in entry["fragments"]:
                if file not in self._files:
                    if not _FILE.match(file):
                        raise UserError(f"{self.folder / 'index.json'} names {file!r}, not a file gptdist writes")
                    self._files[file] = SafetensorsFile(self.folder.parent / file)
        self.has_moments = any(k.startswith(MOMENTS[0] + "/") for f in self._files.values() for k in f.keys())

    def _read_index(self) -> Dict:
        path = self.folder / "index.json"
        try:
            index = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: cannot be read ({type(exc).__name__}); the checkpoint is damaged") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise UserError(f"{path}: not a checkpoint of this gptdist's format {FORMAT} (it says "
                            f"{index.get('format') if isinstance(index, dict) else None!r}); it was written by "
                            "another version of gptdist")
        return index

    # ------------------------------------------------------------------------------------------ the raw pieces

    def names(self) -> List[str]:
        return list(self.params)

    def _entry(self, name: str) -> Dict:
        entry = self.params.get(name)
        if entry is None:
            raise UserError(f"the checkpoint {self.folder.parent} has no parameter {name!r}")
        return entry

    def _saved(self, name: str) -> Tuple[Partition, int, Tuple[int, ...]]:
        """How `name` was split, into how many pieces, and the shape of each piece."""
        entry = self._entry(name)
        part = Partition(entry["partition_dim"], entry["stride"])
        return part, (self.tp if part.dim is not None else 1), tuple(entry["shape"])

    def saved_range(self, name: str, tp_rank: int, start: int, stop: int, key: Optional[str] = None) -> torch.Tensor:
        """Elements [start, stop) of the flattened saved piece `tp_rank` of `name`."""
        kind = key or "weight"
        out = torch.empty(stop - start, dtype=torch.float32)
        covered = 0
        for rank, lo, numel, file in self._entry(name)["fragments"]:
            a, b = max(start, lo), min(stop, lo + numel)
            if rank != tp_rank or a >= b:
                continue
            out[a - start:b - start] = self._files[file].read(tensor_key(kind, name, lo), 0, a - lo, b - lo)
            covered += b - a
        if covered != stop - start:
            raise UserError(f"{self.folder.parent}: {kind} of {name} (piece {tp_rank}) is not fully stored: "
                            f"{covered} of {stop - start} elements; the checkpoint is damaged")
        return out

    def saved_piece(self, name: str, tp_rank: int, key: Optional[str] = None) -> torch.Tensor:
        _, _, shape = self._saved(name)
        numel = 1
        for n in shape:
            numel *= n
        return self.saved_range(name, tp_rank, 0, numel, key).view(shape)

    # ----------------------------------------------------------------------------------- what the layouts ask

    def full(self, name: str, key: Optional[str] = None) -> torch.Tensor:
        """The whole weight (key None) or Adam moment (key 'exp_avg' / 'exp_avg_sq') of `name`."""
        part, pieces, _ = self._saved(name)
        return unshard([self.saved_piece(name, r, key) for r in range(pieces)], part)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {name: self.full(name) for name in self.names()}

    def read_piece(self, name: str, partition: Partition, tp_rank: int, tp: int,
                   key: Optional[str] = None) -> torch.Tensor:
        """Tensor-parallel rank `tp_rank` of `tp`'s piece of `name` split as `partition`, whatever tensor-parallel
        size wrote it: the saved piece itself when the split is the same, else re-cut from the whole tensor."""
        saved, pieces, _ = self._saved(name)
        if partition.dim is None or tp == 1:
            return self.full(name, key)
        if saved == partition and pieces == tp:
            return self.saved_piece(name, tp_rank, key)
        return shard(self.full(name, key), partition, tp_rank, tp)

    def piece(self, name: str, param: torch.Tensor, tp_rank: int, tp: int, key: Optional[str] = None) -> torch.Tensor:
        """The piece of `name` that `param` (a tensor-parallel shard on this rank, or a full parameter) holds."""
        return self.read_piece(name, _partition(param), tp_rank, tp, key)

    def piece_range(self, name: str, param: torch.Tensor, tp_rank: int, tp: int, start: int, stop: int,
                    key: Optional[str] = None) -> torch.Tensor:
        """Elements [start, stop) of the flattened piece `param` holds: read directly when the checkpoint was split
        the same way (the same-layout resume reads exactly its own bytes), else cut from the re-cut piece."""
        partition = _partition(param)
        saved, pieces, _ = self._saved(name)
        if (partition.dim is None and saved.dim is None) or (saved == partition and pieces == tp):
            return self.saved_range(name, tp_rank if partition.dim is not None else 0, start, stop, key)
        return self.read_piece(name, partition, tp_rank, tp, key).reshape(-1)[start:stop].clone()


def _partition(param: torch.Tensor) -> Partition:
    return Partition(getattr(param, "tp_partition_dim", None), getattr(param, "tp_partition_stride", 1))
