"""Known answers: the planner's local tensors equal what torch / Megatron / ZeRO build."""
import math

import pytest
import torch
import torch.nn.functional as F

from ucp.errors import UcpError
from ucp.plan import (Average, Box, BoundRule, CoverageError, Flat, Pad, Parts, PlanError, Renumber,
                      Replicate, Shard, assemble, check_coverage, dedupe, fragment, mesh_coords,
                      owner, plan_reads, plan_universal_reads, rank_fragments, read_cost, split,
                      split_group, apply_reads)


def R(*ops, pattern="w", local="w", renumber=()):
    return BoundRule(pattern=pattern, local=local, ops=tuple(ops), renumber=tuple(renumber),
                     origin="spec.ucp:3:1")


def locals_of(rule, t, deg, axis):
    return [split(t, fragment(rule, t.shape, deg, {axis: r})) for r in range(deg[axis])]


@pytest.mark.parametrize("n,k", [(10, 4), (5, 4), (3, 4), (8, 4), (1, 3), (0, 2), (7, 7)])
@pytest.mark.parametrize("dim", [0, 1])
def test_shard_matches_torch_chunk_and_tensor_split(n, k, dim):
    shape = (n, 3) if dim == 0 else (3, n)
    t = torch.randn(shape)
    ch = torch.chunk(t, k, dim=dim) if n else ()
    got = locals_of(R(Shard(dim, "tp", "chunk")), t, {"tp": k}, "tp")
    for r in range(k):
        exp = ch[r] if r < len(ch) else t.narrow(dim, 0, 0)
        assert torch.equal(got[r], exp)
    got = locals_of(R(Shard(dim, "tp", "tensor_split")), t, {"tp": k}, "tp")
    for g, e in zip(got, torch.tensor_split(t, k, dim=dim)):
        assert torch.equal(g, e)


def test_sizes_and_even_split():
    t = torch.randn(9, 2)
    got = locals_of(R(Shard(0, "tp", "sizes", (2, 0, 7))), t, {"tp": 3}, "tp")
    assert [g.shape[0] for g in got] == [2, 0, 7] and torch.equal(torch.cat(got), t)
    got = locals_of(R(Shard(-2, "tp", "even")), t, {"tp": 3}, "tp")
    assert torch.equal(torch.cat(got), t)


@pytest.mark.parametrize("shape,dp,align", [((5, 3), 4, 1), ((7,), 3, 1), ((2, 3, 4), 5, 2), ((1,), 4, 4),
                                            ((), 2, 1)])
def test_zero3_flat_per_param(shape, dp, align):
    t = torch.randn(shape)
    flat = t.flatten()
    unit = align * dp
    padded = F.pad(flat, (0, (-flat.numel()) % unit))
    exp = padded.chunk(dp)
    got = locals_of(R(Flat("dp", align=align)), t, {"dp": dp}, "dp")
    assert len(exp) == dp
    for g, e in zip(got, exp):
        assert torch.equal(g, e)


def test_grouped_flat_matches_cat_pad_chunk():
    shapes = {"a": (3, 5), "b": (7,), "c": (2, 2, 2), "d": (1,)}
    ts = {n: torch.randn(s) for n, s in shapes.items()}
    dp = 3
    rules = {n: R(Flat("dp", group="fp32_groups.0", align=2), pattern=n, local=n) for n in shapes}
    buf = torch.cat([ts[n].flatten() for n in shapes])
    buf = F.pad(buf, (0, (-buf.numel()) % (2 * dp)))
    exp = buf.chunk(dp)
    frs_all = []
    for r in range(dp):
        frs = rank_fragments(rules, shapes, {"dp": dp}, {"dp": r})
        assert [f.name for f in frs] == list(shapes)
        assert {f.local_name for f in frs} == {"fp32_groups.0"}
        local = split_group(ts, frs)
        assert torch.equal(local, exp[r])
        frs_all += [(f, local) for f in frs]
    for n in shapes:
        items = [(f, t) for f, t in frs_all if f.name == n]
        assert torch.equal(assemble(shapes[n], torch.float32, items), ts[n])


def test_grouped_flat_param_align():
    shapes = {"a": (3,), "b": (5,), "c": (2,)}
    ts = {n: torch.arange(1, 1 + math.prod(s), dtype=torch.float32) * (10 ** i)
          for i, (n, s) in enumerate(shapes.items())}
    rules = {n: R(Flat("dp", group="g", align=1, param_align=4), pattern=n) for n in shapes}
    # a at 0, b at 4, c at 12 (b ends at 9 -> next multiple of 4); 14 elements in all,
    # padded to a multiple of dp=4: 16
    z = torch.zeros(1)
    buf = torch.cat([ts["a"], z, ts["b"], z.repeat(3), ts["c"], z.repeat(2)])
    for r in range(4):
        frs = rank_fragments(rules, shapes, {"dp": 4}, {"dp": r})
        assert torch.equal(split_group(ts, frs), buf.chunk(4)[r])


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_swiglu_parts_shard(tp):
    ffn, h = 8, 3
    gate, up = torch.randn(ffn, h), torch.randn(ffn, h)
    universal = torch.cat([gate, up])
    rule = R(Parts(0, ("gate", "up")), Shard(0, "tp"))
    for r, g in enumerate(locals_of(rule, universal, {"tp": tp}, "tp")):
        assert torch.equal(g, torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]]))


def megatron_qkv(q, k, v, groups, hd):
    h = q.shape[-1]
    qg = q.reshape(groups, -1, h)
    kg = k.reshape(groups, hd, h)
    vg = v.reshape(groups, hd, h)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, h)


@pytest.mark.parametrize("heads,groups,tp", [(8, 2, 2), (8, 4, 2), (4, 4, 4), (6, 3, 1), (8, 8, 8)])
def test_gqa_qkv_interleave(heads, groups, tp):
    hd, h = 2, 5
    q, k, v = torch.randn(heads * hd, h), torch.randn(groups * hd, h), torch.randn(groups * hd, h)
    universal = torch.cat([q, k, v])
    rule = R(Parts(0, ("q", "k", "v"), (heads * hd, groups * hd, groups * hd), groups=groups),
             Shard(0, "tp"))
    exp = megatron_qkv(q, k, v, groups, hd).chunk(tp)
    got = locals_of(rule, universal, {"tp": tp}, "tp")
    for g, e in zip(got, exp):
        assert torch.equal(g, e)
    # no TP: the framework tensor is the full interleaved one
    f = fragment(R(Parts(0, ("q", "k", "v"), (heads * hd, groups * hd, groups * hd), groups=groups)),
                 universal.shape, {}, {})
    assert torch.equal(split(universal, f), megatron_qkv(q, k, v, groups, hd))


def test_vocab_pad_then_shard():
    vocab, h, tp = 11, 3, 4
    t = torch.randn(vocab, h)
    rule = R(Pad(0, 8), Shard(0, "tp"))     # 11 -> 16 rows, 4 per rank
    got = locals_of(rule, t, {"tp": tp}, "tp")
    padded = F.pad(t, (0, 0, 0, 5))
    for g, e in zip(got, padded.chunk(tp)):
        assert torch.equal(g, e)
    frs = [fragment(rule, t.shape, {"tp": tp}, {"tp": r}) for r in range(tp)]
    assert frs[3].pieces == ()           # rows 12..15 are all padding
    assert frs[2].numel == 3 * h          # rows 8..10 real, row 11 padding


def test_shard_shard_same_dim_and_2d_mesh():
    t = torch.randn(12, 6)
    rule = R(Shard(0, "tp"), Shard(0, "sp"))
    f = fragment(rule, t.shape, {"tp": 2, "sp": 3}, {"tp": 1, "sp": 2})
    assert torch.equal(split(t, f), t.chunk(2)[1].chunk(3)[2])
    rule = R(Shard(0, "dp"), Shard(1, "tp"))
    f = fragment(rule, t.shape, {"tp": 2, "dp": 3}, {"tp": 1, "dp": 2})
    assert torch.equal(split(t, f), t.chunk(3, 0)[2].chunk(2, 1)[1])


def test_tp_then_zero_flat():
    t = torch.randn(5, 6)
    rule = R(Shard(1, "tp"), Flat("dp", align=2))
    for tp in range(2):
        loc = t.chunk(2, 1)[tp].flatten()
        loc = F.pad(loc, (0, (-loc.numel()) % 6))
        for dp in range(3):
            f = fragment(rule, t.shape, {"tp": 2, "dp": 3}, {"tp": tp, "dp": dp})
            assert torch.equal(split(t, f), loc.chunk(3)[dp])


def test_flat_over_padded_parts_has_subrow_pieces():
    # Parts on dim 1 then shard dim 1: each local row is [gate_r | up_r]; flatten splits rows.
    t = torch.randn(3, 8)
    rule = R(Parts(1, ("g", "u")), Shard(1, "tp"), Flat("dp"))
    frs = [fragment(rule, t.shape, {"tp": 2, "dp": 3}, {"tp": a, "dp": b}) for a in range(2) for b in range(3)]
    for f in frs:
        for p in f.pieces:
            assert p.dst.ndim == 1 and p.src.shape[0] == 1  # within one row of one part
    loc = torch.cat([t[:, 0:2], t[:, 4:6]], 1).flatten()
    assert torch.equal(split(t, frs[0]), loc[:4])
    assert torch.equal(assemble(t.shape, t.dtype, [(f, split(t, f)) for f in frs]), t)


def test_degrees_absent_are_one_and_unmentioned_axes_replicate():
    t = torch.randn(4, 4)
    f = fragment(R(Shard(0, "tp")), t.shape, {}, {})
    assert f.local_shape == (4, 4) and not f.replica
    f1 = fragment(R(Shard(0, "tp")), t.shape, {"tp": 2, "dp": 2}, {"tp": 0, "dp": 1})
    assert f1.replica and "dp" in f1.replicated and f1.coords == (("tp", 0), ("dp", 1))


def test_replicate_and_average_dedupe():
    t = torch.randn(6)
    deg = {"tp": 2, "sp": 4}
    rep = [fragment(R(Shard(0, "tp"), Replicate("sp")), t.shape, deg, c) for c in mesh_coords(deg)]
    groups = dedupe(rep)
    assert len(groups) == 2 and all(len(g) == 1 and g[0][0].coord("sp") == 0 and g[0][1] == 1.0
                                    for g in groups)
    avg = [fragment(R(Shard(0, "tp"), Average("sp")), t.shape, deg, c) for c in mesh_coords(deg)]
    groups = dedupe(avg)
    assert len(groups) == 2 and all(len(g) == 4 for g in groups)
    assert all(w == 0.25 for g in groups for _, w in g)
    assert {f.weight for f in avg} == {0.25}
    # replicas that differ average back to their mean
    items = [(f, split(t, f) + (f.coord("sp") - 1.5)) for f in avg]
    assert torch.allclose(assemble(t.shape, t.dtype, items), t)
    # dedupe picks the lowest replica even when coord 0 was not saved
    only_hi = [f for f in rep if f.coord("sp") >= 2]
    check_coverage("w", t.shape, only_hi)
    assert {g[0][0].coord("sp") for g in dedupe(only_hi)} == {2}


def test_renumber_pipeline_stages_and_experts():
    rn = Renumber("i", "pp", 10)                 # tensor_split: 4, 3, 3
    assert [owner(rn, i, {"pp": 3}) for i in (0, 3, 4, 6, 7, 9)] == [(0, 0), (0, 3), (1, 0), (1, 2),
                                                                      (2, 0), (2, 2)]
    assert owner(Renumber("e", "ep", 8, split="sizes", sizes=(2, 6)), 5) == (1, 3)
    with pytest.raises(PlanError):
        owner(rn, 10, {"pp": 3})
    rule = R(Shard(0, "tp"), pattern="layers.{i}.w", local="layers.{i}.w", renumber=[rn])
    shapes = {f"layers.{i}.w": (4, 2) for i in range(10)}
    rules = {n: rule for n in shapes}
    deg = {"pp": 3, "tp": 2}
    seen = []
    for c in mesh_coords(deg):
        frs = rank_fragments(rules, shapes, deg, c, captures=lambda n: {"i": n.split(".")[1]})
        seen += [(f.name, c["tp"]) for f in frs]
        if c["pp"] == 1:
            assert [f.local_name for f in frs] == ["layers.0.w", "layers.1.w", "layers.2.w"]
            assert [f.name for f in frs] == ["layers.4.w", "layers.5.w", "layers.6.w"]
    assert sorted(seen) == sorted((n, tp) for n in shapes for tp in range(2))
    # a local_name callable wins; default captures come from matching the pattern
    frs = rank_fragments(rules, shapes, deg, {"pp": 2, "tp": 0},
                         local_name=lambda n, c: "L" + n)
    assert [f.local_name for f in frs] == ["Llayers.7.w", "Llayers.8.w", "Llayers.9.w"]


def test_plan_reads_row_shard_from_universal_reads_only_needed_bytes():
    shape = (1000, 64)
    want = fragment(R(Shard(0, "tp")), shape, {"tp": 8}, {"tp": 3})
    reads = plan_universal_reads(want)
    boxes = [r.src for r in reads]
    assert boxes == [Box((375, 0), (500, 64))]
    needed, read = read_cost(boxes, (125, 64), shape, 4)
    assert needed == read == 125 * 64 * 4              # chunks follow the fragments: no overhead
    needed2, read2 = read_cost(boxes, (100, 64), shape, 4)
    assert needed2 == needed and read2 == 200 * 64 * 4  # rows 300..500 of chunks [300,400),[400,500)
    # a ZeRO partition of a 2-D tensor: partial row, full rows, partial row; bytes = requested
    want = fragment(R(Flat("dp")), shape, {"dp": 3}, {"dp": 1})
    reads = plan_universal_reads(want)
    assert len(reads) == 3 and sum(r.numel for r in reads) == want.numel == want.local_numel


def test_plan_reads_minimal_between_row_shards():
    t = torch.randn(12, 3)
    a = [fragment(R(Shard(0, "tp")), t.shape, {"tp": 4}, {"tp": r}) for r in range(4)]
    want = fragment(R(Shard(0, "tp")), t.shape, {"tp": 3}, {"tp": 1})   # rows 4..8
    reads = plan_reads(a, want)
    assert [(r.saved_index, r.src) for r in reads] == [
        (1, Box((4, 0), (6, 3))),
        (2, Box((6, 0), (8, 3)))]
    got = apply_reads(reads, want, [split(t, f) for f in a])
    assert torch.equal(got, t[4:8])


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("rule,shape,deg,match", [
    (R(Shard(0, "tp", "even")), (5, 2), {"tp": 2}, "does not divide"),
    (R(Shard(0, "tp", "sizes", (1, 2, 2))), (5,), {"tp": 2}, "sizes"),
    (R(Shard(0, "tp", "sizes", (1, 1))), (5,), {"tp": 2}, "add up"),
    (R(Parts(0, ("q", "k", "v"), (4, 2, 2), groups=2), Shard(0, "tp")), (8,), {"tp": 4}, "not divisible"),
    (R(Parts(0, ("q", "k"), (4, 3), groups=2)), (7,), {}, "not divisible by groups"),
    (R(Parts(0, ("a", "b"), (3, 3))), (7,), {}, "sum to 6, but dim 0 is of size 7"),
    (R(Parts(0, ("a", "b"))), (7,), {}, "equal parts"),
    (R(Parts(0, ("a", "b"), (3,))), (3,), {}, "parts a, b: sizes \\[3\\]"),
    (R(Shard(2, "tp")), (4, 4), {"tp": 2}, "dim 2 of a 2-d tensor"),
    (R(Flat("dp"), Shard(0, "tp")), (4,), {"tp": 2}, "after flat"),
    (R(Shard(0, "tp"), Replicate("tp")), (4,), {"tp": 2}, "both partitioned"),
    (R(Shard(0, "tp", "bogus")), (4,), {"tp": 2}, "unknown split"),
    (R(Flat("dp", group="g")), (4,), {"dp": 2}, "rank_fragments"),
])
def test_plan_errors_name_the_parameter(rule, shape, deg, match):
    with pytest.raises(PlanError, match=match) as ei:
        fragment(rule, shape, deg, {}, name="model.layers.3.attn.qkv.weight")
    assert "model.layers.3.attn.qkv.weight" in str(ei.value) and "spec.ucp:3:1" in str(ei.value)
    assert isinstance(ei.value, UcpError)


def test_coord_out_of_range_and_group_mismatch():
    with pytest.raises(PlanError, match="out of range"):
        fragment(R(Shard(0, "tp")), (4,), {"tp": 2}, {"tp": 2})
    rules = {"a": R(Flat("dp", group="g", align=1), pattern="a"),
             "b": R(Flat("dp", group="g", align=4), pattern="b")}
    with pytest.raises(PlanError, match="flat group 'g'"):
        rank_fragments(rules, {"a": (2,), "b": (2,)}, {"dp": 2}, {"dp": 0})
    with pytest.raises(PlanError, match="no rule"):
        rank_fragments({}, {"a": (2,)}, {}, {})


def test_coverage_overlap_is_reported():
    a = fragment(R(Shard(0, "tp", "sizes", (3, 2))), (5, 2), {"tp": 2}, {"tp": 0}, name="x")
    b = fragment(R(Shard(0, "tp", "sizes", (2, 3))), (5, 2), {"tp": 2}, {"tp": 1}, name="x")
    with pytest.raises(CoverageError, match=r"x: universal region \[2:3, 0:2\] is covered by fragments"):
        check_coverage("x", (5, 2), [a, b])
    with pytest.raises(CoverageError, match=r"\[3:5, 0:2\].*not covered"):
        check_coverage("x", (5, 2), [a])


def test_fragment_dict_roundtrip():
    import json
    rules = {n: R(Shard(0, "tp"), Flat("dp", group="g"), Average("sp"), pattern=n) for n in ("a", "b")}
    for f in rank_fragments(rules, {"a": (5, 3), "b": (4,)}, {"tp": 2, "dp": 3, "sp": 2},
                            {"tp": 1, "dp": 1, "sp": 1}):
        assert type(f).from_dict(json.loads(json.dumps(f.to_dict()))) == f


def test_second_shard_on_parts_dim_splits_each_part_again():
    gate, up = torch.randn(8, 2), torch.randn(8, 2)
    rule = R(Parts(0, ("gate", "up")), Shard(0, "tp"), Shard(0, "sp"))
    f = fragment(rule, (16, 2), {"tp": 2, "sp": 2}, {"tp": 1, "sp": 0})
    exp = torch.cat([gate.chunk(2)[1].chunk(2)[0], up.chunk(2)[1].chunk(2)[0]])
    assert torch.equal(split(torch.cat([gate, up]), f), exp)
    with pytest.raises(PlanError, match="pad of dim 0 after parts"):
        fragment(R(Parts(0, ("a", "b")), Pad(0, 4)), (6,), {}, {})


def test_scalars_and_empty_tensors():
    t = torch.tensor(3.5)
    frs = [fragment(R(Flat("dp")), (), {"dp": 3}, {"dp": r}) for r in range(3)]
    assert [f.local_shape for f in frs] == [(1,)] * 3 and [f.numel for f in frs] == [1, 0, 0]
    assert torch.equal(assemble((), t.dtype, [(f, split(t, f)) for f in frs]), t)
    e = torch.zeros(0, 3)
    frs = [fragment(R(Shard(0, "tp")), (0, 3), {"tp": 2}, {"tp": r}) for r in range(2)]
    check_coverage("w", (0, 3), frs)
    assert assemble((0, 3), e.dtype, [(f, split(e, f)) for f in frs]).shape == (0, 3)
    with pytest.raises(CoverageError):
        assemble((2,), torch.float32, [])


# ------------------------------------------------------------------ skip / tied / frozen / ends
def test_skip_tied_frozen_and_both_ends_have_meaning():
    """Issue 15 item 6: skip gives no fragments; a tied name's copy is named after the tensor it
    is tied to (replicas on convert) and absent from flat layouts; frozen parameters leave
    flat groups (buffer: whole, each: their own partition); first(pp), last(pp) = both ends."""
    from ucp.lang import parse

    spec = parse('''axes pp, dp
param "skipped" with skip
param "emb" = flat(over=dp, group=g) state model = replicate(over=dp) with first(pp), last(pp)
param "head" = flat(over=dp, group=g) state model = replicate(over=dp) with tied("emb"), last(pp)
param "w" = flat(over=dp, group=g)
param "e.{i}" = flat(over=dp, group=h, partition=each)
''', "s.ucp")
    b = spec.bind({"pp": 2, "dp": 2})
    shapes = {"skipped": (3,), "emb": (4, 2), "head": (4, 2), "w": (5,), "e.0": (3,), "e.1": (4,)}
    for pp in (0, 1):
        frags = b.fragments(shapes, {"pp": pp, "dp": 1}, frozen=["w", "e.1"])
        names = [f.name for f in frags]
        assert "skipped" not in names and not b.holds("skipped", {"pp": pp})
        assert names.count("emb") == 1 and "head" not in names       # tied: not in the group
        g = next(f for f in frags if f.name == "emb")
        assert g.local_name == "g" and g.local_shape == (4,)          # emb alone in group g
        w = next(f for f in frags if f.name == "w")
        assert w.group is None and w.local_shape == (5,)              # frozen, buffer group: whole
        e1 = next(f for f in frags if f.name == "e.1")
        assert e1.group is None and e1.local_shape == (2,)            # frozen, each group: own part
        assert next(f for f in frags if f.name == "e.0").local_shape == (2,)
        model = b.fragments(shapes, {"pp": pp, "dp": 0}, state="model")
        copies = [f for f in model if f.tied_from == "head"]
        assert [(f.name, f.local_name) for f in copies] == ([("emb", "head")] if pp == 1 else [])
        assert [f.local_name for f in model if f.name == "emb" and f.tied_from is None] == ["emb"]
