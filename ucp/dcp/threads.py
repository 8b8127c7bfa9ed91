"""How many threads a rank's reader or writer runs: one rule for both."""
from __future__ import annotations

import os

from ucp.format.store import make_store


#: threads per rank of a UniversalReader or UniversalWriter at most (and on object stores)
MAX_RANK_THREADS = 4


def rank_threads(path, storage_options=None) -> int:
    """Reader or writer threads per rank when not given. Object stores: :data:`MAX_RANK_THREADS`
    (their requests wait on the network). Local files: the cores this process may run on shared
    among the ranks of this node (``LOCAL_WORLD_SIZE``, set by torchrun), at least 1: a warm read
    or a write into the page cache is memory copies and crc32c, and threads beyond the cores only
    queue for them and for the GIL (4 ranks of 4 threads on 2 cores, each thread handing the GIL
    back and forth around every read or write)."""
    if make_store(str(path), storage_options).parallel_reads:
        return MAX_RANK_THREADS
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, min(MAX_RANK_THREADS, cores // local))
