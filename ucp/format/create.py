"""``create_checkpoint``: the one entry point to every kind of writer (one writer, or one of several)."""
from __future__ import annotations

from ucp.errors import UcpError
from ucp.format.parts import PartWriter
from ucp.format.writer import DEFAULT_WORKERS, CheckpointWriter


def create_checkpoint(path, overwrite=False, storage_options=None, chunk_bytes=None, durable=True,
                      workers=DEFAULT_WORKERS, fsync_each=None, resume=False, shard_bytes=None,
                      inner_bytes=None, sharding=None, rank=None, world_size=None,
                      fingerprint=None) -> CheckpointWriter:
    """Start writing a checkpoint at ``path`` (local path, ``file://`` or other fsspec URL).

    The writer takes the root exclusively (lock file ``ucp.lock`` naming it; a second writer gets
    ``WriterLockedError`` naming the first; a lock left by a dead process of this host is taken over).
    ``overwrite``: replace a non-empty destination (the old manifest is removed first).
    ``resume``: continue an interrupted, uncommitted write: chunk files already present whose size and
    crc32c check out are kept, writes covering them are skipped, ``ArrayWriter.pending()`` lists the rest.
    ``fingerprint``: any JSON value that identifies the source (e.g. ``source_fingerprint(src_dir)``: file
    names, sizes, mtimes); it is recorded at the start, and a resume with a different one, or one that
    declares an array with a different layout, raises ``ResumeMismatchError`` naming what changed.
    ``durable``: make all data stable before the manifest (fsync large chunks + one syncfs).
    ``workers``: threads that write the chunks of one large box in parallel.
    Layout (spec/FORMAT.md §4.3): by default arrays larger than ``inner_bytes`` (256 KiB) are sharded,
    shards of about ``shard_bytes`` (32 MiB) holding inner tiles of about ``inner_bytes``; smaller
    arrays are one plain chunk. ``chunk_bytes`` alone selects plain row chunks of that size (the
    layout before sharding); ``sharding=False`` forces plain chunks of ``chunk_bytes`` (default 4 MiB).
    ``rank``, ``world_size``: this writer is one of several writing one checkpoint (spec §13):
    ``commit()`` writes the part record ``_ucp/parts/<rank>.json`` instead of the manifest; one
    coordinator then runs ``commit_parts(path, world_size)``. With ``resume`` a rerun rank adopts its
    own valid chunk files (checked when it writes them again).
    """
    if (rank is None) != (world_size is None):
        raise UcpError("pass both rank= and world_size= (several writers), or neither")
    kw = dict(overwrite=overwrite, storage_options=storage_options, chunk_bytes=chunk_bytes, durable=durable,
              workers=workers, fsync_each=fsync_each, resume=resume, shard_bytes=shard_bytes,
              inner_bytes=inner_bytes, sharding=sharding, fingerprint=fingerprint)
    if rank is not None:
        return PartWriter(path, rank, world_size, **kw)
    return CheckpointWriter(path, **kw)
