"""Process-group set-up shared by every job that runs under torchrun (MPM training, mmdet segmentation).

A leaf module: one process per GPU (NCCL), or gloo on CPU; multi-node through torchrun's rendezvous.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun: init the process group (NCCL on GPU, else gloo)."""
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def teardown() -> None:
    """Close the process group a torchrun job opened (NCCL warns about leaked resources otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process of a torchrun job (no-op in a single process): e.g. until rank 0 has written a shared input."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
