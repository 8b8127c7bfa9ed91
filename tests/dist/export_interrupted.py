"""torchrun script: Ctrl-C reaches process 0 of a two-process ``ucp export`` right after it wrote
its first unit (a target that raises KeyboardInterrupt there, as the command line's signal handler
does). Each process runs the command line's ``main`` and prints ``rank R: exit N`` after it.

Usage: torchrun --nproc_per_node 2 export_interrupted.py UNIVERSAL OUT
"""
import os
import sys

import torch.distributed as dist

from ucp.cli import main
from ucp.targets.ranks import RanksTarget


class InterruptedRanks(RanksTarget):
    name = "test-interrupted-ranks"
    description = "test plug-in: rank files, Ctrl-C on process 0 after its first file"

    def write_unit(self, unit, tensors):
        if dist.get_rank() == 0 and self._written:
            raise KeyboardInterrupt
        super().write_unit(unit, tensors)


if __name__ == "__main__":
    uni, out = sys.argv[1:3]
    rc = main(["export", uni, out, "--to", InterruptedRanks.name, "--tp", "4", "-q"])
    print(f"rank {os.environ['RANK']}: exit {rc}", flush=True)
    os._exit(rc)
