"""Reading source boxes while earlier boxes are written: a bounded, in-order window of tasks.

A conversion moves each box twice: the source reads it (page faults of a memory-mapped rank
file, a byte range of a safetensors or ``.distcp`` file, replicas averaged) and the writer
stages, checksums and writes it. Done one after the other in one thread, the disk idles while
the CPU works and the CPU idles while the disk works. ``BoxPipeline`` runs each box's read and
write as one task on a few threads, so the next boxes are read while earlier ones are written.

What bounds it:
- memory: at most ``budget`` bytes of boxes in flight (submitted, not yet written); a box larger
  than the budget runs alone, as it would without the pipeline;
- order: at most ``window`` tasks in flight, and a new task waits for the OLDEST one. A task
  that stalls stops the conversion within ``window`` boxes of it, never lets the rest run past
  it, and the first error is raised in the order the boxes were given;
- the source: ``source.read`` is called by one thread at a time unless the source declares
  ``concurrent_reads = True``; reads and writes of different boxes still overlap.
"""
from __future__ import annotations

import collections
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

#: Boxes read ahead of the one being written (tasks in flight, at most).
WINDOW = 4
#: Bytes of boxes in flight, at most (one larger box runs alone). Reads from the page cache
#: keep up with writes with a short queue: on the 628 MiB DeepSpeed bench 64 MiB gave peak RSS
#: 372-401 MiB and 22-29k page faults against 551-613 MiB and 36-37k with 256 MiB, at no more CPU.
BUDGET_BYTES = 64 << 20


class BoxPipeline:
    """``submit(nbytes, read, write)`` runs ``write(read())`` on a worker thread; ``close``
    waits for every task and raises the first error. Use as a context manager; leaving it on
    an exception drops the tasks not started and waits for the running ones."""

    def __init__(self, window: int | None = None, budget: int | None = None, concurrent_reads: bool = False):
        self.window = max(1, int(WINDOW if window is None else window))
        self.budget = max(1, int(BUDGET_BYTES if budget is None else budget))
        self._pool = ThreadPoolExecutor(self.window, thread_name_prefix="ucp-box") if self.window > 1 else None
        self._in_flight: collections.deque = collections.deque()  # (future, nbytes), oldest first
        self._bytes = 0
        self._read_lock = contextlib.nullcontext() if concurrent_reads else threading.Lock()
        self.peak_bytes = 0  # the most bytes that were in flight at once (for tests and benches)

    def submit(self, nbytes: int, read: Callable[[], object], write: Callable[[object], None]) -> None:
        """Queue one box: ``read()`` gives it, ``write(box)`` stores it. Blocks while the window
        or the byte budget is full, until the oldest task is done (raising its error)."""
        if self._pool is None:
            write(read())
            return
        while self._in_flight and (len(self._in_flight) >= self.window or self._bytes + nbytes > self.budget):
            self._retire_oldest()
        future = self._pool.submit(self._run, read, write)
        self._in_flight.append((future, nbytes))
        self._bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self._bytes)

    def _run(self, read, write):
        with self._read_lock:
            box = read()
        write(box)

    def _retire_oldest(self):
        future, nbytes = self._in_flight.popleft()
        self._bytes -= nbytes
        future.result()

    def close(self) -> None:
        """Wait for every task, oldest first; raise the first error."""
        while self._in_flight:
            self._retire_oldest()
        self._shutdown()

    def _shutdown(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:  # the error already raised wins; tasks not started are dropped
            self._in_flight.clear()
            self._shutdown()
        return False
