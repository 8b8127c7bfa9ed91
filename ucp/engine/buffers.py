"""Recycled byte buffers for boxes read from source files (``ReadBuffers``).

Used by the engine for the whole-state buffers it gathers boxes into (``ucp.engine.to_universal``)
and by readers that ``pread`` boxes into fresh memory (``ucp.sources.torchfile.TorchFile``).
"""
from __future__ import annotations

import threading
from collections import deque


class ReadBuffers:
    """Byte buffers for boxes and whole states read from files, recycled once nothing views them.

    Why: a fresh buffer per box costs the kernel a page fault and a page clear per 4 KiB before
    ``preadv`` fills it, and an unmap after (as much CPU as the copy into the page cache that
    writing the box costs). The engine holds a box only until it is written, so the
    buffers a conversion needs at once are about the boxes in flight; this keeps the freed ones
    (up to ``keep`` bytes, best fit) for the next reads. A buffer comes back when the last
    array (or tensor made from it) viewing it goes (CPython frees it then), so no caller has to hand it back.
    Not the store's file buffers (``Store.file_buffer``): those keep four shard-sized
    page-aligned maps handed back explicitly; sharing such a pool left 110-130k page faults on
    the 628 MiB bench against 80k with this one (175k with none).
    """

    def __init__(self, keep: int = 256 << 20):
        self.keep = keep
        self._free: list = []              # numpy uint8 buffers nobody views, smallest first
        self._returned = deque()  # given back by finalizers, not yet sorted into _free
        self._lock = threading.Lock()

    def take(self, n: int):
        """A 1-D uint8 numpy array of ``n`` bytes (contents undefined) over a recycled buffer."""
        import weakref

        import numpy as np

        with self._lock:
            self._sort_returned()
            i = next((i for i, b in enumerate(self._free) if b.size >= n), None)
            buf = self._free.pop(i) if i is not None else None
        if buf is None:
            buf = np.empty(max(n, 1), dtype=np.uint8)
        # over a memoryview, not ``buf[:n]``: numpy gives every array derived from a slice of
        # ``buf`` ``buf`` itself as its base, so the slice could die (and hand ``buf`` back)
        # while a derived array still used it; an array over a memoryview is the base of all
        # arrays derived from it
        view = np.frombuffer(memoryview(buf)[:n], dtype=np.uint8)
        # deque.append takes no lock: a finalizer may run inside a collection started while this
        # thread holds ``_lock``, and must not wait for it
        weakref.finalize(view, self._returned.append, buf)
        return view

    @property
    def free_bytes(self) -> int:
        """Bytes of the buffers kept for reuse (at most ``keep``)."""
        with self._lock:
            self._sort_returned()
            return sum(b.size for b in self._free)

    def _sort_returned(self) -> None:
        """Move given-back buffers into the free list (caller holds ``_lock``), dropping the
        largest while more than ``keep`` bytes are kept: the next few boxes rarely need them."""
        while self._returned:
            self._free.append(self._returned.popleft())
        self._free.sort(key=lambda b: b.size)
        while sum(b.size for b in self._free) > self.keep:
            self._free.pop()
