"""Helpers every benchmark shares: a free port for torchrun, dropping or filling the page cache,
recording a run's report.

Standard library only, and no ``import ucp``: a benchmark that runs one job with the ``ucp``
of another checkout (``--compare-with``, an A/B of two versions in one run) imports this first,
before it puts the checkout under test on ``sys.path``.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path


def free_port() -> int:
    """A port the kernel just handed out on 127.0.0.1 (bound, then released), one per torchrun
    job: DeepSpeed's CPU shared-memory allreduce also names its buffers by MASTER_PORT, so two
    jobs on one port would share them."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drop_caches() -> bool:
    """Flush dirty pages and drop the page cache (cold reads); False when not allowed (not root)."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def read_tree(path) -> int:
    """Read every file under ``path`` once (into the page cache), returning the bytes read. A warm
    load must find every checkpoint's files cached whoever wrote them: a writer's buffered files
    are cached by the save itself, but files written with O_DIRECT (ucp's large shard files) are
    not, and a load right after such a save would be a cold one."""
    n = 0
    buf = bytearray(16 << 20)
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb", buffering=0) as f:
                while k := f.readinto(buf):
                    n += k
    return n


def record(path, text: str) -> None:
    """Put this run's report at the top of ``path``, above the runs recorded there before: the
    results files keep every sitting (each dated, with its commit and command), and a run with the
    default ``--out`` replaced them (the DeepSpeed sittings were lost that way once, and restored
    from git)."""
    p = Path(path)
    old = p.read_text() if p.exists() else ""
    p.write_text(text.rstrip("\n") + "\n" + ("\n" + old if old.strip() else ""))
