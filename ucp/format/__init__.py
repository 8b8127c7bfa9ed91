"""The universal checkpoint format: zarr v3 groups and arrays, written and read directly.

See spec/FORMAT.md (normative). Public API::

    create_checkpoint(path, overwrite=False, storage_options=None, chunk_bytes=None, durable=True, workers=4, fsync_each=None)
    open_checkpoint(path, storage_options=None, workers=4)
    verify(path, deep=True, storage_options=None)
"""
from ucp.format.layout import DEFAULT_CHUNK_BYTES, default_chunks
from ucp.format.manifest import FORMAT_VERSION
from ucp.format.names import decode_param, encode_param
from ucp.format.reader import ArrayInfo, Checkpoint, open_checkpoint
from ucp.format.verify import verify
from ucp.format.writer import ArrayWriter, CheckpointWriter, create_checkpoint

__all__ = ["create_checkpoint", "open_checkpoint", "verify", "Checkpoint", "CheckpointWriter", "ArrayWriter",
           "ArrayInfo", "FORMAT_VERSION", "DEFAULT_CHUNK_BYTES", "default_chunks", "encode_param", "decode_param"]
