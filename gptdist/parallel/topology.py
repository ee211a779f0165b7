"""One object for where every rank sits in the tp x pp x dp grid, and the process groups of each axis.

Coordinates come from DeepSpeed's PipeModelDataParallelTopology (axes pipe, data, model; model = tensor
parallel varies fastest, so a node's GPUs share TP traffic). The object is also the `mpu` that DeepSpeed's plain
engine expects (pp = 1). With a pipeline, DeepSpeed builds its own grid from `self.topo` and refuses `mpu=`; our
tensor-parallel layers keep using the groups made here, which hold the same ranks.
"""

from __future__ import annotations

from typing import Dict, List

import torch.distributed as dist

from gptdist.parallel.layout import Layout


class Topology:
    def __init__(self, layout: Layout, rank: int):
        # deepspeed: slow to import, only when a topology is built
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        self.layout = layout
        self.topo = PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp)
        coord = self.topo.get_coord(rank)
        self.rank = rank
        self.tp_rank, self.pp_rank, self.dp_rank = coord.model, coord.pipe, coord.data
        # Every rank must create every group, in the same order, even the groups it is not part of.
        self._groups: Dict[str, dist.ProcessGroup] = {}
        self._group_ranks: Dict[str, List[int]] = {}
        for axis in ("model", "data", "pipe"):
            for ranks in self.topo.get_axis_comm_lists(axis):
                group = dist.new_group(ranks)
                if rank in ranks:
                    self._groups[axis], self._group_ranks[axis] = group, ranks

    # ---- gptdist's names
    @property
    def tp_group(self) -> dist.ProcessGroup:
        return self._groups["model"]

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self._groups["data"]

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self._groups["pipe"]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1

    @property
    def needs_data(self) -> bool:
        return self.reads_data(self.rank)

    def reads_data(self, rank: int) -> bool:
        """Only the first stage (inputs) and the last (targets) read batches."""
        return self.topo.get_coord(rank).pipe in (0, self.layout.pp - 1)

    # ---- DeepSpeed's mpu interface (pp = 1, where "model parallel" means tensor parallel)
    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.layout.tp

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._group_ranks["model"][0]

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.layout.dp

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.dp_group

    def get_data_parallel_group_ranks(self) -> List[int]:
        return list(self._group_ranks["data"])

    def get_pipe_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipe_parallel_world_size(self) -> int:
        return self.layout.pp

    def get_pipe_parallel_group(self) -> dist.ProcessGroup:
        return self.pp_group

    get_pipeline_model_parallel_rank = get_pipe_parallel_rank
    get_pipeline_model_parallel_world_size = get_pipe_parallel_world_size
    get_pipeline_model_parallel_group = get_pipe_parallel_group
