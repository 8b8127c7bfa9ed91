"""A manifest that lies consistently (shape, chunk grid, recorded file sizes and its zarr.json
record all agree, only the files on disk are small) makes no read path allocate what it claims:
each checks the real file size first and raises ``CorruptChunkError``. tests/test_hostile_manifest.py
checks this for row chunks; surviving mutants of ucp/format/reader.py showed the other paths
(column chunks, whole shards) were never tried.
"""
import tracemalloc

import pytest
import torch

from ucp.errors import CorruptChunkError
from ucp.format import create_checkpoint, open_checkpoint
from ucp.format.manifest import ManifestArray, key_index

from _manifest_edit import rewrite_manifest

LIMIT = 64 << 20  # peak traced memory allowed for the failing read (each lie claims >= 128 MiB)


def _lie(root, shape, chunks, inner=None):
    """Re-sign the manifest with array 'w' claiming this geometry, keeping every record consistent."""
    def edit(doc):
        rec = doc["params"][0]["states"]["param"]
        arr = ManifestArray(rec["path"], rec["dtype"], tuple(shape), tuple(chunks), {},
                            tuple(inner) if inner else None)
        rec["shape"], rec["chunks"] = list(shape), list(chunks)
        if inner:
            rec["inner_chunks"] = list(inner)
        table = {}
        for k, v in rec["chunk_table"].items():
            table[k] = [arr.chunk_file_size(key_index(k))] + list(v[1:])
        rec["chunk_table"] = table
        doc["files"][f"{rec['path']}/zarr.json"] = list(arr.doc_record())
    rewrite_manifest(root, edit)


def _refused_without_allocating(root, index, match):
    ck = open_checkpoint(root)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptChunkError, match=match):
            ck.read("w", index=index)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < LIMIT, peak


def test_column_chunks(tmp_path):
    """A box inside one column chunk is read chunk by chunk (not as whole rows)."""
    root = tmp_path / "ck"
    with create_checkpoint(root) as w:
        w.write_tensor("w", "param", torch.ones(4, 2), chunks=(4, 1))
    rows = 1 << 26  # claims 2 chunks of 256 MiB
    _lie(root, (rows, 2), (rows, 1))
    _refused_without_allocating(root, (slice(0, 1), slice(0, 1)),
                                rf"chunk c/0/0 .*size 20 bytes, the manifest records {rows * 4 + 4} \(truncated\)")


def test_whole_shard(tmp_path):
    """A box touching every inner chunk of a shard reads the shard file whole."""
    root = tmp_path / "ck"
    with create_checkpoint(root) as w:
        w.write_tensor("w", "param", torch.ones(8), shards=(8,), chunks=(4,))
    rows = 1 << 26  # claims one shard of two 128 MiB inner chunks
    _lie(root, (rows,), (rows,), (rows // 2,))
    _refused_without_allocating(root, slice(rows // 2 - 1, rows // 2 + 1), r"shard c/0 .*size 76 bytes, the manifest")

