"""One process or many: the process group from torchrun's environment, and the few collective helpers used.

Under ``torchrun --nproc_per_node=N`` the variables ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` are set;
:func:`setup` then joins the process group (``nccl`` on GPUs, ``gloo`` on CPU). Without them everything
runs in one process and the helpers do nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Distributed", "convert_sync_batchnorm", "setup"]


@dataclass(frozen=True)
class Distributed:
    """Where this process stands: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) writes files and shows progress."""
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all processes (in place) and return it; identity in one process."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_object(self, value: object) -> object:
        """Rank 0's ``value`` on every process."""
        if not self.enabled:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Give every process rank 0's buffers (BatchNorm running statistics drift apart between the
        broadcasts DistributedDataParallel makes at each forward)."""
        if self.enabled:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def shutdown(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _pick_device(requested: str | None, local_rank: int) -> torch.device:
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {requested!r} requested but CUDA is not available (use --device cpu)")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def setup(device: str | None = None) -> Distributed:
    """Join the process group when launched by torchrun; pick this process's device.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ... or None for CUDA when available. Under torchrun a
            bare ``"cuda"`` means ``cuda:LOCAL_RANK``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = _pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank, device=chosen)


def convert_sync_batchnorm(model: torch.nn.Module) -> tuple[torch.nn.Module, int]:
    """``model`` with every BatchNorm replaced by :class:`torch.nn.SyncBatchNorm` (statistics computed over the
    batches of all processes); returns it and the number of layers converted."""
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return converted, sum(isinstance(module, torch.nn.SyncBatchNorm) for module in converted.modules())
