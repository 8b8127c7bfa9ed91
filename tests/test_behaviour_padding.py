"""Padding in exported layouts is zeros, bit for bit.

Vocabulary padding (``pad(0, multiple=...)``), ZeRO-1/2 flat-buffer alignment padding and
ZeRO-3 per-parameter padding hold no data, so a round trip (export, then convert back) never
reads them and cannot tell zeros from garbage. These tests build every rank's local tensors
independently with torch (pad with zeros, flatten, ``torch.chunk``) and compare them bit for bit
with what `ucp export` writes and what `ucp.load_rank` returns: export padding filled with
anything but +0.0 fails them.
"""
import pytest
import torch

import ucp
from ucp.cli import main
from ucp.format import create_checkpoint

SHAPES = {"emb.weight": (101, 6), "layers.0.w": (9, 4), "layers.0.b": (5,), "norm.weight": (7,)}
STATES = ("param", "exp_avg", "exp_avg_sq")

PADDED_TP = """spec padded_tp
axes tp
param "emb.weight" = pad(0, multiple=8*tp) | shard(0, over=tp)
param "**" = shard(0, over=tp)
"""

FLAT_ALIGNED = """spec flat_aligned
axes dp
param "**" = flat(over=dp, group=main, align=2)
"""


def _bits(t):
    """Integer view: +0.0 and -0.0 (or a NaN payload) differ here, unlike torch.equal on floats."""
    return t.contiguous().reshape(-1).view(torch.int32)


@pytest.fixture(scope="module")
def universal(tmp_path_factory):
    """A universal checkpoint written through the format API, and its tensors."""
    path = tmp_path_factory.mktemp("pad") / "uni"
    g = torch.Generator().manual_seed(7)
    tensors = {st: {} for st in STATES}
    with create_checkpoint(path) as w:
        for name, shape in SHAPES.items():
            w.add_param(name)
            for st in STATES:
                t = torch.randn(shape, generator=g) + 3.0  # no element is zero
                w.write_tensor(name, st, t)
                tensors[st][name] = t
    return path, tensors


def _export(src, dst, spec, **degrees):
    flags = [x for k, v in degrees.items() for x in (f"--{k}", str(v))]
    assert main(["export", str(src), str(dst), "--to", "ranks", "--spec", str(spec), "-q", *flags]) == 0


def _rank_file(dst, **coords):
    name = "rank-" + "-".join(f"{k}{v}" for k, v in coords.items()) + ".pt"
    return torch.load(dst / name, weights_only=True)


def _assert_bits(got, want, what):
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert torch.equal(_bits(got), _bits(want)), what


def test_vocabulary_padding_rows_are_zero(universal, tmp_path):
    src, tensors = universal
    spec = tmp_path / "padded_tp.ucp"
    spec.write_text(PADDED_TP)
    tp = 3
    _export(src, tmp_path / "out", spec, tp=tp)
    for r in range(tp):
        got = _rank_file(tmp_path / "out", tp=r)
        mem = ucp.load_rank(src, str(spec), {"tp": tp}, {"tp": r}, states=None)
        for st in STATES:
            emb = tensors[st]["emb.weight"]
            padded = torch.cat([emb, emb.new_zeros(-emb.shape[0] % (8 * tp), emb.shape[1])])
            want = padded.chunk(tp)[r]
            _assert_bits(got[st]["emb.weight"], want, (r, st))
            _assert_bits(mem[st]["emb.weight"], want, (r, st, "load_rank"))
    last = _rank_file(tmp_path / "out", tp=tp - 1)["param"]["emb.weight"]
    assert last.shape[0] == 40 and bool((last[101 - 80:] == 0).all())  # 19 padding rows on the last rank


def test_zero12_flat_alignment_padding_is_zero(universal, tmp_path):
    """One flat buffer per group, padded to a multiple of align * dp (DeepSpeed's
    nccl_start_alignment_factor), split into dp equal partitions."""
    src, tensors = universal
    spec = tmp_path / "flat_aligned.ucp"
    spec.write_text(FLAT_ALIGNED)
    dp = 4
    _export(src, tmp_path / "out", spec, dp=dp)
    ck = ucp.open(src)
    for st in STATES:
        flat = torch.cat([tensors[st][n].reshape(-1) for n in ck.params])
        padded = torch.cat([flat, flat.new_zeros(-flat.numel() % (2 * dp))])
        assert padded.numel() > flat.numel()  # the case has padding
        for r in range(dp):
            got = _rank_file(tmp_path / "out", dp=r)[st]
            mem = ucp.load_rank(src, str(spec), {"dp": dp}, {"dp": r}, states=None)[st]
            (key,) = got
            _assert_bits(got[key], padded.chunk(dp)[r], (r, st))
            _assert_bits(mem[key], padded.chunk(dp)[r], (r, st, "load_rank"))


def _partition(t, dp, r):
    """Rank r's part of ``t`` flattened and zero-padded to a multiple of dp (ZeRO-3, FSDP)."""
    flat = t.reshape(-1)
    return torch.cat([flat, flat.new_zeros(-flat.numel() % dp)]).chunk(dp)[r]


def test_per_parameter_flat_padding_is_zero(universal, tmp_path):
    """Each parameter flattened, padded to a multiple of dp, split (one local tensor per parameter)."""
    src, tensors = universal
    spec = tmp_path / "per_param.ucp"
    spec.write_text('spec per_param\naxes dp\nparam "**" = flat(over=dp)\n')
    dp = 4
    _export(src, tmp_path / "out", spec, dp=dp)
    assert sum(t.numel() % dp != 0 for t in tensors["param"].values()) >= 2  # the case has padding
    for r in range(dp):
        got = _rank_file(tmp_path / "out", dp=r)
        mem = ucp.load_rank(src, str(spec), {"dp": dp}, {"dp": r}, states=None)
        for st in STATES:
            for name, t in tensors[st].items():
                _assert_bits(got[st][name], _partition(t, dp, r), (r, st, name))
                _assert_bits(mem[st][name], _partition(t, dp, r), (r, st, name, "load_rank"))


def test_zero3_concatenated_partitions_padding_is_zero(universal, tmp_path):
    """The bundled ZeRO-3 layout: rank r's buffer is its zero-padded partition of every parameter,
    concatenated in parameter order (one param group, one sub-group)."""
    src, tensors = universal
    dp = 4
    _export(src, tmp_path / "out", "deepspeed_zero3", dp=dp)
    names = list(ucp.open(src).params)
    for r in range(dp):
        got = _rank_file(tmp_path / "out", dp=r)
        mem = ucp.load_rank(src, "deepspeed_zero3", {"dp": dp}, {"dp": r}, states=None)
        for st in STATES:
            want = torch.cat([_partition(tensors[st][n], dp, r) for n in names])
            (key,) = got[st]
            _assert_bits(got[st][key], want, (r, st))
            _assert_bits(mem[st][key], want, (r, st, "load_rank"))
