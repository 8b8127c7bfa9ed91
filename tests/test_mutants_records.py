"""More crafted manifest records, each refused by the one check it trips (kills surviving mutants of
ucp/format/manifest.py's record checks: shapes, inner chunks, chunk records, versions, names)."""

import pytest
import torch

from ucp.errors import FormatError
from ucp.format import create_checkpoint, open_checkpoint

from _manifest_edit import rewrite_manifest


@pytest.fixture
def ck(tmp_path):
    root = tmp_path / "ck"
    with create_checkpoint(root) as w:
        w.add_param("w", meta={})
        w.write_tensor("w", "param", torch.arange(16, dtype=torch.float32).reshape(4, 4), chunks=(2, 4))
        w.write_tensor("s", "param", torch.arange(64, dtype=torch.float32).reshape(8, 8), shards=(8, 8), chunks=(4, 4))
    return root


def _st(d, i=0):
    return d["params"][i]["states"]["param"]


def _set(rec, key, value):
    rec[key] = value


CASES = {
    "chunks-rank": (lambda d: _set(_st(d), "chunks", [2]), "bad shape"),
    "shape-bool": (lambda d: _set(_st(d), "shape", [True, 4]), "bad shape"),
    "inner-rank": (lambda d: _set(_st(d, 1), "inner_chunks", [4]), "bad inner_chunks"),
    "inner-not-dividing": (lambda d: _set(_st(d, 1), "inner_chunks", [3, 4]), "bad inner_chunks"),
    "inner-zero": (lambda d: _set(_st(d, 1), "inner_chunks", [0, 4]), "bad inner_chunks"),
    "storage-dtype": (lambda d: _set(_st(d), "storage_dtype", "int32"), "storage_dtype 'int32' contradicts"),
    "no-storage-dtype": (lambda d: _st(d).pop("storage_dtype"), "storage_dtype None contradicts"),
    "chunk-record-width": (lambda d: _st(d)["chunk_table"].__setitem__("c/0/0", _st(d)["chunk_table"]["c/0/0"][:1]),
                           r"chunk c/0/0: record .* is not \[size, crc32c\]"),
    "chunk-crc-too-big": (lambda d: _st(d)["chunk_table"]["c/0/0"].__setitem__(1, 1 << 32),
                          r"is not \[size, crc32c\]"),
    "shard-record-width": (lambda d: _st(d, 1)["chunk_table"].__setitem__("c/0/0", _st(d, 1)["chunk_table"]["c/0/0"][:2]),
                           r"is not \[size, crc32c, content crc32c\]"),
    "chunk-key-outside": (lambda d: _st(d)["chunk_table"].__setitem__("c/2/0", _st(d)["chunk_table"].pop("c/1/0")),
                          "is not a chunk of the grid"),
    "chunk-key-rank": (lambda d: _st(d)["chunk_table"].__setitem__("c/1", _st(d)["chunk_table"].pop("c/1/0")),
                       "is not a chunk of the grid"),
    "chunk-key-padded": (lambda d: _st(d)["chunk_table"].__setitem__("c/01/0", _st(d)["chunk_table"].pop("c/1/0")),
                         "is not a chunk of the grid"),
    "version-3": (lambda d: _set(d, "format_version", 3), "format_version 3 is not one"),
    "version-0": (lambda d: _set(d, "format_version", 0), "format_version 0 is not one"),
    "version-str": (lambda d: _set(d, "format_version", "2"), "format_version '2' is not one"),
    "params-not-list": (lambda d: _set(d, "params", {}), "'params' is not a list"),
    "param-twice": (lambda d: d["params"].append(d["params"][0]), "listed twice"),
    "meta-arrays-not-dict": (lambda d: _set(d, "meta_arrays", [1]), "'meta_arrays' is not an object"),
    "meta-array-path": (lambda d: _set(d, "meta_arrays", {"meta/0": {}}), "unsafe metadata array path"),
    "state-name-slash": (lambda d: d["params"][0].__setitem__("states", {"a/b": _st(d)}) or
                         d["params"][0].__setitem__("state_order", ["a/b"]), "unsafe state name"),
    "array-not-object": (lambda d: d["params"][0]["states"].__setitem__("param", [1]), "array record is not an object"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_crafted_record_is_refused_by_the_check_it_trips(ck, case):
    edit, match = CASES[case]
    rewrite_manifest(ck, edit)
    with pytest.raises(FormatError, match=match):
        open_checkpoint(ck)


def test_64_dimensions_are_accepted(tmp_path):
    """MAX_NDIM is 64: a 64-d array (torch's own limit) is a valid checkpoint."""
    t = torch.arange(2, dtype=torch.float32).reshape([2] + [1] * 63)
    with create_checkpoint(tmp_path / "ck") as w:
        w.write_tensor("t", "param", t)
    assert torch.equal(open_checkpoint(tmp_path / "ck").read("t"), t)


# -- chunk records checked against the geometry, on both paths of ManifestArray._check_table: grids of
# up to LISTED_CHUNKS chunks (checked against the geometry's listed sizes) and larger ones (per key)
def _record(shape, chunks, table, dtype="float32"):
    from ucp.format import dtypes

    return {"path": "w/param", "dtype": dtype, "storage_dtype": dtypes.zarr_dtype(dtype), "shape": list(shape),
            "chunks": list(chunks), "chunk_table": table}


def _wrong_records(size):
    """Every malformed or lying record of a chunk whose file has ``size`` bytes and crc32c 7."""
    lies = [[s, 7] for s in range(0, 2 * size + 9) if s != size]  # any size but the geometry's
    return lies + [[size - 1, size], [size + 1, size],  # a crc32c field that holds the right size
                   [float(size), 7], [True, 7], [size, 7.0], [size, True], [size, -1], [size, 1 << 32],
                   [size, "7"], (size, 7), [size], [size, 7, 7]]


@pytest.mark.parametrize("nchunks", [6, 4097], ids=["listed", "large-grid"])
def test_only_the_geometrys_chunk_size_and_a_32_bit_crc32c_are_accepted(nchunks):
    """A float32 chunk of 2x3 elements has 6*4 data bytes + 4 crc32c bytes: 28. Every other size, a
    size or crc32c that is not a (non-bool) int, a crc32c outside 0..2**32-1, a record that is not a
    list of two are refused, whichever path checks the grid (the listed one up to 4096 chunks)."""
    from ucp.format.manifest import LISTED_CHUNKS, ManifestArray

    assert (nchunks > LISTED_CHUNKS) == (nchunks == 4097)
    shape, keys = (2 * nchunks, 3), [f"c/{i}/0" for i in range(nchunks)]
    crcs = [(0, 7, (1 << 32) - 1)[i % 3] for i in range(nchunks)]  # any 32-bit value, 0 and the largest too
    ok = ManifestArray.from_json(_record(shape, (2, 3), {k: [28, c] for k, c in zip(keys, crcs)}), "ok")
    assert ok.chunk_table == {k: (28, c) for k, c in zip(keys, crcs)}
    for bad in _wrong_records(28):
        table = dict.fromkeys(keys, bad)  # every record the same lie: no valid one makes a check give up early
        with pytest.raises(FormatError, match=rf"chunk {keys[0]}: (record .* is not \[size, crc32c\]|the "
                                              rf"manifest records {bad[0]} bytes, the shape, chunks and dtype "
                                              r"imply 28)"):
            ManifestArray.from_json(_record(shape, (2, 3), table), "bad")


@pytest.mark.parametrize("dtype, size", [("uint8", 10), ("float16", 16), ("float64", 52)])
def test_chunk_size_is_elements_times_itemsize_plus_the_crc32c(dtype, size):
    """The file size of a chunk of 6 elements is 6 * itemsize + 4, for every itemsize: nothing else."""
    from ucp.format.manifest import ManifestArray

    assert ManifestArray.from_json(_record((2, 3), (2, 3), {"c/0/0": [size, 0]}, dtype), "ok").chunk_table == {
        "c/0/0": (size, 0)}
    for bad in range(0, 2 * size + 9):
        if bad != size:
            with pytest.raises(FormatError, match=f"records {bad} bytes"):
                ManifestArray.from_json(_record((2, 3), (2, 3), {"c/0/0": [bad, 0]}, dtype), "bad")


def test_no_path_of_4096_characters_or_more_is_accepted():
    """PATH_MAX: the 'files' paths (checked all at once) and an array's path (checked by equality
    with the one built from its parameter's path and state name) are shorter than 4096 characters."""
    from ucp.format import manifest as M

    assert M.all_safe_rel([]) and M.all_safe_rel(["zarr.json", "p" * 4095, "a/b/zarr.json"])
    for bad in (["zarr.json", "p" * 4096], ["zarr.json", 5], ["a\nb"], ["a/../b"], ["/a"], ["a//b"], [""]):
        assert not M.all_safe_rel(bad), bad
        assert not all(M.safe_rel(p) for p in bad), bad
    for n, ok in ((4095, True), (4096, False)):
        rec = _record((2, 3), (2, 3), {"c/0/0": [28, 0]})
        rec["path"] = "p" * (n - 6) + "/param"
        if ok:
            assert M.ManifestArray.from_json(rec, "x", path=rec["path"]).path == rec["path"]
        else:
            with pytest.raises(FormatError, match="unsafe or unexpected array path"):
                M.ManifestArray.from_json(rec, "x", path=rec["path"])
