"""Every random stream of a rank as plain tensors and strings, so a checkpoint holds them in safetensors (nothing
that unpickles), and a same-layout resume continues each stream where it stood."""

from __future__ import annotations

import json
import random
from typing import Dict, Tuple

import numpy as np
import torch

from gptdist.errors import UserError


def capture() -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(tensors, metadata) of Python's, NumPy's and torch's generators (and every CUDA device's)."""
    version, py_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {
        "python": torch.tensor(py_state, dtype=torch.int64),
        "numpy": torch.from_numpy(np_keys.astype(np.int64)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        for device in range(torch.cuda.device_count()):
            tensors[f"cuda{device}"] = torch.cuda.get_rng_state(device)
    meta = {"python": json.dumps({"version": version, "gauss": gauss}),
            "numpy": json.dumps({"name": np_name, "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                                 "gauss": float(np_gauss)})}
    return tensors, meta


def restore(tensors: Dict[str, torch.Tensor], meta: Dict[str, str], where: str) -> None:
    try:
        py = json.loads(meta["python"])
        n = json.loads(meta["numpy"])
        random.setstate((int(py["version"]), tuple(int(x) for x in tensors["python"].tolist()), py["gauss"]))
        np.random.set_state((str(n["name"]), tensors["numpy"].numpy().astype(np.uint32), int(n["pos"]),
                             int(n["has_gauss"]), float(n["gauss"])))
        torch.set_rng_state(tensors["torch"].to(torch.uint8))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise UserError(f"{where}: the random states are not ones gptdist wrote ({type(exc).__name__}); the checkpoint "
                        "is damaged") from None
    if torch.cuda.is_available():
        for device in range(torch.cuda.device_count()):
            if f"cuda{device}" in tensors:
                torch.cuda.set_rng_state(tensors[f"cuda{device}"].to(torch.uint8), device)
