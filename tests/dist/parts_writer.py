"""torchrun script: every rank writes its row block of shared arrays (torch.chunk split, so
chunks straddle ranks) plus parameters of its own, then one collective commit.

Usage: torchrun --nproc_per_node N parts_writer.py OUT [fail-rank]
"""
import os
import sys

import torch
import torch.distributed as dist

from ucp.format import commit_distributed, create_distributed, split_boxes
from ucp.errors import UcpError


def full_tensors(world):
    g = torch.Generator().manual_seed(7)
    shared = {"emb.weight": torch.randn(1003, 96, generator=g),
              "big.weight": torch.randn(700, 513, generator=g).to(torch.bfloat16)}
    own = {f"rank{r}.bias": torch.randn(17 + r, generator=g) for r in range(world)}
    return shared, own


def main():
    out, fail = sys.argv[1], (int(sys.argv[2]) if len(sys.argv) > 2 else -1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    shared, own = full_tensors(world)
    w = create_distributed(out, inner_bytes=32 << 10, shard_bytes=256 << 10)
    for name, t in shared.items():
        w.add_param(name)
        a = w.add_array(name, "param", tuple(t.shape), t.dtype)
        start, stop = split_boxes(tuple(t.shape), world, dim=0, mode="chunk")[rank]
        box = t[tuple(slice(x, y) for x, y in zip(start, stop))]
        if box.numel():
            a.write(tuple(start), box.contiguous())
    name = f"rank{rank}.bias"
    w.add_param(name)
    if rank != fail:  # the failing rank leaves its parameter unwritten
        w.write_tensor(name, "param", own[name])
    else:
        w.add_array(name, "param", tuple(own[name].shape), own[name].dtype)
    try:
        res = commit_distributed(w, metadata={"iteration": 11, "world": world})
        status = f"ok {res}"
    except UcpError as e:
        status = f"error {e}"
    with open(os.path.join(os.path.dirname(out), f"status{rank}.txt"), "w") as f:
        f.write(status)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
