"""The DeepSpeed source's recycled read buffers (``ucp.sources.deepspeed.ReadBuffers``).

A buffer may only be handed out again once nothing views it: the engine holds a box as a
tensor, a dtype view of it or a numpy array of it until the box is staged or written. These
tests hold each kind of view, check the buffer is not reused while it lives and is reused after
(same memory), and that boxes read through recycled buffers equal ``torch.load`` of a file
``torch.save`` wrote, bit for bit. No DeepSpeed needed: the reader is plain torch-zip reading.
"""
from __future__ import annotations

import pytest
import torch

from ucp.sources.deepspeed import DeepSpeedError, ReadBuffers, TensorFile, load_pickle


def _saved(tmp_path, saved):
    """``saved`` written with ``torch.save``: its path, ``torch.load``'s answer, and ucp's lazy metadata."""
    path = tmp_path / "states.pt"
    torch.save(saved, path)
    return path, torch.load(path, weights_only=True), load_pickle(path, lazy=True)


def _bits_equal(a, b) -> bool:
    """Bit-exact equality (NaN payloads and signed zeros included)."""
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def test_buffer_reused_only_after_every_view_is_gone():
    pool = ReadBuffers()
    a = pool.take(4096)
    ptr = a.data_ptr()
    held = [a.view(torch.bfloat16)[10:20], a.numpy()[5:9], torch.as_strided(a, (8, 8), (64, 1))]
    del a
    while held:  # any one view left keeps the buffer out of the pool
        b = pool.take(1000)
        assert b.data_ptr() != ptr
        del b
        held.pop()
    assert pool.take(2000).data_ptr() == ptr  # best fit: the 4096-byte buffer, now free (the loop's are 1000)


def test_best_fit_and_keep_bound():
    pool = ReadBuffers(keep=10_000)
    big, small = pool.take(8000), pool.take(3000)
    small_ptr = small.data_ptr()
    del big
    assert pool.free_bytes == 8000
    del small                    # 11000 bytes free, above keep: the largest is dropped
    assert pool.free_bytes == 3000
    again = pool.take(2000)      # the one free buffer large enough
    assert again.data_ptr() == small_ptr and pool.free_bytes == 0
    assert pool.take(5000).data_ptr() != small_ptr


def test_boxes_through_recycled_buffers_equal_torch_load(tmp_path):
    g = torch.Generator().manual_seed(7)
    saved = {"w": torch.randn(37, 53, generator=g), "h": torch.randn(301, generator=g).bfloat16(),
             "t": torch.randn(29, 41, generator=g).t()}        # a non-contiguous tensor too
    path, want, meta = _saved(tmp_path, saved)
    pool = ReadBuffers(keep=1 << 20)
    reader = TensorFile(path, pool)
    try:
        for _ in range(3):  # later rounds read into buffers the earlier rounds freed
            for name, start, stop in (("w", (3, 0), (20, 53)), ("w", (0, 5), (37, 17)), ("h", (7,), (300,)),
                                      ("t", (2, 3), (40, 20)), ("w", (0, 0), (37, 53))):
                box = reader.box(meta[name], start, stop)
                ref = want[name][tuple(slice(a, b) for a, b in zip(start, stop))]
                assert box.dtype == ref.dtype and box.shape == ref.shape
                assert _bits_equal(box, ref)
                del box
    finally:
        reader.close()


def test_read_into_fills_flat_spans_in_place_and_declines_column_blocks(tmp_path):
    """``TensorFile.read_into`` (the engine's one-copy gather) reads a box that is one flat
    span of the saved tensor straight into ``out``, bit-exact against ``torch.load``; a column
    block is declined with ``out`` untouched (the engine then reads it with ``box``)."""
    g = torch.Generator().manual_seed(11)
    saved = {"w": torch.randn(37, 53, generator=g), "h": torch.randn(301, generator=g).bfloat16()}
    path, want, meta = _saved(tmp_path, saved)
    reader = TensorFile(path)
    try:
        for name, start, stop in (("w", (3, 0), (20, 53)), ("w", (5, 10), (6, 40)), ("h", (7,), (300,)),
                                  ("h", (0,), (0,))):
            ref = want[name][tuple(slice(a, b) for a, b in zip(start, stop))]
            out = torch.full(ref.shape, 7, dtype=ref.dtype)
            assert reader.read_into(meta[name], start, stop, out)
            assert _bits_equal(out, ref)
        out = torch.full((37, 12), 7.0)
        assert not reader.read_into(meta["w"], (0, 5), (37, 17), out)
        assert bool((out == 7.0).all())
    finally:
        reader.close()


def test_view_maps_flat_spans_bit_exact_with_no_copy(tmp_path):
    """``TensorFile.view`` (a band the engine writes as it is) gives the bytes ``torch.load``
    gives, over a private map of the file (no buffer of the pool is used), at any offset
    (maps start on the allocation granularity); ``DeepSpeedSource.view``'s flat-span rule
    declines a column block; a file cut short fails naming it."""
    from ucp.sources.deepspeed import flat_span

    g = torch.Generator().manual_seed(13)
    saved = {"w": torch.randn(37, 53, generator=g), "h": torch.randn(70001, generator=g).bfloat16()}
    path, want, meta = _saved(tmp_path, saved)
    pool = ReadBuffers()
    reader = TensorFile(path, pool)
    try:
        for name, start, stop in (("w", (3, 0), (20, 53)), ("w", (5, 10), (6, 40)), ("h", (7,), (70000,)),
                                  ("h", (40961,), (70001,))):
            t = meta[name]
            lo, hi = flat_span(t, start, stop)
            box = reader.view(t, lo, hi)
            ref = want[name][tuple(slice(a, b) for a, b in zip(start, stop))].reshape(-1)
            assert box.dtype == ref.dtype and box.shape == ref.shape and box.view(torch.uint8).numpy().flags.writeable
            assert _bits_equal(box, ref)
        assert pool.free_bytes == 0 and reader.view(meta["h"], 5, 5).numel() == 0
        assert flat_span(meta["w"], (0, 5), (37, 17)) is None
    finally:
        reader.close()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[:-300_000])
    reader = TensorFile(cut)
    try:
        with pytest.raises(DeepSpeedError, match="cut.pt: truncated"):
            reader.view(meta["h"], 0, 70001)
    finally:
        reader.close()
