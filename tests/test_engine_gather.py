"""The engine's whole-state gather (``ucp.engine.to_universal.write_state``): of a source that
offers ``read_into``, a state that no replica averages and of at most GATHER_MAX_BYTES is read
piece by piece into one buffer — straight into place where ``read_into`` takes the piece, else
copied from ``read`` — and written as one box, so the writer takes every chunk whole. And the shard encoder that then pads
edge chunks itself (``ucp.format.shard.encode``) instead of a padded copy of the whole chunk.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import ucp
from ucp.engine import bind_layout, convert, parse_spec
from ucp.format import shard as shards
from ucp.format import verify
from ucp.sources import Source, SourceLayout, SourceParam

FLAT = 'spec f\naxes dp\nparam "**" = flat(over=dp)\n'


class FlatSource(Source, register=False):
    """ZeRO-like: every state flat-partitioned over 3 ranks, held in memory. ``read_into``
    serves only pieces of rank 1 and counts them; the others go through ``read``."""
    name = "test-flat-gather"
    description = "test plug-in: flat partitions, read_into for rank 1"

    def layout(self):
        full = self.options["full"]
        shapes = {n: tuple(t.shape) for n, t in full.items()}
        flat = bind_layout(parse_spec(FLAT, "flat"), list(shapes), {"dp": 3}).fragments_by_param(shapes)
        self.straight = 0
        return SourceLayout([SourceParam(n, shapes[n], {"param": full[n].dtype}, fragments=flat[n]) for n in shapes],
                            degrees={"dp": 3})

    def local(self, fragment, state):
        from ucp.plan import split

        return split(self.options["full"][fragment.name], fragment)

    def read_into(self, fragment, state, piece, out):
        if fragment.coord("dp") != 1:
            return False
        out.copy_(self.read(fragment, state, piece))
        self.straight += 1
        return True


def _bits(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("gather", [True, False])
def test_gathered_states_equal_the_source_on_both_read_paths(tmp_path, monkeypatch, gather):
    """Gathered (rank 1's pieces through ``read_into``, the others through ``read``) or, for
    states above ``GATHER_MAX_BYTES``, written box by box: the same tensors, bit for bit."""
    from ucp.engine import to_universal

    if not gather:
        monkeypatch.setattr(to_universal, "GATHER_MAX_BYTES", 0)
    g = torch.Generator().manual_seed(3)
    full = {"emb": torch.randn(1003, 72, generator=g), "bias": torch.randn(37, generator=g),
            "half": torch.randn(13, 11, generator=g).bfloat16()}
    src = FlatSource("<memory>", full=full)
    convert(src, tmp_path / "uni")
    # gathered: rank 1's pieces of every parameter went straight into place; box by box: none did
    assert src.straight >= len(full) if gather else src.straight == 0
    assert verify(tmp_path / "uni") == []
    ck = ucp.open(tmp_path / "uni")
    for n, t in full.items():
        assert torch.equal(_bits(ck.read(n)), _bits(t)), n


@pytest.mark.parametrize("shape,shard,inner", [((1365, 512), (1366, 512), (683, 64)),
                                               ((15619, 16), (16384, 16), (1024, 16)),
                                               ((1003,), (1024,), (256,)), ((5, 7), (8, 8), (4, 4))])
def test_shard_encoder_pads_edge_chunks_like_a_padded_copy(shape, shard, inner):
    """Encoding only the valid region gives the same file bytes and checksums as encoding the
    region zero-padded to whole inner chunks (what the writer used to build first)."""
    data = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    padded_shape = tuple(-(-v // c) * c for v, c in zip(shape, inner))
    padded = np.zeros(padded_shape, dtype=np.float32)
    padded[tuple(slice(0, n) for n in shape)] = data
    lim = tuple(p // c for p, c in zip(padded_shape, inner))

    def file_bytes(buf, out):
        got, size, icrc, content = shards.encode(buf, shard, inner, lim, out)
        assert size == shards.file_size(shape, shard, inner, (0,) * len(shape), 4)
        raw = bytes(got[:size])
        assert len(raw) == size
        return raw, icrc, content

    pool = bytearray(1 << 24)
    want = file_bytes(padded, None)
    for out in (None, memoryview(pool)):
        pool[:] = b"\x07" * len(pool)  # stale bytes in a reused buffer must not leak into padding
        assert file_bytes(data, out) == want


def test_gather_buffers_keep_the_largest_state_beside_a_budget_of_smaller_ones():
    """The engine's gather pool (``ReadBuffers(keep=GATHER_KEEP_BYTES)``) keeps a buffer of the
    largest gathered state while a pipeline budget of smaller states' buffers comes and goes, so
    the next large state (an embedding's second and third states, the output layer after the
    layers) reuses its memory instead of faulting in fresh pages. No page is touched here."""
    from ucp.engine.buffers import ReadBuffers
    from ucp.engine.pipeline import BUDGET_BYTES
    from ucp.engine.to_universal import GATHER_KEEP_BYTES, GATHER_MAX_BYTES

    pool = ReadBuffers(keep=GATHER_KEEP_BYTES)
    big = pool.take(GATHER_MAX_BYTES)
    del big
    # a layer's states in flight together (the pipeline's budget; the first takes the one free
    # buffer, the large one), then freed: the large buffer must stay in the pool
    layer = [pool.take(BUDGET_BYTES // 4) for _ in range(4)]
    del layer
    assert pool.free_bytes == GATHER_MAX_BYTES + 3 * (BUDGET_BYTES // 4)
    again = pool.take(GATHER_MAX_BYTES)    # the next large state: the kept buffer, no fresh memory
    assert pool.free_bytes == 3 * (BUDGET_BYTES // 4)
    del again
