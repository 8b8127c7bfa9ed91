"""Properties of the planner over random layouts: split/assemble round trips, coverage,
resharding between any two layouts through plan_reads."""
import torch
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from _plan_layouts import layout_st, rand_tensor, save_layout
from ucp.plan import (Box, CoverageError, apply_reads, assemble, check_coverage, dedupe,
                      plan_reads, plan_universal_reads, split)

SETTINGS = dict(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _by_param(ranks, shapes):
    out = {n: [] for n in shapes}
    for _, pairs in ranks:
        for f, t in pairs:
            out[f.name].append((f, t))
    return out


def _mask(shape, boxes):
    m = torch.zeros(shape, dtype=torch.bool)
    for b in boxes:
        m[b.slices()] = True
    return m


@given(layout_st())
@settings(**SETTINGS)
def test_split_assemble_roundtrip_and_coverage(layout):
    rules, shapes, deg = layout
    tensors = {n: rand_tensor(s, i) for i, (n, s) in enumerate(shapes.items())}
    ranks = save_layout(rules, shapes, deg, tensors)
    per = _by_param(ranks, shapes)
    for n, items in per.items():
        frs = [f for f, _ in items]
        check_coverage(n, shapes[n], frs)
        got = assemble(shapes[n], tensors[n].dtype, items)
        assert torch.equal(got, tensors[n]), (n, rules[n].ops)
        for f, t in items:
            assert tuple(t.shape) == f.local_shape
            # every local element outside the pieces is padding (zero)
            covered = torch.zeros(f.local_shape, dtype=torch.bool)
            for p in f.pieces:
                assert p.src.numel == p.dst.numel
                covered[p.dst.slices()] = True
            if f.group is None:
                assert (t[~covered] == 0).all()
            # pieces never overlap inside one local tensor
            assert int(covered.sum()) == f.numel
        # dropping one partition (every replica of it) leaves exactly its region uncovered
        reps = [g[0][0] for g in dedupe(frs)]
        victims = [f for f in reps if f.numel]
        if victims:
            v = victims[len(victims) // 2]
            rest = [f for f in frs if f.partition_key != v.partition_key]
            with pytest.raises(CoverageError) as ei:
                check_coverage(n, shapes[n], rest)
            assert n in str(ei.value) and "not covered" in str(ei.value)
            assert torch.equal(_mask(shapes[n], ei.value.holes), _mask(shapes[n], [p.src for p in v.pieces]))
            assert str(ei.value.holes[0]) in str(ei.value)


@given(layout_st(), st.data())
@settings(**SETTINGS)
def test_reshard_via_plan_reads(layout_a, data):
    rules_a, shapes, deg_a = layout_a
    rules_b, _, deg_b = data.draw(layout_st(shapes=shapes))
    tensors = {n: rand_tensor(s, i) for i, (n, s) in enumerate(shapes.items())}
    saved_ranks = save_layout(rules_a, shapes, deg_a, tensors)
    saved = [f for _, pairs in saved_ranks for f, _ in pairs]
    locals_ = [t for _, pairs in saved_ranks for _, t in pairs]
    for c, pairs in save_layout(rules_b, shapes, deg_b, tensors):
        for want, _ in pairs:
            reads = plan_reads(saved, want)
            got = apply_reads(reads, want, locals_, dtype=torch.float32)
            assert torch.equal(got, split(tensors[want.name], want)), (want, rules_a[want.name].ops)
            # each wanted element is read once (Average replicas: once per replica)
            for grp_size in {len(g) for g in dedupe([f for f in saved if f.name == want.name])}:
                if grp_size == 1:
                    assert sum(r.numel for r in reads) == want.numel
            for r in reads:
                assert r.saved_dst.numel == r.want_dst.numel == r.src.numel
            # from the universal tensor: one read per piece, exactly the bytes needed
            ur = plan_universal_reads(want)
            assert sum(r.numel for r in ur) == want.numel
            got = apply_reads(ur, want, universal=tensors[want.name], dtype=torch.float32)
            assert torch.equal(got, split(tensors[want.name], want))


@given(layout_st())
@settings(max_examples=60, deadline=None)
def test_plan_reads_reports_missing_region(layout):
    rules, shapes, deg = layout
    tensors = {n: rand_tensor(s, i) for i, (n, s) in enumerate(shapes.items())}
    ranks = save_layout(rules, shapes, deg, tensors)
    saved = [f for _, pairs in ranks for f, _ in pairs]
    n = next(iter(shapes))
    reps = [g[0][0] for g in dedupe([f for f in saved if f.name == n])]
    victims = [f for f in reps if f.numel]
    if not victims:
        return
    v = victims[0]
    rest = [f for f in saved if f.partition_key != v.partition_key]
    from ucp.plan import Fragment, Piece
    want = Fragment(n, n, (), shapes[n], (Piece(Box.full(shapes[n]), Box.full(shapes[n])),),
                    global_shape=shapes[n])
    with pytest.raises(CoverageError) as ei:
        plan_reads(rest, want)
    assert torch.equal(_mask(shapes[n], ei.value.holes), _mask(shapes[n], [p.src for p in v.pieces]))


# ------------------------------------------------------------------ placement, per-state layouts
@given(st.integers(0, 40), st.integers(1, 5), st.integers(1, 4), st.sampled_from(["chunk", "tensor_split", "even", "sizes"]),
       st.data())
@settings(max_examples=300, deadline=None)
def test_placement_with_virtual_chunks_is_a_bijection(count, k, chunks, split_, data):
    """Every item lives on exactly one (rank, chunk, local index), consecutive in its chunk,
    and global_index inverts locate (ucp.plan.placement, the one placement rule)."""
    from ucp.plan import Renumber
    from ucp.plan.placement import chunk_sizes, global_index, locate

    n = k * chunks
    if split_ == "even" and count % n:
        split_ = "tensor_split"
    sizes = None
    if split_ == "sizes":
        cuts = sorted(data.draw(st.lists(st.integers(0, count), min_size=n - 1, max_size=n - 1)))
        sizes = tuple(b - a for a, b in zip([0] + cuts, cuts + [count]))
    r = Renumber("i", "pp", count, split_, sizes, chunks=chunks, chunk="v" if chunks > 1 else None)
    seen = set()
    for i in range(count):
        loc = locate(r, i, k)
        assert 0 <= loc.rank < k and 0 <= loc.chunk < chunks
        assert global_index(r, k, loc.rank, loc.chunk, loc.local) == i
        seen.add((loc.rank, loc.chunk, loc.local))
    assert len(seen) == count
    per = chunk_sizes(r, k)
    assert sum(per) == count
    for rank in range(k):
        for c in range(chunks):
            assert global_index(r, k, rank, c, per[c * k + rank]) is None


@given(layout_st(), st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_per_state_layouts_plan_each_state_on_its_own(layout, data):
    """A rule with its own pipeline for a state plans that state exactly like a rule whose
    main pipeline is that state's; other states keep the main pipeline."""
    import dataclasses

    from ucp.plan import mesh_coords, rank_fragments
    rules_a, shapes, deg = layout
    rules_b, _, _ = data.draw(layout_st(shapes=shapes, degrees=deg))
    both = {n: dataclasses.replace(rules_a[n], states=(("exp_avg", rules_b[n].ops),)) for n in shapes}
    only_b = {n: dataclasses.replace(rules_a[n], ops=rules_b[n].ops) for n in shapes}
    for c in mesh_coords(deg):
        assert rank_fragments(both, shapes, deg, c, state="exp_avg") == rank_fragments(only_b, shapes, deg, c)
        assert rank_fragments(both, shapes, deg, c, state="param") == rank_fragments(rules_a, shapes, deg, c)
