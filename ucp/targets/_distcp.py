"""Writing torch DCP files item by item: ``.distcp`` files whose items are ``torch.save``
records at ``(offset, length)``, as DCP's ``FileSystemWriter`` writes them, and the
``.metadata`` (DCP's own ``Metadata`` classes) that indexes them, so that DCP's
``FileSystemReader`` — and Megatron-Core's ``torch_dist`` loader on top of it — reads them as
their own. Used by the Megatron target; the DCP target (``ucp.targets.dcp``) writes the same
records and could share this.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class DistcpWriter:
    """Items written as DCP's ``FileSystemWriter`` writes them; :meth:`metadata` is the
    ``.metadata`` that indexes them."""

    def __init__(self, root: Path):
        self.root = root
        self.tensors: dict[str, tuple[Any, tuple, list]] = {}     # key -> (properties, size, chunks)
        self.objects: list[str] = []
        self.storage: dict[Any, Any] = {}
        self.written: list[Path] = []

    def write(self, rel: str, items) -> None:
        """``items``: (key, global size, offsets, tensor) or (key, None, None, bytes)."""
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex,
                                                           TensorProperties)
        import torch

        path = self.root / rel
        self.written.append(path)
        with open(path, "wb") as f:
            for key, size, offsets, data in items:
                start = f.tell()
                if size is None:
                    f.write(data)
                    self.objects.append(key)
                    index = MetadataIndex(key)
                else:
                    torch.save(data.contiguous(), f)
                    props, _, chunks = self.tensors.setdefault(
                        key, (TensorProperties.create_from_tensor(data), tuple(size), []))
                    index = MetadataIndex(key, torch.Size(offsets), len(chunks))
                    chunks.append(ChunkStorageMetadata(torch.Size(offsets), data.shape))
                self.storage[index] = _StorageInfo(rel, start, f.tell() - start)
            f.flush()
            os.fsync(f.fileno())

    def metadata(self):
        from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, Metadata,
                                                           TensorStorageMetadata)
        import torch

        sd = {k: TensorStorageMetadata(p, torch.Size(s), c) for k, (p, s, c) in self.tensors.items()}
        sd.update({k: BytesStorageMetadata() for k in self.objects})
        return Metadata(state_dict_metadata=sd, storage_data=self.storage)
