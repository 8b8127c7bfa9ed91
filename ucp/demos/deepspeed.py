"""``ucp demo`` chapter: DeepSpeed ZeRO-2 on 2 ranks -> universal -> ZeRO-3 on 3 ranks, resumed
by DeepSpeed itself (the story and its checks live in ``ucp.demo_deepspeed``)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

TITLE = "DeepSpeed: ZeRO-2 x 2 ranks -> universal -> ZeRO-3 x 3 ranks, loaded by engine.load_checkpoint"


def available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def run(root: Path, quiet: bool) -> bool:
    from ucp.demo_deepspeed import run_chapter

    return run_chapter(root, quiet)
