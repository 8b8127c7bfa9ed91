"""One torchrun launch for the demo chapters that need several CPU ranks (DeepSpeed, DCP)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    """A free port per job: DeepSpeed's CPU shared-memory allreduce names its buffers by
    MASTER_ADDR/MASTER_PORT, so two jobs on one port would share them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_module(module: str, nproc: int, *args, env=None) -> None:
    """``python -m module *args`` on ``nproc`` CPU ranks under torchrun, with this ucp importable (the
    demo may run from a checkout that is not installed); raises with the job's stderr on failure."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", module, *map(str, args)]
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {}),
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}")
