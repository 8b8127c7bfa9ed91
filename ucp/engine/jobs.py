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


def agree(failure: str | None, what: str) -> None:
    """Collective: every process of the job raises the same ``UcpError`` listing every
    process's failure (``failure``: this one's, or None), so none goes on alone."""
    import torch.distributed as dist

    from ucp.errors import UcpError

    statuses: list = [None] * dist.get_world_size()
    dist.all_gather_object(statuses, None if failure is None else f"rank {dist.get_rank()}: {failure}")
    failed = [s for s in statuses if s]
    if failed:
        raise UcpError(f"{what} failed:\n  " + "\n  ".join(failed))


def failure_text(e: BaseException) -> str:
    """One line for another process to read: the exception's type and message."""
    return f"{type(e).__name__}: {e}"
