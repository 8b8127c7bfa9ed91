"""``ucp demo`` chapter: a small transformer trained under FSDP2 on 4 CPU ranks, saved with
``ucp.dcp.UniversalWriter``, resumed under TP=2 on 2 ranks through ``UniversalReader`` (the
story and its checks live in ``ucp.demo_dcp``)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

TITLE = "torch DCP: FSDP2 x 4 ranks -> dcp.save(UniversalWriter) -> TP x 2 ranks via UniversalReader"


def available() -> bool:
    return importlib.util.find_spec("torch.distributed.checkpoint") is not None


def run(root: Path, quiet: bool) -> bool:
    from ucp.demo_dcp import run_dcp_demo

    return run_dcp_demo(root, quiet=quiet)
