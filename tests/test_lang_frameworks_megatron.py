"""The bundled Megatron-Core spec against Megatron-Core's own algorithms (issue 15, items 3, 4,
5, 8), imported and run on CPU:

* interleaved (virtual) pipeline stages: ``get_transformer_layer_offset`` /
  ``get_num_layers_to_build``, even and uneven (first / last stage sizes);
* distributed-optimizer buckets: ``_ParamAndGradBuffer``'s ``param_index_map`` and
  ``bucket_indices`` (reverse order, 64-element param alignment, buckets padded to
  lcm(dp, 128)) for degrees that do not divide the sizes;
* dense tp x dp and expert etp x ep x edp decompositions of the same ranks:
  ``parallel_state.RankGenerator``;
* vocabulary padding rows kept through a round trip at the same tp.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("megatron.core")

from ucp.lang import load  # noqa: E402
from ucp.plan import Renumber, assemble, rank_fragments, split  # noqa: E402
from ucp.plan.placement import locate  # noqa: E402

MODEL = {"layers": 4, "heads": 4, "kv_heads": 2, "head_dim": 12}


def _megatron_config(layers, pp, vp, first=None, last=None):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=layers, hidden_size=48, num_attention_heads=4,
                             pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
                             virtual_pipeline_model_parallel_size=vp if vp > 1 else None,
                             num_layers_in_first_pipeline_stage=first,
                             num_layers_in_last_pipeline_stage=last)


def _megatron_owner(cfg, pp, vp) -> dict[int, tuple[int, int, int]]:
    """{global layer: (stage, model chunk, local index)} by Megatron's own functions."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    out = {}
    for s in range(pp):
        for v in range(vp):
            kw = {"vp_stage": v if vp > 1 else None, "pp_rank": s}
            off = get_transformer_layer_offset(cfg, **kw)
            for j in range(get_num_layers_to_build(cfg, **kw)):
                out[off + j] = (s, v, j)
    return out


@pytest.mark.parametrize("layers,pp,vp", [(12, 3, 2), (8, 2, 4), (6, 3, 1), (12, 2, 3)])
def test_interleaved_stages_match_megatron(layers, pp, vp):
    owner = _megatron_owner(_megatron_config(layers, pp, vp), pp, vp)
    bound = load("megatron_gpt").bind({"pp": pp}, {**MODEL, "layers": layers, "vp": vp})
    for i, (s, v, j) in owner.items():
        name = f"decoder.layers.{i}.self_attention.linear_proj.weight"
        assert bound.placement(name) == {"pp": s}
        local = f"model{v}.decoder.layers.{j}.self_attention.linear_proj.weight"
        assert bound.local_name(name, {"pp": s}) == local
        assert bound.global_name(local, {"pp": s})[0] == name
        assert all(bound.local_name(name, {"pp": o}) is None for o in range(pp) if o != s)


@pytest.mark.parametrize("layers,pp,vp,first,last", [(12, 4, 2, 2, 2), (7, 3, 1, 1, None),
                                                     (9, 3, 1, None, 1)])
def test_uneven_stages_match_megatron(layers, pp, vp, first, last):
    """Uneven first / last stages as explicit chunk sizes (one per stage and model chunk)."""
    owner = _megatron_owner(_megatron_config(layers, pp, vp, first, last), pp, vp)
    sizes = [0] * (pp * vp)
    for s, v, _ in owner.values():
        sizes[v * pp + s] += 1
    r = Renumber("i", "pp", layers, "sizes", tuple(sizes), chunks=vp, chunk="v")
    for i, (s, v, j) in owner.items():
        loc = locate(r, i, pp)
        assert (loc.rank, loc.chunk, loc.local) == (s, v, j)


def _buffer(dp: int, bucket_size, shapes: dict[str, tuple], shared=()):
    """Megatron-Core's own buffer layout for parameters of these shapes (model order);
    ``shared`` names parameters marked ``shared_embedding``."""
    import megatron.core.distributed.param_and_grad_buffer as pgb
    from megatron.core.distributed import DistributedDataParallelConfig

    class Group:
        def __init__(self, n):
            self.n = n

        def size(self):
            return self.n

        def rank(self):
            return 0

    class Groups:
        tp, dp_cp = Group(1), Group(dp)

    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes.values()]
    for p, n in zip(params, shapes):
        p.shared_embedding = n in shared
    cfg = DistributedDataParallelConfig(use_distributed_optimizer=True, bucket_size=bucket_size)
    mp = pytest.MonkeyPatch()
    mp.setattr(torch.cuda, "current_device", lambda: "cpu")       # allocate on CPU
    mp.setattr(pgb, "log_on_each_pipeline_stage", lambda *a, **k: None)
    try:
        buf = pgb._ParamAndGradBuffer(cfg, torch.float32, torch.float32, params, Group(dp),
                                      bucket_size, {p: n for p, n in zip(params, shapes)}, 1.0,
                                      list(range(len(params))), False, Groups())
    finally:
        mp.undo()
    index = {n: buf.param_index_map[p][:2] for n, p in zip(shapes, params)}
    return index, list(buf.bucket_indices)


def _gpt_shapes(vocab_padded=1024):
    h, ffn = 48, 80
    shapes = {"embedding.word_embeddings.weight": (vocab_padded, h)}
    for i in range(MODEL["layers"]):
        p = f"decoder.layers.{i}."
        shapes.update({p + "self_attention.linear_qkv.layer_norm_weight": (h,),
                       p + "self_attention.linear_qkv.weight": (96, h),
                       p + "self_attention.linear_proj.weight": (h, 48),
                       p + "mlp.linear_fc1.layer_norm_weight": (h,),
                       p + "mlp.linear_fc1.weight": (2 * ffn, h),
                       p + "mlp.linear_fc2.weight": (h, ffn)})
    shapes.update({"decoder.final_layernorm.weight": (h,), "output_layer.weight": (vocab_padded, h)})
    return shapes


@pytest.mark.parametrize("dp,bucket_size", [(3, None), (5, 20000), (2, 7000), (7, 3000)])
def test_distributed_optimizer_buckets_match_megatron(dp, bucket_size):
    shapes = _gpt_shapes()
    index, buckets = _buffer(dp, bucket_size, shapes)
    torch.manual_seed(0)
    full = {n: torch.randn(s) for n, s in shapes.items()}
    bound = load("megatron_gpt").bind({"dp": dp}, {**MODEL, "distributed_optimizer": 1,
                                                   "bucket_size": bucket_size or 0})
    # the buffer holds Megatron's own tensors (QKV interleaved by group): the model layout
    model = {f.name: split(full[f.name], f) for f in bound.fragments(shapes, {"dp": 0})}
    flat = torch.zeros(buckets[-1][1])
    for n, (a, b) in index.items():
        flat[a:b] = model[n].flatten()
    for r in range(dp):
        got: dict = {}
        for f in bound.fragments(shapes, {"dp": r}, state="exp_avg"):
            buf = got.setdefault(f.local_name, torch.zeros(f.local_shape))
            for p in f.pieces:
                buf[p.dst.slices()] = full[f.name][p.src.slices()].reshape(-1)
        keys = [f"dense.0.{b}" for b in range(len(buckets))] if bucket_size else ["dense.0"]
        assert sorted(got, key=lambda k: [int(x) for x in k.split(".")[1:]]) == keys
        for key, (start, stop) in zip(keys, buckets):
            shard = (stop - start) // dp
            assert torch.equal(got[key], flat[start + r * shard:start + (r + 1) * shard]), (r, key)


@pytest.mark.parametrize("tp,dp,ep,etp", [(2, 4, 2, 1), (2, 2, 4, 1), (4, 3, 2, 2), (1, 6, 3, 1)])
def test_expert_decomposition_matches_rank_generator(tp, dp, ep, etp):
    from megatron.core.parallel_state import RankGenerator

    pp = 2
    edp = tp * dp // (ep * etp)
    dense = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    expert = RankGenerator(tp=etp, ep=ep, dp=edp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")

    def position(gen, token):
        return {r: g.index(r) for g in gen.get_ranks(token) for r in g}

    d = {a: position(dense, a) for a in ("tp", "dp", "pp")}
    e = {"etp": position(expert, "tp"), "ep": position(expert, "ep"), "edp": position(expert, "dp")}
    bound = load("megatron_gpt").bind({"tp": tp, "pp": pp, "dp": dp, "ep": ep, "etp": etp},
                                      {**MODEL, "kv_heads": 4, "experts": 4 * ep})
    assert bound.degrees["edp"] == edp
    for rank in range(tp * dp * pp):
        coords = bound.coords({a: d[a][rank] for a in d})
        assert {a: coords[a] for a in e} == {a: e[a][rank] for a in e}, rank
    assert len(bound.mesh()) == tp * dp * pp


def test_dense_zero_over_full_dp_with_experts():
    """Declaring ep keeps the dense parameters' flat partitions over the whole dp."""
    bound = load("megatron_gpt").bind({"dp": 4, "ep": 2}, {**MODEL, "experts": 4,
                                                          "distributed_optimizer": 1})
    shapes = {"decoder.final_layernorm.weight": (48,),
              "decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight": (48, 80)}
    locals_ = {}
    for c in bound.mesh():
        for f in bound.fragments(shapes, c, state="param"):
            locals_.setdefault(f.name, set()).add((f.local_name, f.local_shape))
    assert locals_["decoder.final_layernorm.weight"] == {("dense.0", (128 // 4,))} or \
        {s for _, s in locals_["decoder.final_layernorm.weight"]} == {(32,)}
    # experts: 2 ep ranks hold expert 1 once each on edp=2 -> partitions of lcm(2,128)
    assert {s for _, s in locals_["decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight"]} \
        == {(math.lcm(2, 128) * math.ceil(48 * 80 / math.lcm(2, 128)) // 2,)}


@pytest.mark.parametrize("tp_a,tp_b", [(2, 2), (2, 4), (4, 2)])
def test_vocabulary_padding_rows_kept(tp_a, tp_b):
    """The universal output layer holds the saved padded rows (trained values); the same tp
    gives them back bit-exactly, a larger padding appends zero rows (LANGUAGE.md §5.5)."""
    mult = 128
    saved = torch.randn(1003 + (-1003 % (mult * tp_a)), 48)       # as Megatron holds it
    name = "output_layer.weight"

    def frags(tp):
        b = load("megatron_gpt").bind({"tp": tp}, {**MODEL, "kv_heads": 4, "vocab_multiple": mult})
        return [f for c in b.mesh() for f in b.fragments({name: tuple(saved.shape)}, c)]

    a = frags(tp_a)
    locals_a = [(f, split(saved, f)) for f in a]
    back = assemble(saved.shape, saved.dtype, locals_a)
    assert torch.equal(back, saved)
    for f in frags(tp_b):
        local = split(back, f)
        rows = f.local_shape[0]
        start = f.coord("tp") * rows
        want = torch.zeros(local.shape)
        have = max(0, min(rows, saved.shape[0] - start))
        want[:have] = saved[start:start + have]
        assert torch.equal(local, want)
    assert rank_fragments  # the public planner entry used by the engine stays exported


def test_tied_output_layer_on_the_last_stage():
    """share_embeddings: the last stage's output_layer.weight is a copy of the word embeddings
    (Megatron's shared embedding), written on export under its own name, a replica on convert."""
    from ucp.plan import check_coverage

    bound = load("megatron_gpt").bind({"pp": 2, "tp": 2}, {**MODEL, "kv_heads": 2, "share_embeddings": 1})
    shapes = {"embedding.word_embeddings.weight": (1024, 48), "output_layer.weight": (1024, 48)}
    frags = [f for c in bound.mesh() for f in bound.fragments(shapes, c)]
    copies = [f for f in frags if f.tied_from == "output_layer.weight"]
    assert {f.coord("pp") for f in copies} == {1} and len(copies) == 2
    assert all(f.name == "embedding.word_embeddings.weight" and f.local_name == "output_layer.weight"
               for f in copies)
    check_coverage("embedding.word_embeddings.weight", shapes["embedding.word_embeddings.weight"],
                   [f for f in frags if f.name == "embedding.word_embeddings.weight"])


@pytest.mark.parametrize("dp,bucket_size", [(2, None), (3, 9000)])
def test_shared_embedding_gets_its_own_bucket(dp, bucket_size):
    """with own_bucket: Megatron's shared embedding (pp > 1, tied output) closes the bucket
    before it and its own after it (``_does_param_require_new_bucket``)."""
    from ucp.plan import Flat
    from ucp.plan.flat import buffer_slots

    shapes = {k: v for k, v in _gpt_shapes().items() if k != "output_layer.weight"}
    names = list(shapes)
    index, buckets = _buffer(dp, bucket_size, shapes, shared={"embedding.word_embeddings.weight"})
    flat = Flat("dp", "dense.0", math.lcm(dp, 128) // dp, 64, "buffer", bucket_size or 0, "reverse")
    alone = [n == "embedding.word_embeddings.weight" for n in names]
    numels = [math.prod(shapes[n]) for n in names]
    for r in range(dp):
        slots = buffer_slots(numels, flat, dp, r, alone)
        for n, slot in zip(names, slots):
            b = int(slot.local_name.split(".")[-1])
            start, stop = buckets[b]
            shard = (stop - start) // dp
            a, z = index[n]
            lo = max(a, start + r * shard)
            hi = min(z, start + (r + 1) * shard)
            assert slot.length == shard and start <= a < stop
            assert (slot.lo, slot.hi) == ((lo - a, hi - a) if lo < hi else (slot.lo, slot.lo))
            if lo < hi:
                assert slot.offset == lo - start - r * shard
