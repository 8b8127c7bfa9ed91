"""Non-tensor state round-trips through JSON: NaN/inf, tuples, tensors (RNG states), bytes; the schema holds."""
import json
import math
import re

import numpy as np
import pytest
import torch

import ucp
from ucp.errors import MetadataEncodingError, UcpError
from ucp.format import create_checkpoint, verify


def test_metadata_roundtrip(tmp_path, check_manifest):
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    meta = {
        "iteration": 1000,
        "args": {"lr": 3e-4, "betas": (0.9, 0.999), "nested": ((1, 2), [3, (4,)]), "name": "gpt", "none": None},
        "floats": [float("nan"), float("inf"), float("-inf"), -0.0, 1e-300],
        "np": {"i": np.int64(7), "f": np.float32(0.5), "b": np.bool_(True), "nan": np.float64("nan")},
        "torch_scalar": torch.tensor(2.5).item(),
        "rng": {"cpu": rng, "per_rank": [torch.get_rng_state(), torch.arange(4, dtype=torch.int64)]},
        "blob": b"\x00\xffbinary",
        "int_keys": {0: {"step": 3}, 1: {"step": 4}},
        "$weird": 1,
        "dtype": torch.bfloat16,
        "bf16": torch.tensor([1.5, float("nan")], dtype=torch.bfloat16),
        "arr": np.arange(3, dtype=np.float16),
    }
    with create_checkpoint(tmp_path / "ck") as w:
        w.write_tensor("w", "param", torch.ones(3))
        w.add_param("w", {"scalars": {"step": 10, "loss_scale": float("inf")}, "tied_to": "v",
                          "parts": [{"name": "q", "dim": 0, "start": 0, "stop": 2}],
                          "padding": {"dim": 0, "size": 1},
                          "fragmentation": {"degrees": {"tp": 2}, "boxes": [[[0], [2]], [[2], [3]]]}})
        w.set_metadata(meta)
    check_manifest(tmp_path / "ck")
    raw = (tmp_path / "ck" / "ucp.manifest.json").read_text()
    assert "NaN" not in raw and "Infinity" not in raw
    json.loads(raw)  # strict JSON
    ck = ucp.open(tmp_path / "ck")
    m = ck.metadata
    assert m["iteration"] == 1000
    assert m["args"]["betas"] == (0.9, 0.999) and m["args"]["nested"] == ((1, 2), [3, (4,)])   # tuples stay tuples
    assert type(m["args"]["nested"][1]) is list and type(m["args"]["nested"][1][1]) is tuple
    assert math.isnan(m["floats"][0]) and m["floats"][1:3] == [math.inf, -math.inf]
    assert math.copysign(1, m["floats"][3]) == -1 and m["floats"][4] == 1e-300
    assert m["np"] == {"i": 7, "f": 0.5, "b": True, "nan": m["np"]["nan"]} and math.isnan(m["np"]["nan"])
    assert torch.equal(m["rng"]["cpu"], rng) and m["rng"]["cpu"].dtype == torch.uint8
    torch.set_rng_state(m["rng"]["cpu"])
    a = torch.rand(3)
    torch.set_rng_state(rng)
    assert torch.equal(a, torch.rand(3))
    assert torch.equal(m["rng"]["per_rank"][1], torch.arange(4))
    assert m["blob"] == b"\x00\xffbinary"
    assert m["int_keys"] == {0: {"step": 3}, 1: {"step": 4}}
    assert m["$weird"] == 1 and m["dtype"] is torch.bfloat16
    assert m["bf16"].dtype == torch.bfloat16 and m["bf16"].view(torch.int16).tolist() == \
        meta["bf16"].view(torch.int16).tolist()
    # a numpy array comes back as one (a DCP job's numpy value is loaded into a numpy value)
    assert isinstance(m["arr"], np.ndarray) and m["arr"].dtype == np.float16 and m["arr"].tolist() == [0, 1, 2]
    pm = ck.param_meta("w")
    assert pm["scalars"] == {"step": 10, "loss_scale": math.inf} and pm["tied_to"] == "v"
    assert pm["shape"] == [3] and pm["dtype"] == "float32"
    assert verify(tmp_path / "ck") == []


def test_unencodable_metadata_is_refused(tmp_path):
    w = create_checkpoint(tmp_path / "ck")
    with pytest.raises(MetadataEncodingError, match=r"metadata\.sched"):
        w.set_metadata({"sched": object()})
    w.abort()



from hypothesis import given, settings, strategies as st  # noqa: E402

from ucp.format import jsonmeta, names  # noqa: E402

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=5), st.binary(max_size=5))
keys = st.one_of(st.text(max_size=4), st.integers(-3, 3))
trees = st.recursive(scalars, lambda ch: st.one_of(st.lists(ch, max_size=3), st.tuples(ch, ch),
                                                   st.dictionaries(keys, ch, max_size=3)), max_leaves=12)


def _norm(x):
    """Expected decoded form: lists stay lists and tuples tuples; NaN compared by identity of kind."""
    if isinstance(x, float) and math.isnan(x):
        return "NaN"
    if isinstance(x, (list, tuple)):
        return type(x)(_norm(v) for v in x)
    if isinstance(x, dict):
        return {(_norm(k) if not isinstance(k, tuple) else k): _norm(v) for k, v in x.items()}
    return x


@settings(max_examples=200, deadline=None)
@given(trees)
def test_json_encoding_roundtrip_property(obj):
    enc = jsonmeta.encode(obj, lambda t: "_ucp/meta/0")
    raw = json.dumps(enc, allow_nan=False)  # always strict JSON
    dec = jsonmeta.decode(json.loads(raw), lambda p: None)
    assert _norm(dec) == _norm(obj)


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=12))
def test_param_name_encoding(name):
    if name.startswith("_ucp") or name.startswith("__"):
        with pytest.raises(UcpError, match=f"{re.escape(repr(name))} is reserved"):
            names.encode_param(name)
        return
    enc = names.encode_param(name)
    assert enc and "/" not in enc and enc not in (".", "..") and not enc.startswith("__")
    assert set(enc) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-%")
    assert enc not in names.RESERVED_FILES
    assert names.decode_param(enc) == name


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=8), st.integers(min_value=40, max_value=400), st.text(max_size=3))
def test_long_names_get_a_short_distinct_node(tail, repeat, other):
    """A name whose encoding exceeds names.MAX_NODE bytes keeps a head, '~' and its hash: short enough
    for any file system, never another name's node, and two names that differ only at the end (past
    the head) still get different nodes."""
    name = "layer." + "ü/" * repeat + tail
    enc = names.encode_param(name)
    assert len(enc.encode()) <= names.MAX_NODE and enc.count("~") == 1
    assert not re.search(r"%[0-9A-F]?~", enc)     # no escape cut in two
    assert names.encode_param(name + other) != enc or other == ""
    assert names.encode_param("layer.short") == "layer.short"


@pytest.mark.parametrize("obj", [
    {"b": [1, 2.5, None], "a": {"z": "é\u2028", "y": True}},
    {"path": "m.w/param", "layout": {"shape": [3, 0], "dtype": "bfloat16", "chunks": [3, 1], "inner_chunks": None}},
    "x", [], 7,
])
def test_json_encodings_are_json_dumps_with_their_options(obj):
    """``layout.canonical`` / ``doc_bytes`` keep one encoder each (not one per ``json.dumps`` call): the bytes
    are those of ``json.dumps`` with the same options, and a NaN is refused by both."""
    from ucp.format import layout

    assert layout.canonical(obj) == json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                                               allow_nan=False).encode()
    assert layout.doc_bytes(obj) == json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    for encode in (layout.canonical, layout.doc_bytes):
        with pytest.raises(ValueError):
            encode({"x": [float("nan")]})
