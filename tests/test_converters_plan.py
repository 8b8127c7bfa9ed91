"""Every spec in converters/ drives the planner end to end on a model of its naming scheme:
split the full tensors for every rank, reassemble, reshard to another layout — bit-exact —
and the placement rules (pipeline stages, experts, first/last stage) put each tensor where
the framework keeps it."""

import pytest
import torch

from ucp.lang import load
from ucp.plan import (assemble, check_coverage, plan_reads, apply_reads, rank_fragments,
                      split)

L, H, KV, HD, F, V, E = 4, 6, 2, 5, 22, 101, 4
HID = H * HD


def megatron_shapes(moe=False):
    s = {"embedding.word_embeddings.weight": (V, HID)}
    for i in range(L):
        p = f"decoder.layers.{i}."
        s[p + "self_attention.linear_qkv.weight"] = ((H + 2 * KV) * HD, HID)
        s[p + "self_attention.linear_qkv.layer_norm_weight"] = (HID,)
        s[p + "self_attention.linear_proj.weight"] = (HID, H * HD)
        s[p + "mlp.linear_fc1.layer_norm_weight"] = (HID,)
        if moe:
            s[p + "mlp.router.weight"] = (E, HID)
            for e in range(E):
                s[p + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = (2 * F, HID)
                s[p + f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = (HID, F)
        else:
            s[p + "mlp.linear_fc1.weight"] = (2 * F, HID)
            s[p + "mlp.linear_fc2.weight"] = (HID, F)
    s["decoder.final_layernorm.weight"] = (HID,)
    s["output_layer.weight"] = (V, HID)
    return s


def llama_shapes():
    s = {"model.embed_tokens.weight": (V, HID)}
    for i in range(L):
        p = f"model.layers.{i}."
        s[p + "self_attn.q_proj.weight"] = (H * HD, HID)
        s[p + "self_attn.k_proj.weight"] = (KV * HD, HID)
        s[p + "self_attn.v_proj.weight"] = (KV * HD, HID)
        s[p + "self_attn.o_proj.weight"] = (HID, H * HD)
        s[p + "mlp.gate_proj.weight"] = (F, HID)
        s[p + "mlp.up_proj.weight"] = (F, HID)
        s[p + "mlp.down_proj.weight"] = (HID, F)
        s[p + "input_layernorm.weight"] = (HID,)
        s[p + "post_attention_layernorm.weight"] = (HID,)
    s["model.norm.weight"] = (HID,)
    s["lm_head.weight"] = (V, HID)
    return s


CONSTS = {"layers": L, "heads": H, "kv_heads": KV, "head_dim": HD, "experts": E, "vocab_multiple": 8}


def _layout(spec, shapes, degrees, consts):
    bound = spec.bind(degrees=degrees, constants={k: v for k, v in consts.items()
                                                  if k in spec.constants_needed or k in spec.constants})
    matches = bound.resolve(list(shapes), shapes)
    rules = {n: m.rule for n, m in matches.items()}
    out = {}
    for coords in bound.mesh():      # every rank, second decompositions (edp, ep, etp) included
        out[tuple(sorted(coords.items()))] = rank_fragments(
            rules, shapes, bound.degrees, coords, local_name=bound.local_name,
            captures=lambda n: matches[n].captures)
    return bound, out


def _full(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in shapes.items()}


def _roundtrip(spec_name, shapes, deg_a, deg_b, consts=CONSTS):
    spec = load(spec_name)
    full = _full(shapes)
    _, layout_a = _layout(spec, shapes, deg_a, consts)
    _, layout_b = _layout(spec, shapes, deg_b, consts)
    by_name_a = {}
    for frs in layout_a.values():
        for f in frs:
            by_name_a.setdefault(f.name, []).append(f)
    assert set(by_name_a) == set(shapes), "every tensor lives on some rank"
    for n, frs in by_name_a.items():
        check_coverage(n, shapes[n], frs)
        if frs[0].group is None:
            locals_ = [(f, split(full[n], f)) for f in frs]
            assert torch.equal(assemble(shapes[n], torch.float32, locals_), full[n]), n
    # reshard A -> B per tensor through plan_reads, compare to splitting for B directly
    for frs_b in layout_b.values():
        for want in frs_b:
            if want.group is not None:
                continue
            saved = [f for f in by_name_a[want.name] if f.group is None]
            if not saved:
                continue
            reads = plan_reads(saved, want)
            got = apply_reads(reads, want, [split(full[want.name], f) for f in saved])
            assert torch.equal(got, split(full[want.name], want)), want.name
    return layout_a


@pytest.mark.parametrize("deg_a,deg_b", [({"tp": 2, "pp": 2}, {"tp": 1, "pp": 4}),
                                         ({"tp": 2, "pp": 1}, {"tp": 1, "pp": 2})])
def test_megatron_gpt_dense(deg_a, deg_b):
    layout = _roundtrip("megatron_gpt", megatron_shapes(), deg_a, deg_b)
    pp = deg_a["pp"]
    for key, frs in layout.items():
        c = dict(key)
        names = {f.name for f in frs}
        assert ("embedding.word_embeddings.weight" in names) == (c["pp"] == 0)
        assert ("output_layer.weight" in names) == (c["pp"] == pp - 1)
        layers = {int(n.split(".")[2]) for n in names if n.startswith("decoder.layers.")}
        assert layers == set(range(c["pp"] * L // pp, (c["pp"] + 1) * L // pp))
        for f in frs:
            if f.name.startswith("decoder.layers."):
                local_i = int(f.local_name.split(".")[3])      # model{v}.decoder.layers.{i}
                assert local_i == int(f.name.split(".")[2]) - c["pp"] * L // pp
    # the embedding is padded to a multiple of vocab_multiple * tp and split evenly
    emb = [f for frs in layout.values() for f in frs if f.name == "embedding.word_embeddings.weight"]
    tp = deg_a["tp"]
    padded = -(-V // (8 * tp)) * 8 * tp
    assert all(f.local_shape == (padded // tp, HID) for f in emb)


def test_megatron_gpt_moe_experts_over_ep():
    shapes = megatron_shapes(moe=True)
    layout = _roundtrip("megatron_gpt", shapes, {"tp": 2, "ep": 2, "pp": 2},
                        {"tp": 1, "dp": 4, "ep": 4, "pp": 1})
    for key, frs in layout.items():
        c = dict(key)
        for f in frs:
            if ".local_experts." in f.name:
                e = int(f.name.split(".local_experts.")[1].split(".")[0])
                assert e // (E // 2) == c["ep"]
                assert f.local_name.split(".local_experts.")[1].split(".")[0] == str(e % (E // 2))


@pytest.mark.parametrize("spec_name,deg_a,deg_b", [
    ("torch_tp", {"tp": 2}, {"tp": 3}),
    ("torch_fsdp2", {"dp": 3}, {"dp": 4}),
    ("deepspeed_zero3", {"dp": 3}, {"dp": 2}),
    ("torch_fsdp2_tp", {"dp": 2, "tp": 2}, {"dp": 3, "tp": 1}),
    ("hf_llama", {}, {}),
])
def test_llama_layouts(spec_name, deg_a, deg_b):
    _roundtrip(spec_name, llama_shapes(), deg_a, deg_b, consts={})


@pytest.mark.parametrize("deg", [{"dp": 3}, {"dp": 2, "tp": 2}])
def test_deepspeed_zero12_group_buffer(deg):
    """The ZeRO-1/2 group buffer equals DeepSpeed's construction: cat of the (TP-local)
    flattened params in order, padded to a multiple of 2*dp, chunked over dp, saved with the
    trailing padding stripped."""
    shapes = llama_shapes()
    spec = load("deepspeed_zero12")
    full = _full(shapes)
    _, layout = _layout(spec, shapes, deg, {})
    tp, dp = deg.get("tp", 1), deg["dp"]
    for key, frs in layout.items():
        c = dict(key)
        flats = []
        for n in shapes:
            t = full[n]
            if tp > 1:
                if any(x in n for x in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
                    t = t.chunk(tp, 0)[c["tp"]]
                elif any(x in n for x in ("o_proj", "down_proj")):
                    t = t.chunk(tp, 1)[c["tp"]]
            flats.append(t.flatten())
        buf = torch.cat(flats)
        total = buf.numel()
        buf = torch.cat([buf, buf.new_zeros(-buf.numel() % (2 * dp))])
        r, part = c.get("dp", 0), buf.numel() // dp
        want = buf.chunk(dp)[r][:max(0, min(part, total - r * part))]
        got = torch.zeros(want.shape)
        for f in frs:
            assert f.local_shape == tuple(want.shape)
            for pc in f.pieces:
                got[pc.dst.slices()] = full[f.name][pc.src.slices()].reshape(-1)
        assert torch.equal(got, want)


def test_megatron_to_hf_renames_cover_every_hf_name():
    spec = load("megatron_to_hf_llama")
    hf = [n for n in llama_shapes() if n]
    mapped = spec.rename_all(hf)
    meg = megatron_shapes()
    for h, (m, part) in mapped.items():
        assert m in meg, (h, m)
        assert spec.unrename(m, part) == h
