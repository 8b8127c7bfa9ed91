"""``verify(path)``: every problem of a checkpoint, as human-readable lines."""
from __future__ import annotations

import crc32c

from ucp.errors import FormatError
from ucp.format import manifest as _manifest, shard as _shard
from ucp.format.layout import CRC_BYTES
from ucp.format.store import MANIFEST, make_store


def verify(path, deep=True, storage_options=None) -> list[str]:
    """Return a list of problems (empty when the checkpoint checks out).

    Checks the manifest (presence, checksum), every zarr.json document against its recorded size and
    crc32c, and every chunk file's size; with ``deep`` also reads every chunk and checks its crc32c
    against both the trailing checksum and the manifest.
    """
    store = make_store(path, storage_options)
    try:
        raw = store.get(MANIFEST)
    except (FileNotFoundError, NotADirectoryError):
        return [str(_manifest.not_committed(path))]
    try:
        man = _manifest.load(raw, f"{path}/{MANIFEST}")
    except FormatError as e:
        return [str(e)]
    problems = []
    for rel, (size, crc) in man.get("files", {}).items():
        try:
            data = store.get(rel)
        except (FileNotFoundError, NotADirectoryError):
            problems.append(f"{rel}: zarr.json document is missing")
            continue
        if len(data) != size or crc32c.crc32c(data) != crc:
            problems.append(f"{rel}: zarr.json document differs from the manifest's record "
                            f"(size {len(data)} vs {size}, crc32c {crc32c.crc32c(data):#010x} vs {crc:#010x})")
    arrays = []
    for p in man["params"]:
        for s, rec in p["states"].items():
            arrays.append((f"param {p['name']!r} state {s!r}", rec))
    for rel, rec in man.get("meta_arrays", {}).items():
        arrays.append((f"metadata tensor {rel}", rec))
    for where, rec in arrays:
        inner = rec.get("inner_chunks")
        for key, (size, crc) in rec["chunk_table"].items():
            rel = f"{rec['path']}/{key}"
            if deep:
                try:
                    data = store.get(rel)
                except (FileNotFoundError, NotADirectoryError):
                    problems.append(f"{where} chunk {key} ({rel}): missing")
                    continue
                fsize = len(data)
            else:
                fsize = store.size(rel)
                if fsize is None:
                    problems.append(f"{where} chunk {key} ({rel}): missing")
                    continue
            if fsize != size:
                problems.append(f"{where} chunk {key} ({rel}): {'truncated' if fsize < size else 'extra bytes'}"
                                f" ({fsize} bytes, manifest records {size})")
                continue
            if deep and inner is not None:
                idx = tuple(int(x) for x in key.split("/")[1:])
                try:
                    c = _shard.check_shard(data, rec["shape"], rec["chunks"], inner, idx,
                                           _itemsize(rec["dtype"]))
                except _shard.ShardError as e:
                    problems.append(f"{where} shard {key} ({rel}): {e}")
                    continue
                if c != crc:
                    problems.append(f"{where} shard {key} ({rel}): index crc32c {c:#010x} differs from the "
                                    f"manifest's {crc:#010x}")
            elif deep:
                mv = memoryview(data)
                c = crc32c.crc32c(mv[:-CRC_BYTES])
                stored = int.from_bytes(mv[-CRC_BYTES:], "little")
                if c != stored or c != crc:
                    problems.append(f"{where} chunk {key} ({rel}): crc32c mismatch (computed {c:#010x}, "
                                    f"stored {stored:#010x}, manifest {crc:#010x})")
    return problems


def _itemsize(dn):
    from ucp.format import dtypes

    return dtypes.itemsize(dn)
