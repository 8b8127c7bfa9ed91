"""Helpers every benchmark shares: a free port for torchrun, dropping the page cache.

Standard library only, and no ``import ucp``: a benchmark that runs one job with the ``ucp``
of another checkout (``--compare-with``, an A/B of two versions in one run) imports this first,
before it puts the checkout under test on ``sys.path``.
"""
from __future__ import annotations

import os
import socket


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
