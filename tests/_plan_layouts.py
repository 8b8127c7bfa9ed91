"""Hypothesis strategies for random layouts (shared by the tests/test_plan_*.py files)."""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from ucp.plan import (Average, BoundRule, Flat, Pad, Parts, Replicate, Shard, mesh_coords,
                      rank_fragments, split, split_group)

AXES = ("tp", "dp", "sp")


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def composition(draw, n, k):
    """k non-negative ints summing to n."""
    cuts = sorted(draw(st.lists(st.integers(0, n), min_size=k - 1, max_size=k - 1)))
    bounds = [0] + cuts + [n]
    return tuple(b - a for a, b in zip(bounds, bounds[1:]))


def draw_split(draw, n, k, allow_sizes=True):
    opts = ["chunk", "tensor_split"] + (["even"] if n % k == 0 else []) + (["sizes"] if allow_sizes else [])
    s = draw(st.sampled_from(opts))
    return (s, composition(draw, n, k)) if s == "sizes" else (s, None)


def shard(draw, dim, n, axis, deg, allow_sizes=True):
    s, sizes = draw_split(draw, n, deg[axis], allow_sizes)
    return Shard(dim, axis, s, sizes)


@st.composite
def degrees_st(draw):
    return {"tp": draw(st.integers(1, 4)), "dp": draw(st.integers(1, 3)), "sp": draw(st.sampled_from([1, 2]))}


TEMPLATES = ("shard", "pad_shard", "parts_shard", "parts_groups_shard", "shard_shard_same",
             "shard_shard_diff", "shard_flat", "pad_shard_flat", "parts_shard_flat",
             "parts_groups_shard_flat", "shard_shard_flat", "replicate", "average", "flat", "none")


def draw_ops(draw, shape, deg, template=None, flat_group=None):
    """Ops of one rule for a tensor of ``shape``; falls back to plain shard when the template
    does not fit the shape."""
    nd = len(shape)
    t = template or draw(st.sampled_from(TEMPLATES))
    if nd == 0 and t not in ("none", "replicate", "average", "flat"):
        t = "flat"
    ops: list = []
    d = draw(st.integers(0, nd - 1)) if nd else 0
    n = shape[d] if nd else 1
    if t == "shard" or t == "shard_flat":
        ops = [shard(draw, d, n, "tp", deg)]
    elif t in ("pad_shard", "pad_shard_flat"):
        m = draw(st.integers(1, 4))
        padded = -(-n // m) * m
        ops = [Pad(d, m), shard(draw, d, padded, "tp", deg)]
    elif t in ("parts_shard", "parts_shard_flat"):
        m = draw(st.integers(1, 3))
        sizes = composition(draw, n, m)
        s = draw(st.sampled_from(["chunk", "tensor_split"] + (["even"] if all(x % deg["tp"] == 0 for x in sizes) else [])))
        names = tuple(f"p{i}" for i in range(m))
        ops = [Parts(d, names, draw(st.sampled_from([sizes, None])) if n % m == 0 and len(set(sizes)) == 1 else sizes),
               Shard(d, "tp", s)]
    elif t in ("parts_groups_shard", "parts_groups_shard_flat"):
        k = deg["tp"]
        gs = [g for g in divisors(n) if g % k == 0 and g > 1] if n else []
        if not gs:
            ops = [shard(draw, d, n, "tp", deg)]
        else:
            G = draw(st.sampled_from(gs))
            m = draw(st.integers(1, 3))
            per = composition(draw, n // G, m)
            ops = [Parts(d, tuple(f"p{i}" for i in range(m)), tuple(q * G for q in per), groups=G),
                   Shard(d, "tp", "even")]
    elif t == "shard_shard_same":
        a = shard(draw, d, n, "tp", deg)
        lens = _split_lens(n, deg["tp"], a)
        # the second split must be valid for every tp block: use a convention valid for any n
        s = draw(st.sampled_from(["chunk", "tensor_split"] + (["even"] if all(x % deg["sp"] == 0 for x in lens) else [])))
        ops = [a, Shard(d, "sp", s)]
    elif t in ("shard_shard_diff", "shard_shard_flat"):
        if nd < 2:
            ops = [shard(draw, d, n, "tp", deg)]
        else:
            d2 = draw(st.sampled_from([x for x in range(nd) if x != d]))
            ops = [shard(draw, d, n, "tp", deg), shard(draw, d2, shape[d2], "sp", deg)]
    elif t == "replicate":
        ops = ([shard(draw, d, n, "tp", deg)] if nd else []) + [Replicate("sp")]
    elif t == "average":
        ops = ([shard(draw, d, n, "tp", deg)] if nd else []) + [Average("sp")]
    elif t == "flat":
        ops = []
    if t.endswith("flat") or flat_group is not None:
        ops = ops + [Flat("dp", group=flat_group, align=draw(st.integers(1, 3)),
                          param_align=(draw(st.integers(1, 4)) if flat_group else 1))]
    return ops


def _split_lens(n, k, sh):
    from ucp.plan import split_sizes
    return split_sizes(n, k, sh.split, sh.sizes)


shape_st = st.lists(st.integers(0, 7), min_size=1, max_size=4).map(tuple)


@st.composite
def layout_st(draw, shapes=None, max_params=3, degrees=None):
    """(rules, shapes, degrees): 1..max_params params, maybe one grouped-flat group."""
    deg = degrees or draw(degrees_st())
    if shapes is None:
        k = draw(st.integers(1, max_params))
        shapes = {f"w{i}": draw(st.one_of(shape_st, st.just(()))) if i else draw(shape_st) for i in range(k)}
    names = list(shapes)
    grouped = set()
    if len(names) > 1 and draw(st.booleans()):
        grouped = set(draw(st.lists(st.sampled_from(names), min_size=2, unique=True)))
    g_align = draw(st.integers(1, 3))
    g_palign = draw(st.integers(1, 4))
    # the group's layout: concatenation partitioned (buffer) or per-member partitions
    # concatenated (each), buckets, member order, stripped padding
    g_partition = draw(st.sampled_from(["buffer", "each"]))
    g_extra = dict(partition=g_partition, bucket=draw(st.sampled_from([0, 1, 5, 17])),
                   order=draw(st.sampled_from(["model", "reverse", "round_robin"])),
                   strip=g_partition == "buffer" and draw(st.booleans()))
    rules = {}
    for n in names:
        if n in grouped:
            pre = draw(st.sampled_from(["shard", "pad_shard", "parts_shard", "parts_groups_shard",
                                        "shard_shard_diff", "replicate", "none"]))
            ops = draw_ops(draw, shapes[n], deg, pre)
            ops = [o for o in ops if not isinstance(o, Flat)] + [Flat("dp", group="g0", align=g_align,
                                                                      param_align=g_palign, **g_extra)]
        else:
            ops = draw_ops(draw, shapes[n], deg)
        rules[n] = BoundRule(pattern=n, local="L." + n, ops=tuple(ops), origin=f"test:{n}")
    return rules, dict(shapes), deg


def rand_tensor(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32) if shape else torch.randn((), generator=g)


def save_layout(rules, shapes, deg, tensors):
    """Every rank's (fragment, local tensor) pairs: a list of ranks, each a list of pairs."""
    ranks = []
    for c in mesh_coords(deg):
        frs = rank_fragments(rules, shapes, deg, c)
        by_local: dict[str, list] = {}
        for f in frs:
            by_local.setdefault(f.local_name, []).append(f)
        pairs = []
        for f in frs:
            if f.group is not None:
                pairs.append((f, None))
            else:
                pairs.append((f, split(tensors[f.name], f)))
        bufs = {k: split_group(tensors, v) for k, v in by_local.items() if v[0].group is not None}
        pairs = [(f, bufs[f.local_name] if t is None else t) for f, t in pairs]
        ranks.append((c, pairs))
    return ranks
