"""Key/value cache for incremental decoding: each attention layer keeps the keys and values it already computed."""

from __future__ import annotations

import torch


class LayerKVCache:
    """Keys and values of one attention layer, (B, heads, max_len, head_dim), filled front to back.

    Buffers are allocated on the first write, from the shapes the layer produces, so the cache does not
    need to know how many heads this rank holds after tensor-parallel sharding, nor the dtype or device.
    """

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0  # number of valid positions

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, T_new, hd) at positions start_pos.. and return all keys/values up to the end."""
        end = start_pos + k.size(2)
        if start_pos > self.length:
            raise ValueError(f"cache holds {self.length} positions; cannot write at start_pos={start_pos}")
        if end > self.max_len:
            raise ValueError(f"cache of {self.max_len} positions cannot hold position {end - 1}")
        if self.k is None:
            B, H, _, hd = k.shape
            self.k = k.new_empty(B, H, self.max_len, hd)
            self.v = v.new_empty(B, H, self.max_len, hd)
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        self.length = end  # writing at start_pos < length rewinds: later entries are dropped
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """One LayerKVCache per block, indexed like the ModuleList of blocks it serves."""

    def __init__(self, n_layer: int, max_len: int):
        self.layers = [LayerKVCache(max_len) for _ in range(n_layer)]

    def __getitem__(self, i: int) -> LayerKVCache:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0
