"""The torchrun side of the engine: which process of a job this is."""
from __future__ import annotations

import os


def torchrun_rank() -> tuple[int, int] | None:
    """(rank, world size) when this process is one of several started by torchrun, else None.

    The process group is created here (gloo: conversion moves bytes between files, not
    GPUs) unless the caller already made one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "MASTER_ADDR" not in os.environ:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()
