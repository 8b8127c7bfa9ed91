"""Every construct of the language parses and binds to the right ucp.plan.ops values."""
import pytest

from ucp.lang import SpecError, parse
from ucp.plan.ops import (Average, BoundRule, Flat, Pad, Parts, Renumber, Replicate, Shard)

HEADER = """spec t
axes tp, pp, dp, ep
config heads, kv_heads, head_dim, layers
config experts = 4, vocab_multiple = 128
let q_size = heads * head_dim
let kv_size = kv_heads * head_dim
"""
DEG = {"tp": 2, "pp": 2, "dp": 4, "ep": 2}
CONST = {"heads": 8, "kv_heads": 2, "head_dim": 16, "layers": 6}


def bind1(body, degrees=DEG, constants=CONST) -> BoundRule:
    spec = parse(HEADER + body, "t.ucp")
    bound = spec.bind(degrees, constants)
    assert len(bound.rules) == 1
    return bound.rules[0]


CASES = [
    # (rule body, expected ops, expected renumber)
    ('param "a" = shard(0, over=tp)', (Shard(0, "tp", "chunk"),), ()),
    ('param "a" = shard(1, over=dp, split=chunk)', (Shard(1, "dp", "chunk"),), ()),
    ('param "a" = shard(0, over=tp, split=tensor_split)', (Shard(0, "tp", "tensor_split"),), ()),
    ('param "a" = shard(0, over=tp, split="even")', (Shard(0, "tp", "even"),), ()),
    ('param "a" = shard(dim=0, over=tp, sizes=[3, 5])', (Shard(0, "tp", "sizes", (3, 5)),), ()),
    ('param "a" = shard(0, over=tp, split=sizes, sizes=[heads, heads*2,])',
     (Shard(0, "tp", "sizes", (8, 16)),), ()),
    ('param "a" = replicate(over=tp)', (Replicate("tp"),), ()),
    ('param "a" = average(over=tp)', (Average("tp"),), ()),
    ('param "a" = flat(over=dp)', (Flat("dp"),), ()),
    ('param "a" = flat(over=dp, group=g0, align=2, param_align=head_dim)',
     (Flat("dp", "g0", 2, 16),), ()),
    ('param "a" = flat(over=dp, group="decay", align=2)', (Flat("dp", "decay", 2, 1),), ()),
    ('param "a" = pad(0, multiple=vocab_multiple*tp) | shard(0, over=tp)',
     (Pad(0, 256), Shard(0, "tp")), ()),
    ('param "a" = parts(gate, up, dim=0) | shard(0, over=tp)',
     (Parts(0, ("gate", "up")), Shard(0, "tp")), ()),
    ('param "a" = parts(gate, up)', (Parts(0, ("gate", "up")),), ()),
    ('param "a" = parts(q, k, v, interleave=kv_heads)', (Parts(0, ("q", "k", "v"), None, 2),), ()),
    ('param "a" = parts(q, k, v, dim=0, sizes=[q_size, kv_size, kv_size], groups=kv_heads)'
     ' | shard(0, over=tp)', (Parts(0, ("q", "k", "v"), (128, 32, 32), 2), Shard(0, "tp")), ()),
    ('param "l.{i}.w" = layers(i, over=pp, count=layers)', (),
     (Renumber("i", "pp", 6, "tensor_split"),)),
    ('param "l.{i}.w" = layers(i, over=pp, count=layers, split=even) | shard(1, over=tp)',
     (Shard(1, "tp"),), (Renumber("i", "pp", 6, "even"),)),
    ('param "l.{i}.w" = layers(i, over=pp, count=layers, sizes=[4, 2])', (),
     (Renumber("i", "pp", 6, "sizes", (4, 2)),)),
    ('param "l.{i}.e.{e}.w" = layers(i, over=pp, count=layers) | experts(e, over=ep, count=experts)',
     (), (Renumber("i", "pp", 6), Renumber("e", "ep", 4))),
    ('param "l.{i}.w" = renumber(i, over=pp, count=layers, split=chunk)', (),
     (Renumber("i", "pp", 6, "chunk"),)),
    ('param "a"', (), ()),
    ('param "a" = shard(0, over=tp) | flat(over=dp, group=g)', (Shard(0, "tp"), Flat("dp", "g")), ()),
    # expressions
    # -1 % 7 == 6 (floor semantics, as Python): (10 // 3) * 2 - 6 + 7
    ('param "a" = pad(0, multiple=(heads + 2) // 3 * 2 - -1 % 7 + 7)', (Pad(0, 7),), ()),
    ('param "a" = pad(0, multiple=ceil_div(layers, 4) + min(3, tp) + max(1, 2, dp))',
     (Pad(0, 8),), ()),
    ('param "a" = pad(0, multiple=+heads % 5)', (Pad(0, 3),), ()),
]


@pytest.mark.parametrize("body,ops,renumber", CASES)
def test_construct_binds(body, ops, renumber):
    r = bind1(body)
    assert r.ops == ops
    assert r.renumber == renumber
    assert r.origin.startswith("t.ucp:7:1")


def test_rule_fields_and_attrs():
    r = bind1('param "layers.{i}.fc1.weight"\n  local "decoder.layers.{i}.mlp.linear_fc1.weight"\n'
              '  = layers(i, over=pp, count=layers) | shard(0, over=tp)\n'
              '  with frozen, tied("embedding.word_embeddings.weight"), first(pp)')
    assert r.pattern == "layers.{i}.fc1.weight"
    assert r.local == "decoder.layers.{i}.mlp.linear_fc1.weight"
    assert r.origin == "t.ucp:7:1"
    assert r.attrs == (("frozen", True), ("tied", "embedding.word_embeddings.weight"),
                       ("first", "pp"))
    assert bind1('param "a" with skip, last(pp), tied(to="b")').attrs == \
        (("skip", True), ("last", "pp"), ("tied", "b"))


def test_local_defaults_to_pattern():
    assert bind1('param "a.{i}.**" = replicate(over=tp)').local == "a.{i}.**"


def test_multiline_and_comments():
    spec = parse("""# leading comment
spec m   # trailing
axes tp
param "x.{i}"     # the pattern
    = shard(0,    # dim
            over=tp)
    with frozen   # attribute
""", "m.ucp")
    assert spec.name == "m" and len(spec.rules) == 1
    assert spec.bind({"tp": 2}).rules[0].attrs == (("frozen", True),)


def test_spec_properties():
    spec = parse(HEADER + 'param "a" = pad(0, multiple=q_size) | shard(0, over=tp)\n'
                 'param "b" = pad(0, multiple=experts)\n', "t.ucp")
    assert spec.name == "t"
    assert spec.axes == ("tp", "pp", "dp", "ep")
    # heads and head_dim via the let; experts has a default; kv_heads, layers unused
    assert spec.constants_needed == ("heads", "head_dim")
    assert set(spec.constants) == {"heads", "kv_heads", "head_dim", "layers", "experts",
                                   "vocab_multiple"}
    assert len(spec.rules) == 2 and spec.rules[0].pattern.text == "a"


def test_spec_name_defaults_to_file_stem():
    assert parse('param "a"', "/x/y/my_layout.ucp").name == "my_layout"


def test_degrees_default_to_one_and_constants_defaults():
    spec = parse(HEADER + 'param "a" = pad(0, multiple=tp * pp * dp * ep * experts)', "t.ucp")
    assert spec.bind({}, {}).rules[0].ops == (Pad(0, 4),)
    assert spec.bind({"tp": 3}, {"experts": 5}).rules[0].ops == (Pad(0, 15),)


def test_patterns_match():
    spec = parse("""axes tp
param "a.{i:int}.b" = shard(0, over=tp)
param "a.{p:q|k|v}.w"
param "x.*.y"
param "n.weight{e:int}"
param "**.bias"
param "z.{j}.c"
""", "p.ucp")
    b = spec.bind({"tp": 2})
    assert b.match("a.12.b").captures == {"i": "12"}
    assert b.match("a.x.b") is None
    assert b.match("a.k.w").captures == {"p": "k"}
    assert b.match("a.o.w") is None
    assert b.match("x.foo.y").captures == {"*0": "foo"}
    assert b.match("x.f.o.y") is None
    assert b.match("n.weight7").captures == {"e": "7"}
    assert b.match("deep.er.bias").captures == {"*0": "deep.er"}
    assert b.match("z.any_thing.c").captures == {"j": "any_thing"}
    assert b.match("z.a.b.c") is None
    assert b.match("a.12.b").name == "a.12.b"


def test_first_match_wins():
    b = parse('axes tp\nparam "a.{x}" = shard(0, over=tp)\nparam "a.b" = replicate(over=tp)\n'
              'param "**"', "f.ucp").bind({"tp": 2})
    assert b.match("a.b").rule.origin == "f.ucp:2:1"
    assert b.match("c").rule.origin == "f.ucp:4:1"


def test_renumbered_capture_matches_digits_only():
    b = parse('axes pp\nconfig layers\nparam "l.{i}.w" = layers(i, over=pp, count=layers)\n',
              "r.ucp").bind({"pp": 2}, {"layers": 4})
    assert b.match("l.3.w") is not None
    assert b.match("l.x.w") is None


def test_include(tmp_path):
    (tmp_path / "base.ucp").write_text('spec base\naxes tp\nconfig heads\nparam "a" = shard(0, over=tp)\n')
    top = tmp_path / "top.ucp"
    top.write_text('spec top\ninclude "base.ucp"\nparam "b" = pad(0, multiple=heads * tp)\n')
    from ucp.lang import load
    spec = load(top)
    assert spec.name == "top" and spec.axes == ("tp",)
    b = spec.bind({"tp": 2}, {"heads": 3})
    assert [r.pattern for r in b.rules] == ["a", "b"]
    assert b.rules[0].origin == f"{tmp_path / 'base.ucp'}:4:1"
    assert b.rules[1].ops == (Pad(0, 6),)
    (tmp_path / "cyc.ucp").write_text('include "cyc.ucp"\n')
    with pytest.raises(SpecError, match="include cycle"):
        load(tmp_path / "cyc.ucp")


def test_language_md_examples_parse():
    """Every ```ucp block of spec/LANGUAGE.md parses, alone or after a standard prelude."""
    import re
    from pathlib import Path
    doc = (Path(__file__).resolve().parents[1] / "spec" / "LANGUAGE.md").read_text()
    blocks = re.findall(r"```ucp\n(.*?)```", doc, re.S)
    assert len(blocks) >= 18
    prelude = ("axes tp, pp, dp, ep\nconfig layers, heads, kv_heads, head_dim\n"
               "config experts = 8, vocab_multiple = 128, fsdp_unit = 0\n")
    lets = "let q_size = heads * head_dim\nlet kv_size = kv_heads * head_dim\n"
    for b in blocks:
        errors = []
        for pre in ("", prelude, prelude + lets):
            try:
                spec = parse(pre + b, "doc.ucp")
            except SpecError as e:
                errors.append(str(e))
                continue
            derived = {a for d in spec.decompositions for a in d.axes}
            spec.bind({a: 2 for a in spec.axes if a not in derived},
                      {"layers": 8, "heads": 8, "kv_heads": 2, "head_dim": 16})
            break
        else:
            raise AssertionError(f"LANGUAGE.md example does not parse:\n{b}\n{errors[-1]}")
