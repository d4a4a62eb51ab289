"""torchrun's process group for the commands. Each command calls these through the module
(``_ranks.rank_and_world()``), so that one function replaced here (as the tests stand in for
the group) is replaced for every command."""

from __future__ import annotations

import os

import torch


def rank_and_world() -> tuple[int, int]:
    """(rank, world size), joining the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            # NCCL and pinned-memory copies work on the current device, which is cuda:0 in
            # every process unless each one selects its own.
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        # Gloo beside NCCL: a run given --device cpu on a CUDA machine reduces CPU tensors,
        # which NCCL cannot.
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def wait_for_ranks(world: int, leave: bool = False) -> None:
    """Return once every rank of ``rank_and_world()``'s group has got here (at once when
    ``world`` is 1); with ``leave``, then leave the group, whose work is done, so that rank 0
    reports only what every rank has finished."""
    if world == 1:
        return
    import torch.distributed as dist

    dist.barrier()
    if leave:
        dist.destroy_process_group()


def rank_zero_alone() -> bool:
    """Leave work that is not split across torchrun ranks to rank 0: every rank joins
    ``rank_and_world()``'s group and leaves it at once. True on rank 0 (and in one process),
    which then works alone; another rank has nothing left to do.

    Leaving before the work, not after it, spares the other ranks a wait in the group that
    could outlast its timeout.
    """
    rank, world = rank_and_world()
    wait_for_ranks(world, leave=True)
    return rank == 0
