"""``verify(path)``: every problem of a checkpoint, as human-readable lines."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import crc32c

from ucp.errors import FormatError
from ucp.format import manifest as _manifest, shard as _shard
from ucp.format.layout import CRC_BYTES
from ucp.format.manifest import ManifestArray, key_index
from ucp.format.store import MANIFEST, make_store


def verify(path, deep=True, storage_options=None, progress=False, workers=4, strict=False) -> list[str]:
    """Return a list of problems (empty when the checkpoint checks out).

    Checks the manifest (presence, checksum, self-consistency, agreement with every ``zarr.json``), every
    ``zarr.json`` document against its recorded size and crc32c, and every chunk file's size; with
    ``deep`` also reads every chunk and checks its crc32c against both the trailing checksum and the
    manifest (and every shard's index and content crc32c). ``strict``: files that are not part of the
    checkpoint (stray files) are problems too; otherwise they are only warnings (``verify_report``).
    """
    problems, warnings = verify_report(path, deep, storage_options, progress, workers)
    return problems + (warnings if strict else [])


def verify_report(path, deep=True, storage_options=None, progress=False, workers=4) -> tuple[list, list]:
    """``(problems, warnings)``; warnings name stray files (a checkpoint is still valid with them)."""
    store = make_store(path, storage_options)
    why = store.describe_root()
    if why is not None:
        return [str(_manifest.not_committed(path, why))], []
    try:
        raw = store.get(MANIFEST)
    except (FileNotFoundError, NotADirectoryError):
        return [str(_manifest.not_committed(path))], []
    except FormatError as e:
        return [str(e)], []
    try:
        man = _manifest.load(raw, f"{path}/{MANIFEST}")
    except FormatError as e:
        return [str(e)], []
    problems = _check_docs(store, man)
    jobs = [(where, rec, key) for where, rec in man.arrays() for key in rec.chunk_table]
    problems += _check_chunks(store, jobs, deep, progress, workers)
    return problems, _strays(store, man, jobs)


def _check_docs(store, man) -> list[str]:
    problems = []
    for rel, (size, crc) in man.files.items():
        try:
            data = store.get(rel)
        except (FileNotFoundError, NotADirectoryError):
            problems.append(f"{rel}: zarr.json document is missing")
            continue
        except FormatError as e:
            problems.append(str(e))
            continue
        if len(data) != size or crc32c.crc32c(data) != crc:
            problems.append(f"{rel}: zarr.json document differs from the manifest's record "
                            f"(size {len(data)} vs {size}, crc32c {crc32c.crc32c(data):#010x} vs {crc:#010x})")
    return problems


def _check_chunks(store, jobs, deep, progress, workers) -> list[str]:
    from ucp.progress import bar

    problems = []
    total = sum(rec.chunk_table[key][0] for _w, rec, key in jobs) if deep else len(jobs)
    with bar(total=total, desc="verify", unit="B" if deep else "chunk",
             enabled=None if progress else False) as pb, ThreadPoolExecutor(max(1, workers)) as ex:
        # chunks are independent files: checking them is I/O bound, so a few threads overlap reads
        for (where, rec, key), found in zip(jobs, ex.map(lambda j: check_chunk(store, *j, deep), jobs)):
            problems.extend(found)
            pb.update(rec.chunk_table[key][0] if deep else 1)
    return problems


def _strays(store, man, jobs) -> list[str]:
    """Files under the root that no record names (left-overs, or planted): warnings."""
    known = {MANIFEST} | set(man.files) | {f"{rec.path}/{key}" for _w, rec, key in jobs}
    return [f"{rel}: stray file, not part of the checkpoint" for rel in sorted(store.list_files()) if rel not in known]


def check_chunk(store, where, rec: ManifestArray, key, deep) -> list[str]:
    """Problems of one chunk or shard file (missing, wrong size, and with ``deep`` its checksums)."""
    size = rec.chunk_table[key][0]
    rel = f"{rec.path}/{key}"
    try:
        if deep:
            data = store.get(rel)
            fsize = len(data)
        else:
            fsize = store.size(rel)
    except (FileNotFoundError, NotADirectoryError):
        fsize = None
    except FormatError as e:
        return [f"{where} chunk {key}: {e}"]
    if fsize is None:
        return [f"{where} chunk {key} ({rel}): missing"]
    if fsize != size:
        return [f"{where} chunk {key} ({rel}): {'truncated' if fsize < size else 'extra bytes'}"
                f" ({fsize} bytes, manifest records {size})"]
    if not deep:
        return []
    if rec.inner_chunks is not None:
        return _check_shard(where, rec, key, rel, data)
    mv = memoryview(data)
    c = crc32c.crc32c(mv[:-CRC_BYTES])
    stored = int.from_bytes(mv[-CRC_BYTES:], "little")
    crc = rec.chunk_table[key][1]
    if c != stored or c != crc:
        return [f"{where} chunk {key} ({rel}): crc32c mismatch (computed {c:#010x}, "
                f"stored {stored:#010x}, manifest {crc:#010x})"]
    return []


def _check_shard(where, rec, key, rel, data) -> list[str]:
    try:
        icrc, content = _shard.check_shard(data, rec.shape, rec.chunks, rec.inner_chunks, key_index(key), rec.itemsize)
    except _shard.ShardError as e:
        return [f"{where} shard {key} ({rel}): {e}"]
    ent = rec.chunk_table[key]
    if icrc != ent[1]:
        return [f"{where} shard {key} ({rel}): index crc32c {icrc:#010x} differs from the manifest's {ent[1]:#010x}"]
    if len(ent) > 2 and content != ent[2]:
        return [f"{where} shard {key} ({rel}): content crc32c {content:#010x} differs from the manifest's "
                f"{ent[2]:#010x} (the file is another shard's, or stale)"]
    return []
