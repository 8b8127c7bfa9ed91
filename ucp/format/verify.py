"""``verify(path)``: every problem of a checkpoint, as human-readable lines."""
from __future__ import annotations

import crc32c

from ucp.errors import FormatError
from ucp.format import manifest as _manifest, shard as _shard
from ucp.format.layout import CRC_BYTES
from ucp.format.store import MANIFEST, make_store


def verify(path, deep=True, storage_options=None, progress=False, workers=4) -> list[str]:
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
    jobs = [(where, rec, key, size, crc) for where, rec in arrays
            for key, (size, crc) in rec["chunk_table"].items()]

    def check(job):
        where, rec, key, size, crc = job
        return _check_chunk(store, where, rec, key, size, crc, deep)

    from concurrent.futures import ThreadPoolExecutor

    from ucp.progress import bar

    total = sum(j[3] for j in jobs) if deep else len(jobs)
    with bar(total=total, desc="verify", unit="B" if deep else "chunk",
             enabled=None if progress else False) as pb, \
            ThreadPoolExecutor(max(1, workers)) as ex:
        # chunks are independent files: checking them is I/O bound, so a few threads overlap reads
        for job, found in zip(jobs, ex.map(check, jobs)):
            problems.extend(found)
            pb.update(job[3] if deep else 1)
    return problems


def _itemsize(dn):
    from ucp.format import dtypes

    return dtypes.itemsize(dn)


def _check_chunk(store, where, rec, key, size, crc, deep) -> list[str]:
    inner = rec.get("inner_chunks")
    rel = f"{rec['path']}/{key}"
    if deep:
        try:
            data = store.get(rel)
        except (FileNotFoundError, NotADirectoryError):
            return [f"{where} chunk {key} ({rel}): missing"]
        fsize = len(data)
    else:
        fsize = store.size(rel)
        if fsize is None:
            return [f"{where} chunk {key} ({rel}): missing"]
    if fsize != size:
        return [f"{where} chunk {key} ({rel}): {'truncated' if fsize < size else 'extra bytes'}"
                f" ({fsize} bytes, manifest records {size})"]
    if deep and inner is not None:
        idx = tuple(int(x) for x in key.split("/")[1:])
        try:
            c = _shard.check_shard(data, rec["shape"], rec["chunks"], inner, idx, _itemsize(rec["dtype"]))
        except _shard.ShardError as e:
            return [f"{where} shard {key} ({rel}): {e}"]
        if c != crc:
            return [f"{where} shard {key} ({rel}): index crc32c {c:#010x} differs from the "
                    f"manifest's {crc:#010x}"]
    elif deep:
        mv = memoryview(data)
        c = crc32c.crc32c(mv[:-CRC_BYTES])
        stored = int.from_bytes(mv[-CRC_BYTES:], "little")
        if c != stored or c != crc:
            return [f"{where} chunk {key} ({rel}): crc32c mismatch (computed {c:#010x}, "
                    f"stored {stored:#010x}, manifest {crc:#010x})"]
    return []
