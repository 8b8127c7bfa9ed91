"""Shard ucp.demo_model.TinyLlama with the real torch framework and dump what each rank holds.

Run under torchrun (gloo, CPU)::

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 4 tests/dist/dtensor_shards.py OUT fsdp2 2d

For every layout named on the command line (``fsdp2``: FSDP2 ``fully_shard`` over a 1-D
("dp",) mesh; ``tp``: ``parallelize_module`` over a 1-D ("tp",) mesh; ``2d``: TP over
"tp" then FSDP2 over "dp" of a (dp=2, tp=2) mesh, the torchtitan recipe) a fresh model is
built with the same seed on every rank and sharded; rank ``r`` then writes
``OUT/<layout>/rank<r>.pt`` = ``{"locals": {name: local tensor}, "placements": {name: str},
"mesh": {axis: coordinate}}`` and rank 0 also writes ``OUT/<layout>/full.pt`` =
``{name: unsharded tensor}`` (the state dict before sharding; every rank checks that
``full_tensor()`` gives it back).
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate

from ucp.demo_model import TinyConfig, TinyLlama

SEED = 1234


def build() -> TinyLlama:
    torch.manual_seed(SEED)
    m = TinyLlama(TinyConfig())
    # RMSNorm weights start at ones: make them distinct so a wrong slice cannot pass.
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn(p.shape))
    return m


def apply_tp(model: TinyLlama, mesh) -> None:
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    plan = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
            "lm_head": ColwiseParallel()}
    for i in range(len(model.model.layers)):
        p = f"model.layers.{i}."
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "mlp.gate_proj", "mlp.up_proj"):
            plan[p + proj] = ColwiseParallel()
        plan[p + "self_attn.o_proj"] = RowwiseParallel()
        plan[p + "mlp.down_proj"] = RowwiseParallel()
    parallelize_module(model, mesh, plan)


def apply_fsdp2(model: TinyLlama, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    for blk in model.model.layers:
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)


def run(layout: str, out: str) -> None:
    world = dist.get_world_size()
    rank = dist.get_rank()
    model = build()
    full = {n: t.detach().clone() for n, t in model.state_dict().items()}
    if layout == "fsdp2":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
        apply_fsdp2(model, mesh)
    elif layout == "tp":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        apply_tp(model, mesh)
    elif layout == "2d":
        if world % 2:
            raise SystemExit("2d needs an even world size (dp x tp with tp=2)")
        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
        apply_tp(model, mesh["tp"])
        apply_fsdp2(model, mesh["dp"])
    else:
        raise SystemExit(f"unknown layout {layout!r}")
    coords = {name: mesh.get_local_rank(name) for name in mesh.mesh_dim_names}
    locals_, placements = {}, {}
    for n, p in model.named_parameters():
        if isinstance(p, DTensor):
            locals_[n] = p.to_local().detach().clone().contiguous()
            placements[n] = f"{p.device_mesh.mesh_dim_names}{tuple(p.placements)}"
            ft = p.full_tensor().detach()
            if not torch.equal(ft, full[n]):
                raise AssertionError(f"rank {rank}: {n}: full_tensor() differs from the original")
        else:
            locals_[n] = p.detach().clone()
            placements[n] = "plain"
    if set(locals_) != set(full):
        raise AssertionError(f"parameter names differ from the state dict: {set(locals_) ^ set(full)}")
    d = os.path.join(out, layout)
    os.makedirs(d, exist_ok=True)
    torch.save({"locals": locals_, "placements": placements, "mesh": coords},
               os.path.join(d, f"rank{rank}.pt"))
    if rank == 0:
        torch.save(full, os.path.join(d, "full.pt"))
    dist.barrier()


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit("usage: dtensor_shards.py OUT LAYOUT [LAYOUT ...]  (fsdp2, tp, 2d)")
    out, layouts = argv[0], argv[1:]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    for layout in layouts:
        run(layout, out)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
