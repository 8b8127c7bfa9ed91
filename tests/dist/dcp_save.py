"""Train ucp.demo_dcp.TinyGPT under real torch layouts and save it with DCP, both ways.

Run under torchrun (gloo, CPU), 4 ranks::

    torchrun --nproc_per_node 4 tests/dist/dcp_save.py OUT

For each case ``<layout>-<variant>`` (``fsdp-plain``, ``fsdp-tf`` = tied + frozen, ``2d-plain``
= dp2 x tp2, ``tpdp-plain`` = TP=2 with identical dp replicas, i.e. a TP x2 checkpoint) the
model is built with the same seed on every rank, sharded, trained ``STEPS`` AdamW steps, and
the same ``get_state_dict`` state is saved with

* ``OUT/<case>/dcp``  DCP's ``FileSystemWriter`` (the reference: tests consolidate it with
  ``format_utils.dcp_to_torch_save``),
* ``OUT/<case>/uw``   ``dcp.save`` with ``ucp.dcp.UniversalWriter``,
* ``OUT/<case>/uwa``  ``dcp.async_save`` with ``UniversalWriter`` (fsdp-plain, 2d-plain),
* ``OUT/fsdp-plain/uw16k``  ``UniversalWriter(chunk_bytes=16 KiB)``: fine chunks for the
  bytes-read checks,
* ``OUT/2d-plain/titan-dcp`` and ``titan-uw``: the same state as torchtitan saves it (the
  model's keys at the top level, the flattened optimizer under ``optimizer``, ``train_state``),
  with ``FileSystemWriter`` and with ``UniversalWriter``.

``fsdp-plain`` then trains ``MORE`` steps more (the uninterrupted run) and rank 0 writes the
losses to ``OUT/fsdp-plain/losses.json``. Last, a save where rank 1 alone holds an entry ucp
refuses to store (an object that is not JSON-able without pickling) must fail on every rank
with DCP's ``CheckpointException`` and leave no manifest: ``OUT/failure.json`` records what
each rank saw.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, get_state_dict)

from ucp.dcp import UniversalWriter
from ucp.demo_dcp import GPTConfig, build, optimizer, parallelize, train_step

STEPS, MORE = 2, 3
VARIANTS = {"plain": GPTConfig(), "tf": GPTConfig(tied=True, frozen=True)}
CASES = [("fsdp", "plain"), ("fsdp", "tf"), ("2d", "plain"), ("tpdp", "plain")]
LAYOUT = {"fsdp": "fsdp", "2d": "2d", "tpdp": "tp-dp"}


def save_case(out: str, layout: str, variant: str) -> None:
    case = f"{layout}-{variant}"
    model = build(VARIANTS[variant])
    dp = parallelize(model, LAYOUT[layout])
    opt = optimizer(model)
    for s in range(STEPS):
        train_step(model, opt, s, *dp)
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    dcp.save(sd, checkpoint_id=f"{out}/{case}/dcp")
    dcp.save(sd, storage_writer=UniversalWriter(f"{out}/{case}/uw"))
    if variant == "plain" and layout in ("fsdp", "2d"):
        dcp.async_save(sd, storage_writer=UniversalWriter(f"{out}/{case}/uwa")).result()
    if case == "2d-plain":
        dcp.save(titan_state(model, opt), checkpoint_id=f"{out}/{case}/titan-dcp")
        dcp.save(titan_state(model, opt), storage_writer=UniversalWriter(f"{out}/{case}/titan-uw"))
    if case == "fsdp-plain":   # small chunks: loads into other layouts read only what they need
        dcp.save(sd, storage_writer=UniversalWriter(f"{out}/{case}/uw16k", chunk_bytes=16 << 10))
        losses = [train_step(model, opt, s, *dp) for s in range(STEPS, STEPS + MORE)]
        if dist.get_rank() == 0:
            with open(f"{out}/{case}/losses.json", "w") as f:
                json.dump({"start": STEPS, "losses": losses}, f)


def titan_state(model, opt) -> dict:
    """The state dict torchtitan's CheckpointManager saves (``ModelWrapper``, ``OptimizersContainer``)."""
    osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
    return {**get_model_state_dict(model), "optimizer": osd,
            "train_state": {"step": torch.tensor(STEPS, dtype=torch.int32)}}


class NotStorable:
    """A value with no JSON form: ucp must refuse it rather than pickle it."""


def record_failed_save(sd: dict, path: str, report: str) -> None:
    """``dcp.save(sd)`` through UniversalWriter(path), expected to fail on every rank: each rank's
    error (or None) and whether a manifest was left, written to ``report`` by rank 0."""
    seen = None
    try:
        dcp.save(sd, storage_writer=UniversalWriter(path))
    except BaseException as e:  # CheckpointException derives from BaseException
        seen = f"{type(e).__module__}.{type(e).__name__}: {str(e)[:2000]}"
    got = [None] * dist.get_world_size()
    dist.all_gather_object(got, seen)
    if dist.get_rank() == 0:
        with open(report, "w") as f:
            json.dump({"errors": got, "manifest": os.path.exists(f"{path}/ucp.manifest.json")}, f)


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    for layout, variant in CASES:
        save_case(out, layout, variant)
    rank = dist.get_rank()
    bad = {"w": torch.arange(8.0) + rank, **({"only_on_rank_1": NotStorable()} if rank == 1 else {})}
    record_failed_save(bad, f"{out}/failed", f"{out}/failure.json")
    # every rank its own directory: rank 0, the coordinator, must not commit a manifest listing
    # the other ranks' files, which are not in its directory
    record_failed_save({"model": {f"w{rank}": torch.arange(8.0) + rank}}, f"{out}/split/{rank}", f"{out}/split.json")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
