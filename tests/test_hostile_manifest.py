"""A manifest with a valid checksum can still be crafted: readers refuse paths that leave the
checkpoint, and malformed shapes, before reading anything."""

import pytest
import torch

from ucp.errors import FormatError
from ucp.format import create_checkpoint, open_checkpoint, verify

from _manifest_edit import rewrite_manifest


@pytest.fixture
def ck(tmp_path):
    (tmp_path / "secret").write_bytes(b"\0" * 64)
    root = tmp_path / "ck"
    with create_checkpoint(root) as w:
        w.add_param("w", meta={})
        w.write_tensor("w", "param", torch.arange(16, dtype=torch.float32))
    return root


@pytest.mark.parametrize("edit", [
    lambda d: d["params"][0]["states"]["param"].__setitem__("path", "../secret"),
    lambda d: d["params"][0].__setitem__("path", ".."),
    lambda d: d["params"][0]["states"]["param"].__setitem__("path", "/etc/passwd"),
    lambda d: d["params"][0]["states"]["param"]["chunk_table"].__setitem__("../../secret", [64, 0]),
    lambda d: d["params"][0]["states"]["param"].__setitem__("shape", [-1]),
    lambda d: d["params"][0]["states"]["param"].__setitem__("chunks", [0]),
    lambda d: d["params"][0]["states"]["param"].__setitem__("dtype", "object"),
    lambda d: d.__setitem__("files", {"../secret": [64, 0]}),
], ids=["state-path-up", "param-path-dotdot", "absolute", "chunk-key", "negative-shape", "zero-chunk",
        "bad-dtype", "files-up"])
def test_crafted_manifest_is_refused(ck, edit):
    assert open_checkpoint(ck).read("w").tolist() == list(range(16))
    rewrite_manifest(ck, edit)
    with pytest.raises(FormatError):
        open_checkpoint(ck)
    assert verify(ck)  # reported, not crashed


# -- issue 13 item 5: manifests that contradict themselves, checked before anything is allocated ----------
def _set_chunks(d, chunks, size):
    """Claim another chunk grid (and keep the zarr.json record consistent with it, so only the chunk
    file itself can tell)."""
    from ucp.format.layout import array_doc, doc_bytes
    import crc32c

    rec = d["params"][0]["states"]["param"]
    rec["chunks"] = chunks
    rec["chunk_table"] = {"c/0": [size, 0]}
    data = doc_bytes(array_doc(rec["shape"], chunks, rec["dtype"]))
    d["files"]["w/param/zarr.json"] = [len(data), crc32c.crc32c(data)]


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["params"][0]["states"]["param"].__setitem__("chunks", [2**29]),
     r"records 68 bytes, the shape, chunks and dtype imply 2147483652"),
    (lambda d: d["params"][0]["states"]["param"]["chunk_table"].pop("c/0"),
     r"chunk_table has 0 entries, the grid \[1\] .* has 1"),
    (lambda d: d["params"][0]["states"]["param"].__setitem__("chunk_table", {"c/1": [68, 0]}),
     r"chunk key 'c/1' is not a chunk of the grid \[1\]"),
    (lambda d: d["params"][0]["states"]["param"].__setitem__("storage_dtype", "int32"),
     r"storage_dtype 'int32' contradicts dtype 'float32'"),
    (lambda d: d["params"][0]["states"]["param"].update(dtype="int32", storage_dtype="int32"),
     r"w/param/zarr.json is not recorded in 'files' as the document"),
    (lambda d: d["params"][0].__setitem__("path", "v"), r"has path 'v', expected 'w'"),
], ids=["huge-chunk", "deleted-entry", "extra-entry", "storage-dtype", "dtype-vs-zarr-json", "param-path"])
def test_self_contradicting_manifest_is_refused(ck, edit, match):
    rewrite_manifest(ck, edit)
    with pytest.raises(FormatError, match=match):
        open_checkpoint(ck)
    assert any(__import__("re").search(match, p) for p in verify(ck))


@pytest.mark.parametrize("rows", [2**29, 2**40])
def test_consistent_lie_about_sizes_fails_before_allocating(ck, rows):
    """A manifest consistent with itself and its zarr.json but claiming a huge chunk: the file's real size
    is checked before the chunk's buffer is allocated (no 2 GB allocation, no MemoryError)."""
    import tracemalloc

    from ucp.errors import CorruptChunkError

    def edit(d):
        d["params"][0]["states"]["param"]["shape"] = [rows]
        _set_chunks(d, [rows], rows * 4 + 4)
    rewrite_manifest(ck, edit)
    c = open_checkpoint(ck)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptChunkError, match=rf"size 68 bytes, the manifest records {rows * 4 + 4}"):
            c.read("w", index=slice(0, 1))
        assert tracemalloc.get_traced_memory()[1] < 64 << 20
    finally:
        tracemalloc.stop()
    assert any("truncated" in p for p in verify(ck, deep=False))


# -- issue 13 item 6: crafted metadata wrappers ---------------------------------------------------------
@pytest.mark.parametrize("wrapper,match", [
    ({"$tensor": "_ucp/meta/99"}, r"metadata\.a\.b\[0\]\.\$tensor: \$tensor '_ucp/meta/99' names no metadata array"),
    ({"$tensor": 7}, r"\$tensor '7' names no metadata array"),
    ({"$dtype": "nonexistent"}, r"metadata\.a\.b\[0\]\.\$dtype: \$dtype 'nonexistent' is not a ucp dtype"),
    ({"$dtype": "load"}, r"\$dtype 'load' is not a ucp dtype"),
    ({"$float": "nope"}, r"\$float 'nope' is not 'nan'"),
    ({"$bytes": "!!!"}, r"\$bytes is not valid base64"),
    ({"$dict": 3}, r"\$dict is not a list of \[key, value\] pairs"),
    ({"$dict": [[[1, {"$dict": []}], 2]]}, r"key .* is not hashable"),
    ({"$oops": 1}, r"unknown wrapper '\$oops'"),
], ids=["tensor-missing", "tensor-int", "dtype-unknown", "dtype-load", "float", "bytes", "dict", "dict-key",
        "unknown"])
def test_crafted_metadata_wrappers_raise_format_error_with_key_path(ck, wrapper, match):
    rewrite_manifest(ck, lambda d: d.__setitem__("metadata", {"a": {"b": [wrapper]}}))
    c = open_checkpoint(ck)
    with pytest.raises(FormatError, match=match):
        c.metadata


def test_dtype_wrapper_accepts_the_listed_dtypes_only(ck):
    rewrite_manifest(ck, lambda d: d.__setitem__("metadata", {"x": {"$dtype": "bfloat16"}}))
    assert open_checkpoint(ck).metadata == {"x": torch.bfloat16}
