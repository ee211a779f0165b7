"""Recompute each block's activations during backward instead of keeping them (pp = 1; the pipeline builder
asks DeepSpeed's PipelineModule for the same per block)."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Wrap every block's forward in a non-reentrant checkpoint, in place.

    The forward is replaced on the instance rather than by wrapping the module, so parameter names (and with
    them initialization, checkpoints and export) stay exactly those of the plain model. Decoding with a KV cache
    and no-grad evaluation run the block directly: there is nothing to save memory on.
    """
    for block in model.blocks:
        plain_forward = block.forward

        def forward(x, kv_cache=None, start_pos=0, _plain=plain_forward):
            if kv_cache is not None or not torch.is_grad_enabled():
                return _plain(x, kv_cache=kv_cache, start_pos=start_pos)
            return checkpoint(_plain, x, use_reentrant=False)

        block.forward = forward
