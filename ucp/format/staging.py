"""Reading array regions into any tensor: a GPU's, another dtype's, a strided view.

``Checkpoint.read_boxes`` writes chunk bytes straight into contiguous CPU tensors of the
stored dtype. Every other destination is filled through a host buffer, and how matters for
the one that counts most, a CUDA tensor: reading a rank's whole plan into fresh pageable
memory and then copying it over touches every page twice (first-touch faults on the read,
then the driver's own staging copy on the transfer) and holds the whole plan in host memory.
Here regions are read in batches of at most ``STAGE_BYTES`` into two reused host buffers,
pinned when the destination is a CUDA tensor, and each batch's copy to the device runs
asynchronously while the next batch is read (a buffer is reused only once its copies have
finished). Host memory stays at two buffers whatever the plan's size.
"""
from __future__ import annotations

import math
import threading

import torch

#: bytes of one host buffer (two are used in turn); a region larger than this is split by rows
STAGE_BYTES = 64 << 20
_ALIGN = 64


def read_regions(ck, regions, stage_bytes: int = STAGE_BYTES) -> None:
    """Fill each ``target`` of ``regions`` — ``(name, state, start, stop, target)``, ``target``
    any tensor of the box's shape, on any device, of any dtype (copied with ``Tensor.copy_``'s
    casting) — from checkpoint ``ck``. Contiguous CPU targets of the stored dtype are read in
    place, all in one ``read_boxes``; the others are staged (module docstring). When this
    returns every target holds its data (device copies included)."""
    direct, staged = [], []
    for name, state, start, stop, target in regions:
        info = ck.array_info(name, state)
        if target.dtype == info.dtype and target.is_contiguous() and target.device.type == "cpu":
            direct.append((name, state, start, stop, target))
        else:
            staged += _pieces(name, state, list(start), list(stop), target, info, stage_bytes)
    if direct:
        ck.read_boxes(direct)
    if staged:
        _read_staged(ck, staged, stage_bytes)


def _nbytes(shape, dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _piece_bytes(piece) -> int:
    _name, _state, start, stop, _target, dtype = piece
    return _nbytes([b - a for a, b in zip(start, stop)], dtype)


def _pieces(name, state, start, stop, target, info, limit):
    """The region cut into bands of whole leading-dim rows, each ``(name, state, start, stop, its
    part of target, dtype)`` of at most ``limit`` bytes, with edges at multiples of the chunks' rows
    (a band of a single chunk row may exceed ``limit``), so that no chunk is read twice.

    Not cut into column blocks, although a block read on its own goes straight into the buffer
    (``Checkpoint._read_direct``): each block then opens and reads every shard of its rows again,
    and on the H200 machine (gVisor, where a syscall is dear) that halved a CUDA load (2.13 GB/s
    against 4.34, bench/results/cuda.txt)."""
    dtype = info.dtype
    shape = [b - a for a, b in zip(start, stop)]
    if not shape or not math.prod(shape):
        return [(name, state, list(start), list(stop), target, dtype)]
    rows = (info.inner_chunks or info.chunks)[0]
    step = max(1, limit // _nbytes(shape[1:], dtype)) // rows * rows or rows
    pieces = []
    for b in range(start[0] // step * step, stop[0], step):
        r0, r1 = max(start[0], b), min(stop[0], b + step)
        pieces.append((name, state, [r0, *start[1:]], [r1, *stop[1:]], target[r0 - start[0]:r1 - start[0]], dtype))
    return pieces


def _batches(pieces, limit):
    """Consecutive pieces whose aligned sizes add up to at most ``limit`` (a larger piece alone)."""
    batch, used = [], 0
    for p in pieces:
        size = _aligned(_piece_bytes(p))
        if batch and used + size > limit:
            yield batch
            batch, used = [], 0
        batch.append(p)
        used += size
    if batch:
        yield batch


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


#: pinned buffers kept between loads (``STAGE_BYTES`` each, at most two): pinning fresh memory costs
#: a fault and a registration per page, more than reading into memory already pinned
_SPARE: list[torch.Tensor] = []
_SPARE_LOCK = threading.Lock()


class _HostBuffer:
    """One reusable host buffer and the device events its last copies recorded."""

    def __init__(self, nbytes: int, pin: bool):
        self.nbytes, self.pin = nbytes, pin
        self.data = None            # allocated on first use: a plan of one batch needs one buffer
        self.events: list = []

    def _allocate(self, need: int) -> torch.Tensor:
        if self.pin:
            with _SPARE_LOCK:
                for i, t in enumerate(_SPARE):
                    if t.numel() >= need:
                        return _SPARE.pop(i)
        return torch.empty(max(need, self.nbytes), dtype=torch.uint8, pin_memory=self.pin)

    def release(self) -> None:
        """Wait for the buffer's copies, then keep it for the next load (pinned, of the size asked for)."""
        self.wait()
        data, self.data = self.data, None
        if data is not None and self.pin and data.numel() == self.nbytes:   # not one grown for an oversized piece
            with _SPARE_LOCK:
                if len(_SPARE) < 2:
                    _SPARE.append(data)

    def views(self, batch) -> list[torch.Tensor]:
        """A view per piece, each of its box's shape and stored dtype; a buffer too small for the
        batch (one oversized piece) is replaced by a larger one."""
        shapes = [([b - a for a, b in zip(p[2], p[3])], p[5]) for p in batch]
        need = sum(_aligned(_nbytes(s, d)) for s, d in shapes)
        if self.data is None or need > self.data.numel():
            self.data = self._allocate(need)
        out, off = [], 0
        for shape, dtype in shapes:
            n = _nbytes(shape, dtype)
            out.append(self.data[off:off + n].view(dtype).view(shape))
            off += _aligned(n)
        return out

    def copied(self, targets) -> None:
        """Note the devices the batch's asynchronous copies went to (their streams' events)."""
        if self.pin:
            devices = {t.device for t in targets if t.device.type == "cuda"}
            self.events = [torch.cuda.current_stream(d).record_event() for d in devices]

    def wait(self) -> None:
        for e in self.events:
            e.synchronize()
        self.events = []


def _read_staged(ck, pieces, limit) -> None:
    pin = torch.cuda.is_available() and any(p[4].device.type == "cuda" for p in pieces)
    total = sum(_aligned(_piece_bytes(p)) for p in pieces)
    buffers = [_HostBuffer(limit if pin else min(limit, total), pin) for _ in range(2)]
    try:
        for i, batch in enumerate(_batches(pieces, limit)):
            buf = buffers[i % 2]
            buf.wait()
            outs = buf.views(batch)
            ck.read_boxes([(p[0], p[1], p[2], p[3], o) for p, o in zip(batch, outs)])
            for p, o in zip(batch, outs):
                p[4].copy_(o, non_blocking=pin and p[4].device.type == "cuda")
            buf.copied([p[4] for p in batch])
    finally:
        for buf in buffers:
            buf.release()
