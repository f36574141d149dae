"""Several processes, one run: ``torch.distributed`` as ``torchrun`` (or any launcher setting
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``) starts it.

Training is data-parallel: the loss module ``objective(model, guide)`` is wrapped in
``DistributedDataParallel``, every rank takes a disjoint slice of each global batch of a
permutation all ranks share, and rank 0 alone writes the run. Evaluation is sharded by
fixed blocks of points, each seeded by its index, so the gathered result is the same for any
number of processes. gloo on the CPU, NCCL on GPUs (one device per local rank).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from pyrovae.inference.errors import PyrovaeError

__all__ = [
    "all_reduce_sum",
    "derived_seed",
    "gather_blocks",
    "is_main_process",
    "launched",
    "process_group",
    "rank_and_world",
]

T = TypeVar("T")


def launched() -> bool:
    """Whether a launcher started this process as one of several (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """Rank 0 of a process group, or of a launcher's environment (``RANK``), or the only
    process: the one that writes files and prints."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialized process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """Joins the process group the launcher's environment describes, for the duration, and
    yields this rank's device (``cuda:LOCAL_RANK`` on GPUs). Without a launcher, or inside
    a group that is already initialized, it changes nothing.

    Raises:
        PyrovaeError: the launcher's environment is incomplete.
    """
    if not launched() or (dist.is_available() and dist.is_initialized()):
        yield device
        return
    missing = [
        v for v in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ
    ]
    if missing:
        raise PyrovaeError(
            f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {', '.join(missing)} is unset; "
            "start the command with torchrun, which sets them"
        )
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of ``tensor`` (itself on one process)."""
    if rank_and_world()[1] > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def shared_seed(device: torch.device) -> int:
    """Rank 0's seed (``torch.initial_seed()``, what ``pyro.set_rng_seed`` set), the same on
    every rank, so that ranks seeded differently (or not at all) still share the shuffle."""
    seed = torch.tensor([torch.initial_seed() % 2**62], dtype=torch.int64, device=device)
    if rank_and_world()[1] > 1:
        dist.broadcast(seed, src=0)
    return int(seed.item())


def derived_seed(seed: int, index: int) -> int:
    """The seed of part ``index`` (a rank's draws, an evaluation block) of work seeded by
    ``seed``: the one rule, so that parts never share a stream and reruns repeat them."""
    return (seed + 7919 * index) % 2**32


def gather_blocks(
    blocks: Sequence[T], compute: Callable[[int, T], Any], seed: Callable[[int], None]
) -> list[Any]:
    """Computes ``compute(index, block)`` for every block, each after ``seed(index)``,
    blocks dealt round-robin over the ranks, and gives every rank all results in order."""
    rank, world = rank_and_world()
    mine = {}
    for i, block in enumerate(blocks):
        if i % world == rank:
            seed(i)
            mine[i] = compute(i, block)
    if world == 1:
        return [mine[i] for i in range(len(blocks))]
    gathered: list[dict[int, Any]] = [{} for _ in range(world)]
    dist.all_gather_object(gathered, {i: _to_cpu(r) for i, r in mine.items()})
    merged = {i: r for part in gathered for i, r in part.items()}
    return [merged[i] for i in range(len(blocks))]


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if hasattr(value, "__dataclass_fields__"):
        return type(value)(**{k: _to_cpu(getattr(value, k)) for k in value.__dataclass_fields__})
    return value
