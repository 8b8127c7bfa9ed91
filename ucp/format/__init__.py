"""The universal checkpoint format: zarr v3 groups and arrays, written and read directly.

spec/FORMAT.md is normative. Public API::

    w = create_checkpoint(path, overwrite=False, storage_options=None, chunk_bytes=None,
                          durable=True, workers=4, fsync_each=None, resume=False,
                          shard_bytes=None, inner_bytes=None, sharding=None,
                          fingerprint=None)                      # -> CheckpointWriter
    w.add_param(name, meta=None)
    a = w.add_array(name, state, shape, dtype, chunks=None, shards=None)     # -> ArrayWriter
    a.write(offset, tensor); a.pending(); a.missing()
    w.write_tensor(name, state, tensor, chunks=None, shards=None)
    w.set_metadata(obj); w.commit(); w.abort()                  # also a context manager

    ck = open_checkpoint(path, storage_options=None, workers=4)  # -> Checkpoint (also ucp.open)
    ck.params; ck.states(name); ck.param_meta(name); ck.array_info(name, state); ck.metadata
    ck.read(name, state="param", index=None, out=None); ck.read_box(name, state, start, stop, out=None)
    ck.nbytes; ck.path; ck.bytes_read; ck.chunks_read; ck.last_read_stats; ck.manifest

    verify(path, deep=True, storage_options=None, strict=False) # -> list[str] of problems
    verify_report(path, ...)                                    # -> (problems, warnings such as stray files)
    source_fingerprint(path)                                    # {file: [size, mtime_ns]} for fingerprint=

    # several writers (spec §13): each rank, then one coordinator after a barrier
    w = create_checkpoint(path, rank=r, world_size=n, resume=False, ...); ...; w.commit()  # part record
    commit_parts(path, n, metadata=None, storage_options=None, durable=True, workers=4, cleanup=True)
    split_boxes(shape, k, dim=0, mode="chunk"|"tensor_split"); aligned_chunks(shape, boxes, itemsize)
"""
from ucp.format.layout import (DEFAULT_CHUNK_BYTES, DEFAULT_INNER_BYTES, DEFAULT_SHARD_BYTES, default_chunks,
                               default_sharding)
from ucp.format.distributed import commit_distributed, create_distributed
from ucp.format.array_writer import ArrayWriter
from ucp.format.create import create_checkpoint
from ucp.format.journal import ResumeMismatchError, source_fingerprint
from ucp.format.lock import WriterLockedError
from ucp.format.manifest import FORMAT_VERSION, Manifest, ManifestArray, ManifestParam
from ucp.format.names import decode_param, encode_param
from ucp.format.parts import PartWriter, commit_parts, create_part
from ucp.format.splits import aligned_chunks, split_boxes
from ucp.format.verify import verify, verify_report
from ucp.format.writer import CheckpointWriter

__all__ = ["create_checkpoint", "open_checkpoint", "verify", "Checkpoint", "CheckpointWriter", "ArrayWriter",
           "ArrayInfo", "FORMAT_VERSION", "DEFAULT_CHUNK_BYTES", "DEFAULT_SHARD_BYTES", "DEFAULT_INNER_BYTES",
           "default_chunks", "default_sharding", "encode_param", "decode_param", "commit_parts", "create_part",
           "split_boxes", "aligned_chunks", "create_distributed", "commit_distributed", "PartWriter", "verify_report",
           "source_fingerprint", "ResumeMismatchError", "WriterLockedError", "Manifest", "ManifestArray",
           "ManifestParam"]


def __getattr__(name):
    """The reader, imported on first use: it holds torch tensors (and imports torch), which
    writing a checkpoint from numpy boxes never needs."""
    if name in ("ArrayInfo", "Checkpoint", "open_checkpoint"):
        from ucp.format import reader

        return getattr(reader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
