"""The parameters each rank of a layout holds, from the model's shapes alone: no process group, no memory.

The GPT is built on the meta device and given the real tensor-parallel plan with a stand-in group of the layout's
size (parallel/tp/comm.py's ShapeGroup), so every shard has exactly the shape training gives it; blocks are assigned to
pipeline stages by DeepSpeed's own partitioning function with the weights gptdist's PipelineModule uses. The
planner's model-state arithmetic starts from these lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Tuple

from gptdist.model.config import GPTConfig


@dataclass(frozen=True)
class RankParams:
    """What one (pipeline stage, tensor-parallel rank) holds."""

    stage: int
    stages: int
    blocks: Tuple[int, ...]  # block indices on this stage
    decay: Tuple[int, ...]  # numel of each parameter in AdamW's weight-decay group (matrices), in order
    no_decay: Tuple[int, ...]  # biases and LayerNorm gains
    names: Tuple[str, ...] = field(default=(), compare=False)
    tied_copy: int = 0  # numel of the last stage's copy of the tied embedding (pp > 1; counted in `decay`)

    @property
    def numel(self) -> int:
        return sum(self.decay) + sum(self.no_decay)

    @property
    def groups(self) -> Tuple[Tuple[int, ...], ...]:
        return tuple(g for g in (self.decay, self.no_decay) if g)

    @property
    def largest(self) -> int:
        return max(self.decay + self.no_decay)

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1


@lru_cache(maxsize=None)
def stage_blocks(n_layer: int, pp: int) -> Tuple[Tuple[int, ...], ...]:
    """Block indices per stage, as DeepSpeed partitions gptdist's layer list by `type:BlockLayer`."""
    if pp == 1:
        return (tuple(range(n_layer)),)
    # deepspeed: slow to import, only for pipelined layouts
    from deepspeed.runtime.utils import partition_balanced

    # [token embedding, positions, block 0 .. block L-1, final norm, tied head]: weight 1 for blocks only.
    weights = [0, 0] + [1] * n_layer + [0, 0]
    parts = partition_balanced(weights=weights, num_parts=pp)
    return tuple(tuple(i - 2 for i in range(parts[s], parts[s + 1]) if 2 <= i < 2 + n_layer) for s in range(pp))


@lru_cache(maxsize=256)
def _sharded_shapes(cfg_json: str, tp: int, tp_rank: int) -> Tuple[Tuple[str, Tuple[int, ...]], ...]:

    # torch: only for tensor-parallel shapes; `gptdist plan` starts without it
    from gptdist.model import GPT
    from gptdist.parallel.tp.comm import ShapeGroup

    cfg = GPTConfig.model_validate_json(cfg_json)
    model = GPT(cfg, seed=None, device="meta")
    if tp > 1:
        # torch: as above
        from gptdist.parallel.tp.plan import shard_structure

        shard_structure(model, ShapeGroup(tp, tp_rank))
    return tuple((name, tuple(p.shape)) for name, p in model.named_parameters())


def rank_params(cfg: GPTConfig, tp: int, pp: int, stage: int, tp_rank: int = 0) -> RankParams:
    return _rank_params(cfg.model_dump_json(), tp, pp, stage, tp_rank)


@lru_cache(maxsize=1024)
def _rank_params(cfg_json: str, tp: int, pp: int, stage: int, tp_rank: int) -> RankParams:
    cfg = GPTConfig.model_validate_json(cfg_json)
    shapes = _sharded_shapes(cfg_json, tp, tp_rank)
    blocks = stage_blocks(cfg.n_layer, pp)[stage]
    first, last = stage == 0, stage == pp - 1
    wanted = set(f"blocks.{i}." for i in blocks)

    def held(name: str) -> bool:
        if name.startswith("blocks."):
            return name[: name.index(".", 7) + 1] in wanted
        if pp == 1:
            return True
        if name.startswith("embed."):
            return first
        return last  # ln_f (and lm_head, which a pipeline refuses)

    chosen = [(n, s) for n, s in shapes if held(n)]
    tied = 0
    if pp > 1:
        # In the order a PipelineModule lists them (ZeRO flattens in that order): its tied modules first (the
        # token embedding, on the first and on the last stage), then its layers.
        wte = dict(shapes)["embed.wte.weight"]
        chosen = [(n, s) for n, s in chosen if n != "embed.wte.weight"]
        if first:
            chosen.insert(0, ("embed.wte.weight", wte))
        if last:
            chosen.insert(0, ("embed.wte.weight (tied copy)", wte))
            tied = _numel(wte)
    decay = tuple(_numel(s) for _, s in chosen if len(s) >= 2)
    no_decay = tuple(_numel(s) for _, s in chosen if len(s) < 2)
    return RankParams(stage, pp, blocks, decay, no_decay, tuple(n for n, _ in chosen), tied)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
