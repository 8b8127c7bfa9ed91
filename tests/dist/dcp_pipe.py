"""Pipeline stages saved through DCP, as torchtitan saves them: each rank holds one stage of
TinyGPT (the model with the other stage's modules replaced by ``nn.Identity``, so every name stays
the full model's), its own AdamW over its parameters (two groups), and saves
``get_state_dict(..., flatten_optimizer_state_dict=True)``: stage optimizers number their groups
from 0 each, so only the per-parameter form keeps them apart. Saved by DCP's FileSystemWriter (the
reference) and by ``UniversalWriter``.

Usage: torchrun --nproc_per_node 2 dcp_pipe.py OUT
"""
import os
import sys

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from ucp.dcp import UniversalWriter
from ucp.demo_dcp import GPTConfig, build, optimizer

STAGES = {0: ("blocks.1", "ln_f", "head"), 1: ("embed", "blocks.0")}   # what each stage leaves out


def stage(rank: int) -> nn.Module:
    model = build(GPTConfig())
    for name in STAGES[rank]:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        if isinstance(owner, nn.ModuleList):
            owner[int(child)] = nn.Identity()
        else:
            setattr(owner, child, nn.Identity())
    return model


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = stage(rank)
    opt = optimizer(model)
    for step in range(2):   # a stand-in loss per stage: the layout, not the training, is under test
        loss = sum(((p - 0.5 * step) ** 2).sum() for p in model.parameters())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
    sd = {"model": msd, "optim": osd}
    dcp.save(sd, checkpoint_id=f"{out}/dcp")
    dcp.save(sd, storage_writer=UniversalWriter(f"{out}/uw"))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
