"""Binding: renumbering local <-> global, the bundled converters, renames."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ucp.lang import CONVERTERS, SpecError, UnmatchedError, load, parse, split_sizes
from ucp.plan.ops import Flat, Pad, Parts, Renumber, Replicate, Shard

MODEL = {"layers": 4, "heads": 8, "kv_heads": 2, "head_dim": 16, "experts": 4}


# --------------------------------------------------------------------------- renumbering
def test_local_name_example():
    b = parse('axes pp\nconfig layers\nparam "decoder.layers.{i}.w" = layers(i, over=pp, count=layers)',
              "r.ucp").bind({"pp": 2}, {"layers": 8})
    assert b.local_name("decoder.layers.5.w", {"pp": 1}) == "decoder.layers.1.w"
    assert b.local_name("decoder.layers.5.w", {"pp": 0}) is None
    assert b.global_name("decoder.layers.1.w", {"pp": 1})[0] == "decoder.layers.5.w"
    assert b.placement("decoder.layers.5.w") == {"pp": 1}
    assert b.holds("decoder.layers.5.w", {"pp": 1}) and not b.holds("decoder.layers.5.w", {"pp": 0})
    with pytest.raises(SpecError, match="is outside pp renumbering"):
        b.local_name("decoder.layers.8.w", {"pp": 1})
    with pytest.raises(UnmatchedError):
        b.local_name("nope", {})


RENUM = """axes pp, ep, tp
config layers, experts
param "layers.{i}.experts.{e}.fc.weight" local "decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc1.weight"
    = layers(i, over=pp, count=layers, split=SPLIT) | experts(e, over=ep, count=experts, split=SPLIT)
    | shard(0, over=tp)
param "layers.{i}.**" local "decoder.layers.{i}.**" = layers(i, over=pp, count=layers, split=SPLIT)
param "**"
"""


@settings(max_examples=150, deadline=None)
@given(layers=st.integers(1, 13), pp=st.integers(1, 6), experts=st.integers(1, 9),
       ep=st.integers(1, 4), split=st.sampled_from(["tensor_split", "chunk"]), data=st.data())
def test_renumber_round_trip(layers, pp, experts, ep, split, data):
    b = parse(RENUM.replace("SPLIT", split), "r.ucp").bind(
        {"pp": pp, "ep": ep}, {"layers": layers, "experts": experts})
    i = data.draw(st.integers(0, layers - 1))
    e = data.draw(st.integers(0, experts - 1))
    for name in (f"layers.{i}.experts.{e}.fc.weight", f"layers.{i}.attn.qkv.weight", "embed.w"):
        holders = []
        for s in range(pp):
            for r in range(ep):
                coords = {"pp": s, "ep": r}
                local = b.local_name(name, coords)
                if local is None:
                    continue
                holders.append(coords)
                back, m = b.global_name(local, coords)
                assert back == name
                assert m.rule is b.match(name).rule
        # exactly one pipeline stage (and, for experts, one ep rank) holds a renumbered name
        rules = b.match(name).rule.renumber
        axes = {r.axis for r in rules}
        expected = (1 if "pp" in axes else pp) * (1 if "ep" in axes else ep)
        assert len(holders) == expected
        if "pp" in axes:
            sizes = split_sizes(layers, pp, split)
            stage = holders[0]["pp"]
            assert sum(sizes[:stage]) <= i < sum(sizes[:stage + 1])
            local = b.local_name(name, holders[0])
            assert local.startswith(f"decoder.layers.{i - sum(sizes[:stage])}.")


def test_uneven_sizes_renumber():
    b = parse('axes pp\nconfig layers\nparam "l.{i}" = layers(i, over=pp, count=layers, sizes=[3, 1, 2])',
              "u.ucp").bind({"pp": 3}, {"layers": 6})
    got = {i: [(s, b.local_name(f"l.{i}", {"pp": s})) for s in range(3)
               if b.local_name(f"l.{i}", {"pp": s})] for i in range(6)}
    assert got == {0: [(0, "l.0")], 1: [(0, "l.1")], 2: [(0, "l.2")], 3: [(1, "l.0")],
                   4: [(2, "l.0")], 5: [(2, "l.1")]}
    assert b.global_name("l.1", {"pp": 1}) is None          # stage 1 holds one layer only
    assert b.global_name("l.1", {"pp": 2})[0] == "l.5"


def test_global_name_respects_first_match():
    # a local name that maps back to a universal name matched first by another rule is refused
    b = parse('param "a.x" local "l.x"\nparam "a.{n}" local "l.{n}"', "g.ucp").bind()
    assert b.global_name("l.x")[1].rule.origin == "g.ucp:1:1"
    assert b.global_name("l.y")[0] == "a.y"
    assert b.global_name("q") is None


def test_wildcards_in_local():
    b = parse('param "m.*.w.**" local "x.*.y.**"', "w.ucp").bind()
    assert b.local_name("m.a.w.b.c") == "x.a.y.b.c"
    assert b.global_name("x.a.y.b.c")[0] == "m.a.w.b.c"


def test_split_sizes():
    assert split_sizes(10, 4, "chunk") == [3, 3, 3, 1]
    assert split_sizes(5, 4, "chunk") == [2, 2, 1, 0]
    assert split_sizes(10, 4, "tensor_split") == [3, 3, 2, 2]
    assert split_sizes(8, 4, "even") == [2] * 4
    assert split_sizes(6, 2, "sizes", (5, 1)) == [5, 1]
    with pytest.raises(ValueError):
        split_sizes(7, 2, "even")


# --------------------------------------------------------------------------- converters
ALL = sorted(p.stem for p in CONVERTERS.glob("*.ucp"))
DEGREES = [{}, {"tp": 2, "pp": 2, "dp": 4, "ep": 2}, {"tp": 2, "pp": 4, "dp": 2, "ep": 4},
           {"tp": 1, "pp": 1, "dp": 8}]


def test_all_converters_present():
    assert set(ALL) >= {"torch_fsdp2", "torch_tp", "deepspeed_zero12", "deepspeed_zero3",
                        "megatron_gpt", "hf_llama", "megatron_to_hf_llama"}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("degrees", DEGREES, ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()) or "1")
def test_converter_parses_and_binds(name, degrees):
    spec = load(name)
    assert load(CONVERTERS / f"{name}.ucp").name == spec.name == name
    assert spec.text == (CONVERTERS / f"{name}.ucp").read_text()
    assert spec.filename == str(CONVERTERS / f"{name}.ucp")
    deg = {k: v for k, v in degrees.items() if k in spec.axes}
    const = {k: v for k, v in MODEL.items() if k in spec.configs}
    missing = [c for c in spec.constants_needed if c not in const]
    assert not missing
    b = spec.bind(deg, const)
    assert len(b.rules) == len(spec.rules) > 0
    for r in b.rules:
        assert r.origin.startswith(str(CONVERTERS))
    if spec.constants_needed:
        with pytest.raises(SpecError, match="is not given to bind"):
            spec.bind(deg, {})


def llama_names(layers=4, hf=True, bias=False):
    if hf:
        out = ["model.embed_tokens.weight"]
        for i in range(layers):
            for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out.append(f"model.layers.{i}.self_attn.{p}.weight")
            if bias:
                out += [f"model.layers.{i}.self_attn.{p}.bias" for p in ("q_proj", "k_proj", "v_proj")]
            for p in ("gate_proj", "up_proj", "down_proj"):
                out.append(f"model.layers.{i}.mlp.{p}.weight")
            out += [f"model.layers.{i}.input_layernorm.weight",
                    f"model.layers.{i}.post_attention_layernorm.weight"]
        return out + ["model.norm.weight", "lm_head.weight"]
    out = ["embedding.word_embeddings.weight"]
    for i in range(layers):
        pre = f"decoder.layers.{i}."
        out += [pre + "self_attention.linear_qkv.weight",
                pre + "self_attention.linear_qkv.layer_norm_weight",
                pre + "self_attention.linear_proj.weight",
                pre + "mlp.linear_fc1.weight", pre + "mlp.linear_fc1.layer_norm_weight",
                pre + "mlp.linear_fc2.weight"]
    return out + ["decoder.final_layernorm.weight", "output_layer.weight"]


@pytest.mark.parametrize("name", ["hf_llama", "torch_tp", "torch_fsdp2", "deepspeed_zero12",
                                  "deepspeed_zero3"])
def test_hf_names_fully_covered(name):
    b = load(name).bind({}, {})
    assert len(b.resolve(llama_names(bias=True))) == len(llama_names(bias=True))


def test_hf_llama_is_strict():
    with pytest.raises(UnmatchedError) as ei:
        load("hf_llama").bind().resolve(llama_names() + ["model.layers.0.mlp.fc.weight", "x"])
    assert ei.value.names == ["model.layers.0.mlp.fc.weight", "x"]


def test_torch_tp_layout():
    b = load("torch_tp").bind({"tp": 2})
    m = b.resolve(llama_names())
    assert m["model.layers.0.self_attn.q_proj.weight"].rule.ops == (Shard(0, "tp", "chunk"),)
    assert m["model.layers.3.self_attn.o_proj.weight"].rule.ops == (Shard(1, "tp", "chunk"),)
    assert m["model.layers.3.mlp.up_proj.weight"].rule.ops == (Shard(0, "tp", "chunk"),)
    assert m["model.layers.3.mlp.down_proj.weight"].rule.ops == (Shard(1, "tp", "chunk"),)
    assert m["model.norm.weight"].rule.ops == (Replicate("tp"),)
    assert load("torch_fsdp2").bind({"dp": 4}).match("anything.at.all").rule.ops == \
        (Shard(0, "dp", "chunk"),)


def test_deepspeed_layouts():
    """Per-state layouts: optimizer states flat over dp, the model weights (state model) not;
    parameter groups chosen by shape (where ndim < 2) when the run has two."""
    b = load("deepspeed_zero12").bind({"dp": 4, "tp": 2})
    m = b.match("model.layers.0.self_attn.q_proj.weight")
    assert m.rule.ops == (Shard(0, "tp", "even"), Flat("dp", "0", 2, 1, strip=True))
    assert m.rule.ops_for("model") == (Shard(0, "tp", "even"),)
    assert m.rule.ops_for("exp_avg") == m.rule.ops
    assert b.match("model.norm.weight", (8,)).rule.ops == (Replicate("tp"), Flat("dp", "0", 2, 1, strip=True))
    two = load("deepspeed_zero12").bind({"dp": 4}, {"groups": 2})
    assert two.match("model.norm.weight", (8,)).rule.ops[-1].group == "1"
    assert two.match("model.embed_tokens.weight", (8, 8)).rule.ops[-1].group == "0"
    z3 = load("deepspeed_zero3").bind({"dp": 4}, {"sub_group_size": 100})
    assert z3.match("w", (3, 3)).rule.ops == (Flat("dp", "0", partition="each", bucket=100),)
    assert z3.match("w", (3, 3)).rule.ops_for("model") == (Flat("dp"),)


def test_megatron_gpt_layout():
    spec = load("megatron_gpt")
    assert spec.axes == ("tp", "pp", "dp", "edp", "ep", "etp")
    assert spec.constants_needed == ("layers", "heads", "kv_heads", "head_dim")
    b = spec.bind({"tp": 2, "pp": 2, "ep": 2}, MODEL)
    assert b.degrees["edp"] == 1 and b.degrees["etp"] == 1       # ep x etp x edp = dp x tp
    m = b.resolve(llama_names(hf=False))
    qkv = m["decoder.layers.3.self_attention.linear_qkv.weight"].rule
    assert qkv.ops == (Parts(0, ("q", "k", "v"), (128, 32, 32), 2), Shard(0, "tp", "even"))
    assert qkv.renumber == (Renumber("i", "pp", 4, "even", chunk="v"),)
    assert qkv.states == ()                                      # no distributed optimizer
    assert m["decoder.layers.3.mlp.linear_fc1.weight"].rule.ops == \
        (Parts(0, ("gate", "up")), Shard(0, "tp", "even"))
    assert m["decoder.layers.3.mlp.linear_fc2.weight"].rule.ops == (Shard(1, "tp", "even"),)
    assert m["decoder.layers.3.self_attention.linear_proj.weight"].rule.ops == (Shard(1, "tp", "even"),)
    assert m["decoder.layers.0.mlp.linear_fc1.layer_norm_weight"].rule.ops == (Replicate("tp"),)
    emb = m["embedding.word_embeddings.weight"].rule
    assert emb.ops == (Pad(0, 256, keep=True), Shard(0, "tp", "even")) and ("first", "pp") in emb.attrs
    assert ("last", "pp") in m["output_layer.weight"].rule.attrs
    assert b.holds("output_layer.weight", {"pp": 1}) and not b.holds("output_layer.weight", {"pp": 0})
    assert b.local_name("decoder.layers.3.mlp.linear_fc2.weight", {"pp": 1}) == \
        "model0.decoder.layers.1.mlp.linear_fc2.weight"
    # MoE, both expert layouts, experts over etp
    seq = "decoder.layers.2.mlp.experts.local_experts.3.linear_fc1.weight"
    assert b.match(seq).rule.renumber == (Renumber("i", "pp", 4, "even", chunk="v"),
                                          Renumber("e", "ep", 4, "even"))
    assert b.local_name(seq, {"pp": 1, "ep": 1}) == \
        "model0.decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight"
    grouped = "decoder.layers.2.mlp.experts.linear_fc2.weight3"
    assert b.local_name(grouped, {"pp": 1, "ep": 1}) == "model0.decoder.layers.0.mlp.experts.linear_fc2.weight1"
    assert b.match(grouped).rule.ops == (Shard(1, "etp", "even"),)
    assert b.match("decoder.layers.2.mlp.router.weight").rule.ops == (Replicate("tp"),)
    assert b.match("decoder.layers.2.self_attention.linear_qkv._extra_state").rule.skip
    # GQA groups must divide over tp; layers over pp
    with pytest.raises(SpecError, match="groups"):
        spec.bind({"tp": 4}, MODEL)
    with pytest.raises(SpecError, match="not divisible by pp=3"):
        spec.bind({"pp": 3}, MODEL)
    # the distributed optimizer gives the optimizer states their own layout
    d = spec.bind({"dp": 3}, {**MODEL, "distributed_optimizer": 1, "bucket_size": 1000})
    st = dict(d.match("decoder.layers.0.mlp.linear_fc2.weight").rule.states)
    assert set(st) == {"param", "exp_avg", "exp_avg_sq"}
    assert st["param"][-1] == Flat("dp", "dense.{v}", 128, 64, "buffer", 1000, "reverse")


# --------------------------------------------------------------------------- renames
def test_megatron_to_hf_renames_round_trip():
    spec = load("megatron_to_hf_llama")
    assert spec.name == "megatron_to_hf_llama"
    b = spec.bind({"tp": 2}, MODEL)
    meg = set(llama_names(hf=False))
    parts_seen = {}
    for hf in llama_names(bias=False):
        src, part = spec.rename(hf)
        assert src in meg, (hf, src)
        assert spec.unrename(src, part) == hf
        assert b.unrename(src, part) == hf and b.rename(hf) == (src, part)
        m = b.match(src)
        if part is not None:
            names = [n for op in m.rule.ops if isinstance(op, Parts) for n in op.names]
            assert part in names
            parts_seen.setdefault(src, []).append(part)
    qkv = "decoder.layers.1.self_attention.linear_qkv.weight"
    assert parts_seen[qkv] == ["q", "k", "v"]
    assert spec.unrename_parts(qkv) == {p: f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkv"}
    assert b.part_range(qkv, "q") == (0, 0, 128)
    assert b.part_range(qkv, "v") == (0, 160, 192)
    fc1 = "decoder.layers.1.mlp.linear_fc1.weight"
    assert b.part_range(fc1, "up", size=256) == (0, 128, 256)
    with pytest.raises(UnmatchedError):
        spec.rename("model.unknown.weight")
    with pytest.raises(UnmatchedError):
        spec.unrename(qkv)                 # needs a part
    with pytest.raises(UnmatchedError) as ei:
        spec.rename_all(["model.norm.weight", "a", "b"])
    assert ei.value.names == ["a", "b"]
    assert len(spec.rename_all(llama_names())) == len(llama_names())


def test_rename_with_wildcards():
    spec = parse('rename "hf.{i:int}.**" from "mg.{i}.**"\nrename "**" from "**"', "x.ucp")
    assert spec.rename("hf.3.a.b") == ("mg.3.a.b", None)
    assert spec.unrename("mg.3.a.b") == "hf.3.a.b"
    assert spec.rename("other") == ("other", None)
