"""`verify` reports every damaged ``zarr.json`` document, each once, and checks format_version 1
checkpoints too. Written to kill surviving mutants of ucp/format/verify.py (bench/mutation.py)."""
import json
import shutil

import pytest
import torch

from ucp.format import create_checkpoint, verify
from ucp.format import manifest as M


def _write(path, sharded=False):
    kw = dict(shards=(8, 8), chunks=(4, 4)) if sharded else dict(chunks=(4, 8))
    with create_checkpoint(path) as w:
        for name in ("a", "b"):
            w.write_tensor(name, "param", torch.arange(64, dtype=torch.float32).reshape(8, 8), **kw)
    return path


def test_every_missing_zarr_json_is_reported(tmp_path):
    path = _write(tmp_path / "ck")
    (path / "a" / "param" / "zarr.json").unlink()
    (path / "b" / "param" / "zarr.json").unlink()
    problems = verify(path)
    missing = [p for p in problems if "zarr.json document is missing" in p]
    assert sorted(p.split(":")[0] for p in missing) == ["a/param/zarr.json", "b/param/zarr.json"], problems


def test_same_size_edit_of_a_zarr_json_is_reported(tmp_path):
    path = _write(tmp_path / "ck")
    f = path / "a" / "param" / "zarr.json"
    raw = f.read_bytes()
    edited = raw.replace(b'"a"', b'"x"', 1) if b'"a"' in raw else raw[:-2] + b" " + raw[-1:]
    assert len(edited) == len(raw) and edited != raw
    f.write_bytes(edited)
    (problem,) = [p for p in verify(path) if p.startswith("a/param/zarr.json")]
    assert "differs from the manifest's record" in problem


def test_every_unreadable_zarr_json_is_reported(tmp_path):
    """A document replaced by a symlink is refused (FormatError) and reported, and the others still checked."""
    path = _write(tmp_path / "ck")
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("a", "b"):
        doc = path / name / "param" / "zarr.json"
        shutil.copy(doc, outside / f"{name}.json")
        doc.unlink()
        doc.symlink_to(outside / f"{name}.json")
    problems = verify(path)
    assert sum("a/param/zarr.json" in p for p in problems) == 1, problems
    assert sum("b/param/zarr.json" in p for p in problems) == 1, problems


def test_format_version_1_sharded_checkpoint_verifies(tmp_path):
    """Version 1 records a shard's size and index crc32c only: verify checks those, without failing
    on the content crc32c that version 2 adds."""
    path = _write(tmp_path / "ck", sharded=True)
    doc = json.loads((path / "ucp.manifest.json").read_bytes())
    doc.pop("crc32c")
    doc["format_version"] = 1
    for p in doc["params"]:
        for rec in p["states"].values():
            rec["chunk_table"] = {k: v[:2] for k, v in rec["chunk_table"].items()}
    (path / "ucp.manifest.json").write_bytes(M.dump(doc))
    with pytest.warns(UserWarning, match="format_version 1"):
        assert verify(path) == []
