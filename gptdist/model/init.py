"""Layout-independent parameter initialization (GPT-2 scheme).

Every parameter's full initial value is drawn from its own generator, seeded by a hash of
(seed, parameter name). Nothing depends on the order modules are built in, on global RNG state,
on how many layers exist, or on how the model is split across devices:

* block 0 of a 2-layer and of a 4-layer model draw the same noise (only the residual-projection
  scale, init_std/sqrt(2*n_layer), differs, since it depends on depth by design);
* a tensor-parallel rank can call `init_value` for the full tensor and keep its slice, and a
  pipeline stage that only builds some blocks gets the values the full model would have.

The cost is generating each full tensor on the CPU, which is negligible next to training.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import torch
import torch.nn as nn

from gptdist.model.config import GPTConfig

# Wrappers (torch.compile, DDP/DeepSpeed engines, FSDP, activation checkpointing) insert these into
# parameter names; they are stripped so a wrapped model initializes exactly like a bare one.
_WRAPPER_PARTS = {"_orig_mod", "module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}

_NORMS = {"ln1", "ln2", "ln_f"}
_PLAIN_WEIGHTS = {"wte", "wpe", "qkv", "fc1", "lm_head"}  # N(0, init_std)
_RESIDUAL_OUT = {("attn", "proj"), ("mlp", "fc2")}  # write into the residual stream: scaled down


def canonical_name(name: str) -> str:
    """`_orig_mod.module.blocks.0.attn.qkv.weight` -> `blocks.0.attn.qkv.weight`."""
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_PARTS)


def param_seed(seed: int, name: str) -> int:
    """A stable 64-bit seed for one parameter (sha256, so it is the same on every machine and run)."""
    digest = hashlib.sha256(f"{seed}/{canonical_name(name)}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def init_value(name: str, shape: Sequence[int], cfg: GPTConfig, seed: int) -> torch.Tensor:
    """The full initial value (float32, CPU) of the parameter called `name` in a GPT built from `cfg`.

    Linear and embedding weights ~ N(0, init_std); the two projections that write into the residual
    stream (`attn.proj.weight`, `mlp.fc2.weight`) ~ N(0, init_std / sqrt(2 * n_layer)), because each
    of the 2*n_layer branches adds to the same stream and its variance would otherwise grow with depth
    (GPT-2 paper, section 2.3). Biases 0; LayerNorm weight 1, bias 0.
    """
    parts = canonical_name(name).split(".")
    leaf, owner = parts[-1], parts[-2] if len(parts) > 1 else ""
    shape = tuple(shape)
    if owner in _NORMS:
        return torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
    if leaf == "bias":
        return torch.zeros(shape)
    if leaf == "weight" and (owner in _PLAIN_WEIGHTS or tuple(parts[-3:-1]) in _RESIDUAL_OUT):
        std = cfg.init_std
        if tuple(parts[-3:-1]) in _RESIDUAL_OUT:
            std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
        g = torch.Generator(device="cpu").manual_seed(param_seed(seed, name))
        # Standard normal first, scaled after: the noise depends on (seed, name, shape) only.
        return torch.randn(shape, generator=g) * std
    raise ValueError(f"no initialization rule for parameter {name!r}")


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int) -> None:
    """Overwrite every parameter of `model` (a GPT, a stage of one, or a wrapper) with `init_value`.

    Parameters on the meta device have no storage and are skipped: materialize them first
    (`model.to_empty(device=...)`) and call this again. Non-persistent buffers (the sinusoidal
    position table) are refilled too, since `to_empty` leaves them uninitialized.
    """
    cfg = _find_config(model)
    for name, p in model.named_parameters():
        if p.is_meta:
            continue
        p.copy_(init_value(name, p.shape, cfg, seed).to(dtype=p.dtype, device=p.device))
    for m in model.modules():
        reset = getattr(m, "reset_buffers", None)
        if callable(reset) and not any(b.is_meta for b in m.buffers(recurse=False)):
            reset()


def _find_config(model: nn.Module) -> GPTConfig:
    # The GPT keeps its config as `.cfg`; a wrapper holds the GPT somewhere below.
    for m in model.modules():
        cfg = getattr(m, "cfg", None)
        if isinstance(cfg, GPTConfig):
            return cfg
    raise ValueError("init_parameters needs a module containing a GPT (an attribute `cfg: GPTConfig`)")
