"""torchrun script: a training job that made its own process group calls ucp.

Rank 0 alone first calls ``ucp.export`` / ``ucp.convert`` the usual way (``if rank == 0:``)
without saying who converts (refused at once, no hang), then ``ucp.export`` with
``distributed=False`` (it exports alone). Then every rank calls with ``distributed=True``
(each converts a share, in the caller's group). Rank 0 prints one line per step.

Usage: torchrun --nproc_per_node 2 caller_group.py RANK_FILES UNIVERSAL OUT
"""
import json
import sys

import torch.distributed as dist

import ucp
from ucp.errors import UcpError


def refused(step: str, call) -> None:
    try:
        call()
        print(f"{step}: no error", flush=True)
    except UcpError as e:
        print(f"{step}: UcpError {json.dumps(str(e))}", flush=True)


def main():
    src, uni, out = sys.argv[1:4]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank == 0:
        refused("export default", lambda: ucp.export(uni, f"{out}/default", "ranks", degrees={"tp": 3}))
        refused("convert default", lambda: ucp.convert(src, f"{out}/default-uni"))
        ucp.export(uni, f"{out}/alone", "ranks", degrees={"tp": 3}, distributed=False)
        print("alone: exported", flush=True)
    dist.barrier()
    ucp.export(uni, f"{out}/shared", "ranks", degrees={"tp": 3}, distributed=True)
    ucp.convert(src, f"{out}/shared-uni", distributed=True)
    if rank == 0:
        print(f"shared: done, group kept: {dist.is_initialized() and dist.get_world_size()}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
