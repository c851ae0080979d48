"""Where this process sits in a tensor × pipeline parallel group.

Global rank r is tensor rank `r % tp` of pipeline stage `r // tp`, so rank 0 is the first stage's
first tensor rank (the engine). Tensor collectives (all-reduce, all-gather) run inside the
stage's own process group; activations move between stages point to point. Without
torch.distributed initialised this is one rank of one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ParallelState:
    tp: int = 1
    pp: int = 1
    rank: int = 0
    tp_group: object | None = None  # this stage's tensor group (None: the default group)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp

    def peer(self, stage: int) -> int:
        """Global rank of this tensor rank's twin on another stage."""
        return stage * self.tp + self.tp_rank


_state = ParallelState()


def init_parallel(tensor_parallel: int, pipeline_parallel: int) -> ParallelState:
    """After `init_process_group`: build one tensor group per stage (every rank creates every group,
    as torch.distributed requires) and remember this rank's place."""
    global _state
    world = dist.get_world_size()
    assert world == tensor_parallel * pipeline_parallel, (world, tensor_parallel, pipeline_parallel)
    rank = dist.get_rank()
    tp_group = None
    if pipeline_parallel > 1:
        for stage in range(pipeline_parallel):
            group = dist.new_group(list(range(stage * tensor_parallel, (stage + 1) * tensor_parallel)))
            if stage == rank // tensor_parallel:
                tp_group = group
    _state = ParallelState(tensor_parallel, pipeline_parallel, rank, tp_group)
    return _state


def reset_parallel() -> None:
    global _state
    _state = ParallelState()


def state() -> ParallelState:
    return _state


def tp_rank() -> int:
    return _state.tp_rank


def tp_size() -> int:
    return _state.tp


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _state.tp > 1:
        dist.all_reduce(x, group=_state.tp_group)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate the tensor ranks' slices along the last dimension."""
    if _state.tp == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_state.tp)]
    dist.all_gather(parts, x, group=_state.tp_group)
    return torch.cat(parts, dim=-1)
