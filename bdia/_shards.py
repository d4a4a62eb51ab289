"""How a run's work is split across torchrun ranks: rank ``r`` of ``world_size`` takes
``items[r::world_size]`` (in batches where there are batches). Shared by ``bdia.generate``
(seeds), ``bdia.metrics.fid`` (images) and the command line's ``invert --images`` and
``sample --latents`` (files)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

__all__ = ["check_share", "share_of"]

T = TypeVar("T")


def check_share(batch: int, rank: int, world_size: int) -> None:
    """Refuse a batch size or rank that would otherwise split the work wrongly, silently.

    Raises:
        ValueError: ``batch`` below 1, ``world_size`` below 1, or ``rank`` outside
            ``0..world_size - 1`` (slicing ``[rank::world_size]`` would then take another
            rank's items, or some twice).
    """
    if batch < 1:
        raise ValueError(f"batch must be 1 or more, got {batch}")
    if world_size < 1:
        raise ValueError(f"world_size must be 1 or more, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(
            f"rank must lie in 0..{world_size - 1} (world_size {world_size}), got {rank}"
        )


def share_of(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank ``rank``'s items, ``items[rank::world_size]``, for work done one item at a time
    (empty where there are fewer items than ranks).

    Raises:
        ValueError: as ``check_share``, for ``world_size`` below 1 or ``rank`` outside
            ``0..world_size - 1``.
    """
    check_share(1, rank, world_size)
    return list(items[rank::world_size])
