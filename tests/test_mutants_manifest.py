"""Crafted manifests (valid checksum, hostile content) are refused with a FormatError naming the
check that failed, before anything is read. Written to kill surviving mutants of
ucp/format/manifest.py (bench/mutation.py): each case trips exactly one check."""

import pytest
import torch

from ucp.errors import FormatError
from ucp.format import create_checkpoint, open_checkpoint
from ucp.format import manifest as M

from _manifest_edit import rewrite_manifest


@pytest.fixture
def ck(tmp_path):
    root = tmp_path / "ck"
    with create_checkpoint(root) as w:
        w.add_param("w", meta={})
        w.write_tensor("w", "param", torch.arange(16, dtype=torch.float32).reshape(4, 4), chunks=(2, 4))
    assert open_checkpoint(root).read("w").reshape(-1).tolist() == list(range(16))
    return root


def _state(d):
    return d["params"][0]["states"]["param"]


CASES = {
    "not-ucp": (lambda d: d.__setitem__("format", "zarr"), "not a ucp manifest"),
    "param-name-not-str": (lambda d: d["params"][0].__setitem__("name", 5), "malformed parameter record"),
    "param-meta-not-dict": (lambda d: d["params"][0].__setitem__("meta", [1]), "malformed parameter record"),
    "state-order": (lambda d: d["params"][0].__setitem__("state_order", ["param", "exp_avg"]),
                    "state_order .* does not list its states"),
    "array-path-elsewhere": (lambda d: _state(d).__setitem__("path", "w/exp_avg"), "unexpected array path"),
    "array-path-not-str": (lambda d: _state(d).__setitem__("path", 5), "unsafe or unexpected array path"),
    "array-path-too-long": (lambda d: _state(d).__setitem__("path", "w/" + "p" * 4094),
                            "unsafe or unexpected array path"),
    "65-dims": (lambda d: (_state(d).__setitem__("shape", [1] * 65), _state(d).__setitem__("chunks", [1] * 65)),
                "bad shape"),
    "missing-chunk": (lambda d: _state(d)["chunk_table"].pop("c/1/0"), "chunk_table has 1 entries, the grid"),
    "files-record": (lambda d: d["files"].__setitem__(next(iter(d["files"])), [1]), r"is not \[size, crc32c\]"),
    # every document the manifest needs is still recorded: only the extra path is wrong
    "files-extra-unsafe": (lambda d: d["files"].__setitem__("../secret", [64, 0]), "unsafe path in 'files'"),
    "files-not-object": (lambda d: d.__setitem__("files", [list(d["files"])]), "unsafe path in 'files'"),
    # the root group's document is not an array's: only the record check can refuse a 33-bit crc32c
    "files-crc-33-bits": (lambda d: d["files"].__setitem__("zarr.json", [d["files"]["zarr.json"][0], 1 << 32]),
                          r"files\['zarr.json'\]: record .* is not \[size, crc32c\]"),
    "files-size-negative": (lambda d: d["files"].__setitem__("zarr.json", [-1, d["files"]["zarr.json"][1]]),
                            r"files\['zarr.json'\]: record .* is not \[size, crc32c\]"),
    "files-size-not-int": (lambda d: d["files"].__setitem__("zarr.json", [str(d["files"]["zarr.json"][0]),
                                                                         d["files"]["zarr.json"][1]]),
                           r"files\['zarr.json'\]: record .* is not \[size, crc32c\]"),
    "chunk-size-not-int": (lambda d: _state(d)["chunk_table"].__setitem__(
        "c/1/0", [str(_state(d)["chunk_table"]["c/1/0"][0]), _state(d)["chunk_table"]["c/1/0"][1]]),
        r"chunk c/1/0: record .* is not \[size, crc32c\]"),
    "chunk-table-not-object": (lambda d: _state(d).__setitem__("chunk_table", [["c/0/0", 36, 0]]),
                               "chunk_table is not an object"),
    "chunk-key-not-numeric": (lambda d: _state(d)["chunk_table"].__setitem__(
        "c/x/0", _state(d)["chunk_table"].pop("c/1/0")), "malformed chunk key 'c/x/0'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_crafted_manifest_is_refused_by_the_check_it_trips(ck, case):
    edit, match = CASES[case]
    rewrite_manifest(ck, edit)
    with pytest.raises(FormatError, match=match):
        open_checkpoint(ck)


def test_path_of_4095_characters_is_safe_and_4096_is_not():
    assert M.safe_rel("p" * 4095) and not M.safe_rel("p" * 4096)
    assert not M.safe_rel("") and not M.safe_rel(5) and not M.safe_rel(None)


@pytest.mark.parametrize("raw,match", [
    (b'{"crc32c":12x,"format":"ucp"}', "malformed manifest checksum member"),
    (b'{"crc32c":123', "malformed manifest checksum member"),
    (b'{"crc32c":,"format":"ucp"}', "malformed manifest checksum member"),
    (b'{"format":"ucp"}', "does not start with"),
])
def test_malformed_checksum_member_is_refused(ck, raw, match):
    (ck / "ucp.manifest.json").write_bytes(raw)
    with pytest.raises(FormatError, match=match):
        open_checkpoint(ck)


def test_manifest_body_edited_after_signing_is_refused(ck):
    f = ck / "ucp.manifest.json"
    f.write_bytes(f.read_bytes().replace(b'"format":"ucp"', b'"format":"ucq"'))
    with pytest.raises(FormatError, match="manifest checksum mismatch"):
        open_checkpoint(ck)


@pytest.mark.parametrize("edit, match", [
    (lambda rec: rec["chunk_table"].clear(), "chunk_table has 0 entries"),
    (lambda rec: rec.pop("storage_dtype"), "storage_dtype None contradicts dtype 'int64'"),
], ids=["no-chunks", "no-storage-dtype"])
def test_metadata_array_records_are_checked_like_parameter_arrays(tmp_path, edit, match):
    """A committed manifest's metadata arrays are complete records too (only a part record of one
    of several writers may hold some chunks of an array)."""
    root = tmp_path / "ck"
    with create_checkpoint(root) as w:
        w.write_tensor("w", "param", torch.ones(2))
        w.set_metadata({"rng": torch.arange(3)})
    rewrite_manifest(root, lambda d: edit(d["meta_arrays"]["_ucp/meta/0"]))
    with pytest.raises(FormatError, match=rf"metadata array '_ucp/meta/0': {match}"):
        open_checkpoint(root)


def test_a_current_checkpoint_opens_and_verifies_without_warnings(ck):
    """Only format_version 1 manifests (shard contents not bound) are read with a warning."""
    import warnings

    from ucp.format import verify

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_checkpoint(ck).read("w").shape == (4, 4)
        assert verify(ck) == []


def test_extents_of_one_are_valid_chunk_and_inner_chunk_shapes(tmp_path):
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    with create_checkpoint(tmp_path / "ck") as w:
        w.write_tensor("rows", "param", t, chunks=(1, 4))
        w.write_tensor("tiles", "param", t, shards=(2, 4), chunks=(1, 1))
    ck = open_checkpoint(tmp_path / "ck")
    assert ck.array_info("tiles").inner_chunks == (1, 1)
    assert torch.equal(ck.read("rows"), t) and torch.equal(ck.read("tiles"), t)


def test_signed_body_that_is_not_json_is_refused(ck):
    import crc32c

    body = b'{"format":"ucp",}'
    (ck / "ucp.manifest.json").write_bytes(b'{"crc32c":%d,' % crc32c.crc32c(body) + body[1:])
    with pytest.raises(FormatError, match="manifest is not valid JSON"):
        open_checkpoint(ck)


def test_dump_refuses_a_body_that_already_has_a_checksum():
    with pytest.raises(ValueError, match="must not contain crc32c"):
        M.dump({"crc32c": 1, "format": "ucp"})
    assert M.load_verified(M.dump({"format": "ucp"}), "x") == {"format": "ucp"}


def test_opening_a_checkpoint_leaves_garbage_collection_as_it_was(ck):
    import gc

    assert gc.isenabled()
    open_checkpoint(ck)
    M.dump({"format": "ucp"})
    assert gc.isenabled()
    gc.disable()
    try:
        open_checkpoint(ck)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_crc32c_of_zero_is_a_valid_record(ck):
    """0 is a crc32c value like any other: the record is well formed (verify then finds the document
    differs, as it does)."""
    from ucp.format import verify

    rewrite_manifest(ck, lambda d: d["files"].__setitem__("zarr.json", [d["files"]["zarr.json"][0], 0]))
    assert open_checkpoint(ck).read("w").shape == (4, 4)
    (problem,) = verify(ck)
    assert "zarr.json: zarr.json document differs from the manifest's record" in problem


@pytest.mark.parametrize("rel", ["_ucp/meta/0/zarr.json", "v/param/zarr.json"], ids=["metadata-array", "second-param"])
@pytest.mark.parametrize("edit", ["crc", "missing"])
def test_the_array_whose_document_record_is_wrong_is_named(tmp_path, rel, edit):
    """Any array's ``files`` record of its zarr.json (a metadata array's or the second parameter's,
    altered or missing) is refused, and the error names that document, not another one."""
    root = tmp_path / "ck"
    with create_checkpoint(root) as w:
        w.write_tensor("w", "param", torch.ones(2))
        w.write_tensor("v", "param", torch.ones(3))
        w.set_metadata({"rng": torch.arange(3)})

    def change(d):
        if edit == "missing":
            d["files"].pop(rel)
        else:
            d["files"][rel][1] ^= 1

    rewrite_manifest(root, change)
    with pytest.raises(FormatError, match=f"{rel} is not recorded in 'files' as the document"):
        open_checkpoint(root)


def test_a_files_record_of_size_0_and_crc32c_0_is_well_formed(ck):
    """[0, 0] is a well-formed record (an empty file's): the manifest opens; verify then reports the
    document differs from it."""
    from ucp.format import verify

    rewrite_manifest(ck, lambda d: d["files"].__setitem__("zarr.json", [0, 0]))
    assert open_checkpoint(ck).read("w").shape == (4, 4)
    (problem,) = verify(ck)
    assert "zarr.json" in problem
