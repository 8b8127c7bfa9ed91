"""Load universal checkpoints into live torch layouts through ``ucp.dcp.UniversalReader``.

Run under torchrun (gloo, CPU)::

    torchrun --nproc_per_node N tests/dist/dcp_load.py OUT LAYOUT JOB [JOB ...]

``LAYOUT``: ``fsdp``, ``tp``, ``2d`` or ``none`` (see ``ucp.demo_dcp.parallelize``). Each
``JOB`` is ``TAG=VARIANT:UNIVERSAL:REFERENCE[:resume]`` (``UNIVERSAL`` may also be a stock DCP
directory, read with DCP's ``FileSystemReader``): build ``VARIANT`` (``plain`` / ``tf``; ``ds``:
the DeepSpeed fixtures' Llama, ``ucp.demo_deepspeed``, with its two param groups, only in the
``2d`` layout) with a different seed than the saved run, shard it, initialise the optimizer
(``get_state_dict``), ``dcp.load`` from ``UNIVERSAL`` and compare every model tensor, every
optimizer state (``step`` included) and every hyper-parameter with ``REFERENCE`` (DCP's own
``dcp_to_torch_save`` consolidation of the original checkpoint):

* sharded tensors: this rank's local shard equals the reference cut by DTensor itself
  (``distribute_tensor(reference, mesh, placements).to_local()``; for ``_StridedShard`` the
  box DTensor computes for the rank) and ``full_tensor()`` equals the
  reference (bitwise, as integers);
* plain tensors (replicated, scalars): equal to the reference bitwise.

With ``:titan`` (and ``:no-train-state``, for a checkpoint saved otherwise) the job loads as torchtitan does (``UniversalReader(keys="torchtitan")``: the
model's keys at the top level, the flattened optimizer under ``optimizer``, ``train_state``), sets
the model and optimizer from it and compares their ``get_state_dict`` with ``REFERENCE``.
With ``:resume`` the loaded state goes into the model and optimizer (``set_state_dict``) and
training continues for the steps recorded in ``<UNIVERSAL>/../losses.json``. Rank 0 writes
``OUT/<TAG>.json``: every rank's mismatches, counts, bytes read / needed and losses.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     get_state_dict, set_model_state_dict, set_optimizer_state_dict,
                                                     set_state_dict)
from torch.distributed.tensor import DTensor, distribute_tensor

from torch.distributed.checkpoint import FileSystemReader

from ucp.dcp import UniversalReader
from ucp.sources._dcpfiles import is_dcp_dir
from ucp.demo_dcp import GPTConfig, build, optimizer, parallelize, train_step

VARIANTS = {"plain": GPTConfig(), "tf": GPTConfig(tied=True, frozen=True)}


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def expected_local(ref: torch.Tensor, got: DTensor) -> torch.Tensor:
    """This rank's shard of ``ref`` under ``got``'s placements, by DTensor's own rules:
    ``distribute_tensor``, or for ``_StridedShard`` (which it does not take) the box DTensor
    computes for the rank (``compute_local_shape_and_global_offset``, what DCP itself uses)."""
    if not any(type(p).__name__ == "_StridedShard" for p in got.placements):
        return distribute_tensor(ref, got.device_mesh, got.placements).to_local()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(ref.shape, got.device_mesh, got.placements)
    return ref[tuple(slice(o, o + n) for o, n in zip(offset, shape))]


def check_tensor(key: str, got, ref: torch.Tensor, bad: list, counts: dict) -> None:
    if isinstance(got, DTensor):
        counts["sharded"] += 1
        want = expected_local(ref, got)
        if not same(got.to_local(), want):
            bad.append(f"{key}: local shard differs (placements {got.placements})")
        if not same(got.full_tensor(), ref):
            bad.append(f"{key}: full_tensor differs")
    else:
        counts["plain"] += 1
        if not same(got, ref):
            bad.append(f"{key}: differs ({tuple(got.shape)} {got.dtype} vs {tuple(ref.shape)} {ref.dtype})")


def plain(v):
    """Hyper-parameters as JSON stores them (tuples as lists)."""
    if isinstance(v, (tuple, list)):
        return [plain(x) for x in v]
    return v


def compare(sd: dict, ref: dict) -> tuple[list, dict]:
    bad, counts = [], {"sharded": 0, "plain": 0, "hyper": 0}
    if set(sd["model"]) != set(ref["model"]):
        bad.append(f"model keys differ: {sorted(set(sd['model']) ^ set(ref['model']))}")
    for k in sorted(set(sd["model"]) & set(ref["model"])):
        check_tensor(f"model.{k}", sd["model"][k], ref["model"][k], bad, counts)
    rs, gs = ref["optim"]["state"], sd["optim"]["state"]
    if set(gs) != set(rs):
        bad.append(f"optimizer state params differ: {sorted(set(gs) ^ set(rs))}")
    for p in sorted(set(gs) & set(rs)):
        if set(gs[p]) != set(rs[p]):
            bad.append(f"optim.state.{p}: states {sorted(gs[p])} vs {sorted(rs[p])}")
        for s in sorted(set(gs[p]) & set(rs[p])):
            check_tensor(f"optim.state.{p}.{s}", gs[p][s], rs[p][s], bad, counts)
    gg, rg = sd["optim"]["param_groups"], ref["optim"]["param_groups"]
    if len(gg) != len(rg):
        bad.append(f"{len(gg)} param groups vs {len(rg)}")
    for i, (g, r) in enumerate(zip(gg, rg)):
        for k in sorted(set(g) | set(r)):
            counts["hyper"] += 1
            if plain(g.get(k)) != plain(r.get(k)):
                bad.append(f"param_groups[{i}][{k!r}]: {g.get(k)!r} vs {r.get(k)!r}")
    return bad, counts


def build_llama_2d():
    """The DeepSpeed fixtures' Llama (GQA, SwiGLU, biases, vocab 1003) on a (dp, tp=2) mesh:
    column-wise q/k/v/gate/up, row-wise o/down, then FSDP2 over dp; AdamW over its two groups."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from ucp.demo_deepspeed import build_model, param_groups

    torch.manual_seed(99)
    model = build_model(tied=False, frozen=False)
    with torch.no_grad():                       # not the saved values, so a missed load shows
        for p in model.parameters():
            p.normal_()
    mesh = init_device_mesh("cpu", (dist.get_world_size() // 2, 2), mesh_dim_names=("dp", "tp"))
    plan = {}
    for i in range(len(model.model.layers)):
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[f"model.layers.{i}.{n}"] = ColwiseParallel()
        for n in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"model.layers.{i}.{n}"] = RowwiseParallel()
    parallelize_module(model, mesh["tp"], plan)
    for blk in model.model.layers:
        fully_shard(blk, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    opt = torch.optim.AdamW(param_groups(model), lr=1.0, betas=(0.5, 0.5), eps=1.0, weight_decay=0.5)
    return model, opt


def load_as_torchtitan(model, opt, reader, train_state: bool) -> list:
    """torchtitan's resume: ``dcp.load`` of its state dict (``train_state`` too, unless excluded
    from loading, as a checkpoint from elsewhere has none), then the model and the optimizer set
    from it (flattened optimizer state dict). Returns what is wrong with ``train_state``."""
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    sd = {**get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt, options=flat)}
    if train_state:
        sd["train_state"] = {"step": torch.tensor(-1, dtype=torch.int32)}
    dcp.load(sd, storage_reader=reader)
    optim = sd.pop("optimizer")
    step = sd.pop("train_state", {"step": torch.tensor(2, dtype=torch.int32)})["step"]
    set_model_state_dict(model, sd)
    set_optimizer_state_dict(model, opt, optim, options=flat)
    return [] if step.dtype == torch.int32 and step.item() == 2 else [f"train_state.step: {step!r}"]


def run_job(out: str, layout: str, job: str) -> dict:
    tag, spec = job.split("=", 1)
    variant, universal, reference, *flags = spec.split(":")
    if variant == "ds":
        model, opt = build_llama_2d()
    else:
        model = build(VARIANTS[variant], seed=99)
        dp = parallelize(model, layout)
        opt = optimizer(model)
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    # a stock DCP directory (an export --to dcp) loads with DCP's own reader, for comparison
    reader = FileSystemReader(universal) if is_dcp_dir(universal) else \
        UniversalReader(universal, keys="torchtitan" if "titan" in flags else None)
    extra = []
    if "titan" in flags:
        extra = load_as_torchtitan(model, opt, reader, train_state="no-train-state" not in flags)
        msd, osd = get_state_dict(model, opt)
        sd = {"model": msd, "optim": osd}
    else:
        dcp.load(sd, storage_reader=reader)
    ref = torch.load(reference, weights_only=True)
    bad, counts = compare(sd, ref)
    bad += extra
    rep = {"bad": bad, "counts": counts, "bytes_read": getattr(reader, "bytes_read", None),
           "bytes_needed": getattr(reader, "bytes_needed", None)}
    if "resume" in flags:
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        with open(os.path.join(os.path.dirname(universal), "losses.json")) as f:
            start = json.load(f)["start"]
        rep["losses"] = [train_step(model, opt, s, *dp) for s in range(start, start + 3)]
    got = [None] * dist.get_world_size()
    dist.all_gather_object(got, rep)
    if dist.get_rank() == 0:
        with open(f"{out}/{tag}.json", "w") as f:
            json.dump({"layout": layout, "world": dist.get_world_size(), "ranks": got}, f)
    return rep


def main() -> None:
    out, layout, jobs = sys.argv[1], sys.argv[2], sys.argv[3:]
    dist.init_process_group("gloo")
    for job in jobs:
        run_job(out, layout, job)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
