"""Opening a manifest checks every path in a few bulk calls (perf, issue 14): the bulk check must accept
exactly what the one-path check accepts, and a path smuggled past the bulk joining is still refused."""

import contextlib
import copy
import json
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st

from ucp.errors import FormatError, UcpError
from ucp.format import create_checkpoint, open_checkpoint
from ucp.format import manifest as M
from ucp.format import names as N

from _manifest_edit import rewrite_manifest

# characters that matter to the path rule: separators, dots, newlines (the bulk joiner), a percent
paths = st.text(alphabet="a/.\n%-_", max_size=8)


@settings(deadline=None, max_examples=400)
@given(st.lists(paths, max_size=6))
def test_bulk_path_check_agrees_with_the_one_path_check(ps):
    assert M.all_safe_rel(ps) == all(M.safe_rel(p) for p in ps)


# what matters to the name rule: the reserved prefixes and file names, dots, newlines, a character to encode
names = st.lists(st.sampled_from(["a", ".", "_", "-", "%", "/", "\n", "é", "_ucp", "__", "zarr.json"]),
                 max_size=5).map("".join)


@settings(deadline=None, max_examples=400)
@given(st.lists(names, max_size=5))
def test_bulk_name_rule_agrees_with_encode_param(ns):
    """``all_encode_to_themselves`` is the open's shortcut for ``encode_param(n) == n`` of every name."""
    def itself(n):
        try:
            return N.encode_param(n) == n
        except UcpError:
            return False
    assert N.all_encode_to_themselves(ns) == (bool(ns) and all(map(itself, ns)))


def test_bulk_name_rule_types():
    assert N.all_encode_to_themselves(["a", "b.c"]) and not N.all_encode_to_themselves(["a", 5])


@pytest.mark.parametrize("name", ["zarr.json", "..", "_ucp.x", "__x"])
def test_a_name_stored_as_its_own_path_where_encoding_changes_it_is_refused(ck, name):
    """A reserved or all-dot name whose record claims the name itself as its path passes the bulk
    ``names == paths`` comparison; the name rule must still send it to the record check, which names it."""
    def edit(d):
        d["params"][0]["name"] = d["params"][0]["path"] = name
        st_ = d["params"][0]["states"]["param"]
        st_["path"] = f"{name}/param"
    with crafted(ck, edit):
        with pytest.raises(FormatError, match=r"has path|malformed parameter record"):
            open_checkpoint(ck)


_SEG_BACKTRACKING = r"[A-Za-z0-9_%-][A-Za-z0-9._%-]*|\.[A-Za-z0-9_%-][A-Za-z0-9._%-]*|\.\.[A-Za-z0-9._%-]+"
_REL_BACKTRACKING = re.compile(rf"(?:{_SEG_BACKTRACKING})(?:/(?:{_SEG_BACKTRACKING}))*")


@settings(deadline=None, max_examples=400)
@given(st.text(alphabet="ab/.\n%-_é", max_size=10))
def test_possessive_path_rule_accepts_what_the_backtracking_one_did(p):
    """The path rule's quantifiers are possessive (no backtracking state: faster at open); the rule as
    first written with plain quantifiers must accept exactly the same paths."""
    assert M.safe_rel(p) == (0 < len(p) and _REL_BACKTRACKING.fullmatch(p) is not None)


def test_bulk_path_check_length_and_types():
    assert M.all_safe_rel(["p" * 4095, "q"]) and not M.all_safe_rel(["p" * 4096, "q"])
    assert not M.all_safe_rel(["a", 5]) and not M.all_safe_rel(["a", None]) and M.all_safe_rel([])


@contextlib.contextmanager
def crafted(root, edit):
    """The manifest edited (and re-signed) for the block, then restored: the schema check at teardown of
    test_format_* tests must see a valid manifest."""
    original = (root / "ucp.manifest.json").read_bytes()
    rewrite_manifest(root, edit)
    try:
        yield
    finally:
        (root / "ucp.manifest.json").write_bytes(original)


@pytest.fixture
def ck(tmp_path):
    root = tmp_path / "ck"
    with create_checkpoint(root) as w:
        for i in range(3):
            w.write_tensor(f"layers.{i}.w", "param", torch.arange(8, dtype=torch.float32) + i)
    return root


@pytest.mark.parametrize("key", ["a\nb", "a/\nb", "\n", "x\n../../secret"])
def test_a_files_path_holding_a_newline_is_refused(ck, key):
    """Two safe paths joined by a newline look like one bulk match; one path holding it must not pass."""
    with crafted(ck, lambda d: d["files"].__setitem__(key, [1, 0])):
        with pytest.raises(FormatError, match=r"unsafe path in 'files'"):
            open_checkpoint(ck)


def test_state_error_names_parameter_and_state(ck):
    """Error locations are formatted only on error; the message still names the parameter and state."""
    with crafted(ck, lambda d: d["params"][1]["states"]["param"].__setitem__("dtype", "object")):
        with pytest.raises(FormatError, match=r"parameter 'layers.1.w' state 'param': unknown dtype 'object'"):
            open_checkpoint(ck)


def test_many_arrays_open_and_read_back(ck):
    c = open_checkpoint(ck)
    for i in range(3):
        assert torch.equal(c.read(f"layers.{i}.w"), torch.arange(8, dtype=torch.float32) + i)


# ---- all parameter records checked at once (manifest._params_at_once) must agree with record by record
@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    """A manifest with what records vary in: several states, sharded and plain, 0-d and empty arrays,
    several dtypes, a parameter name that needs encoding, metadata arrays, and repeated geometries."""
    root = tmp_path_factory.mktemp("varied") / "ck"
    with create_checkpoint(root) as w:
        for i in range(3):
            w.write_tensor(f"layers.{i}.w", "param", torch.arange(24, dtype=torch.float32).reshape(4, 6) + i,
                           chunks=(2, 6))
            w.write_tensor(f"layers.{i}.w", "exp_avg", torch.zeros(4, 6, dtype=torch.bfloat16))
        w.write_tensor("sharded", "param", torch.arange(64, dtype=torch.int32).reshape(8, 8), shards=(8, 8),
                       chunks=(4, 4))
        w.write_tensor("scalar", "param", torch.tensor(3.5, dtype=torch.float64))
        w.write_tensor("empty", "param", torch.zeros(0, 3))
        w.write_tensor("odd name/é", "param", torch.ones(5, dtype=torch.bool))
        w.set_metadata({"step": 7, "rng": torch.arange(3)})
    return json.loads((root / "ucp.manifest.json").read_bytes())


def _outcome(doc, at_once):
    try:
        return M.Manifest.from_json(doc, "m.json", at_once=at_once)
    except FormatError as e:
        return type(e)


def test_records_checked_at_once_equal_records_checked_one_by_one(varied):
    doc = copy.deepcopy(varied)
    doc.pop("crc32c")
    assert M._params_at_once(doc["params"], "m.json", doc["format_version"]) is not None  # the bulk path took it
    one_by_one = M.Manifest.from_json(doc, "m.json", at_once=False)
    assert M.Manifest.from_json(doc, "m.json") == one_by_one
    assert len(one_by_one.params) == 7 and one_by_one.meta_arrays


# values a crafted record may hold where a checked one holds another: each must be refused (or accepted)
# by the bulk path exactly as record by record
ODD = [True, False, 1.0, 2.0, 4.0, 6.0, -1, 0, 1 << 40, "1", None, [], {}, [1], [True], [4, 6], [2, 6], [0, 3], "float32",
       "float64", "uint16", "object", "x/../y", "layers.0.w/param", "c/0/0", [4100, 1], [100, 1, 2]]


def _paths(x, at=()):
    """Every (container, key) position inside the parameter records."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield x, k
            yield from _paths(v)
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield x, i
            yield from _paths(v)


@settings(deadline=None, max_examples=300)
@given(st.data())
def test_a_crafted_record_is_refused_or_accepted_alike_at_once_and_one_by_one(varied, data):
    doc = copy.deepcopy(varied)
    doc.pop("crc32c")
    spots = list(_paths(doc["params"]))
    for _ in range(data.draw(st.integers(1, 2))):
        where, key = data.draw(st.sampled_from(spots))
        action = data.draw(st.sampled_from(["set", "drop", "rename"]))
        if action == "set" or isinstance(where, list):
            where[key] = copy.deepcopy(data.draw(st.sampled_from(ODD)))
        elif action == "drop":
            del where[key]
        else:
            where[data.draw(st.sampled_from(["c/1/0", "c/0", "param", "exp_avg", "x"]))] = where.pop(key)
        spots = list(_paths(doc["params"]))
    assert _outcome(copy.deepcopy(doc), True) == _outcome(copy.deepcopy(doc), False)


def _rename_state(doc, name, old, new):
    p = next(p for p in doc["params"] if p["name"] == name)
    p["states"][new] = p["states"].pop(old)
    p["states"][new]["path"] = f"{p['path']}/{new}"
    if "state_order" in p:
        p["state_order"] = [new if s == old else s for s in p["state_order"]]


@pytest.mark.parametrize("bad", ["..", ".", "a\nb"])
def test_an_unsafe_state_name_on_a_record_sharing_a_geometry_is_refused_at_once_too(varied, bad):
    """The bulk path checks one record per geometry in full: a state name that no safe path allows, on
    a record whose geometry an earlier record has (layers.1.w is shaped like layers.0.w), is refused
    by the bulk check itself, not only record by record, and named as such (not as a missing document)."""
    doc = copy.deepcopy(varied)
    doc.pop("crc32c")
    _rename_state(doc, "layers.1.w", "param", bad)
    for at_once in (True, False):
        with pytest.raises(FormatError, match="unsafe state name"):
            M.Manifest.from_json(copy.deepcopy(doc), "m.json", at_once=at_once)


def test_an_array_path_of_max_path_characters_is_refused_at_once_too(varied):
    """A parameter path just under MAX_PATH whose longest array path ``<path>/exp_avg`` reaches it
    exactly, on a record sharing a geometry with an earlier one: refused on both paths, and named
    (since names that long are written as a head and a hash, FORMAT.md §3, such a path is also not the
    name's node)."""
    doc = copy.deepcopy(varied)
    doc.pop("crc32c")
    p = next(p for p in doc["params"] if p["name"] == "layers.1.w")
    name = "x" * (M.MAX_PATH - len("/exp_avg"))
    p["name"] = p["path"] = name
    for state, rec in p["states"].items():
        rec["path"] = f"{name}/{state}"
    assert max(len(r["path"]) for r in p["states"].values()) == M.MAX_PATH and M.safe_rel(name)
    for at_once in (True, False):
        with pytest.raises(FormatError, match=r"unsafe or unexpected array path|has path '.*', expected '.*~"):
            M.Manifest.from_json(copy.deepcopy(doc), "m.json", at_once=at_once)
