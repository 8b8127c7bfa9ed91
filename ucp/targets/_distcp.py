"""Writing torch DCP files item by item, for the DCP and Megatron targets: ``.distcp`` files
whose items are ``torch.save`` records at ``(offset, length)``, as DCP's ``FileSystemWriter``
writes them, and the ``.metadata`` (DCP's own ``Metadata`` classes) that indexes them, so that
DCP's ``FileSystemReader`` — and Megatron-Core's ``torch_dist`` loader on top of it — reads
them as their own.

A file's index is a list of JSON-able records (:func:`write_items`), written beside it, so that a
target whose units are written by several processes hands them to the one that writes
``.metadata`` (:class:`DistcpWriter`).
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any, Iterable, Mapping

METADATA_FILE = ".metadata"
#: beside each written file until ``.metadata`` is: its records (:func:`write_items`), JSON
INDEX_SUFFIX = ".ucp-index.json"


def distcp_name(rank: int) -> str:
    """The file ``FileSystemWriter`` gives rank ``rank`` (one file per rank, its default)."""
    return f"__{rank}_0.distcp"


def write_metadata(dst: Path, metadata) -> None:
    """Write DCP's ``.metadata`` into ``dst``, last, atomically and fsync'ed: it is what makes the
    ``.distcp`` files a checkpoint for DCP and Megatron, so a crash leaves none or a whole one."""
    tmp = dst / (METADATA_FILE + ".tmp")
    try:
        with open(tmp, "wb") as f:
            pickle.dump(metadata, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst / METADATA_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_items(path: Path, items: Iterable) -> list[list]:
    """Write ``items`` ``(key, offsets, global size, value)`` one after another into ``path``
    (fsync'ed) and return one record per item: ``[key, offsets, global size, dtype, start,
    length, local sizes]``.

    ``value``: a tensor (saved contiguous, without the rest of a larger storage it views) or any
    other value, ``bytes`` included, ``torch.save``'d as DCP saves every non-tensor entry (offsets
    and size None): torchtitan's dataloader state is ``bytes``, and written raw it was no record
    ``FileSystemReader`` could load. dtype None: not a tensor."""
    import torch

    records = []
    with open(path, "wb") as f:
        for key, offsets, size, value in items:
            start = f.tell()
            if isinstance(value, torch.Tensor):
                t = value.contiguous()
                if t.untyped_storage().nbytes() != t.numel() * t.element_size():
                    t = t.clone()          # torch.save writes a view's whole storage
                torch.save(t, f)
                rec = [key, list(offsets), list(size), str(t.dtype).removeprefix("torch."), list(t.shape)]
            else:
                torch.save(value, f)
                rec = [key, None, None, None, None]
            records.append(rec[:4] + [start, f.tell() - start, rec[4]])
        f.flush()
        os.fsync(f.fileno())
    return records


def build_metadata(files: Mapping[str, list], planner_data=None, checkpoint_id=None):
    """DCP ``Metadata`` indexing ``{rel: records of write_items}``. ``planner_data``: a callable
    ``key -> planner path`` (DCP's ``flatten_state_dict`` layout), or None."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                       MetadataIndex, StorageMeta, TensorProperties,
                                                       TensorStorageMetadata)

    sdm: dict[str, Any] = {}
    storage: dict = {}
    for rel, records in files.items():
        for key, offs, size, dtype, start, length, sizes in records:
            if dtype is None:
                sdm[key] = BytesStorageMetadata()
                storage[MetadataIndex(key)] = _StorageInfo(rel, start, length)
                continue
            md = sdm.setdefault(key, TensorStorageMetadata(TensorProperties(dtype=getattr(torch, dtype)),
                                                           torch.Size(size), []))
            storage[MetadataIndex(key, torch.Size(offs), len(md.chunks))] = _StorageInfo(rel, start, length)
            md.chunks.append(ChunkStorageMetadata(torch.Size(offs), torch.Size(sizes)))
    extra = {}
    if planner_data is not None:
        extra.update(planner_data={k: planner_data(k) for k in sdm}, version="1.0.0")
    if checkpoint_id is not None:
        extra["storage_meta"] = StorageMeta(checkpoint_id=str(checkpoint_id))
    return Metadata(state_dict_metadata=sdm, storage_data=storage, **extra)


class DistcpWriter:
    """Items written file by file as DCP's ``FileSystemWriter`` writes them, by the processes of a
    job or by one: each file's index goes to a JSON file beside it (:data:`INDEX_SUFFIX`), and the
    process that finishes merges every file's into the ``.metadata`` (:meth:`finish`), whichever
    process wrote it. An index kept in memory indexed only the finishing process's own files."""

    def __init__(self, root: Path):
        self.root = root
        self.written: list[Path] = []

    def _index(self, rel: str) -> Path:
        return self.root / (rel + INDEX_SUFFIX)

    def write(self, rel: str, items) -> None:
        """``items``: (key, offsets, global size, tensor) or (key, None, None, value)."""
        path, index = self.root / rel, self._index(rel)
        self.written += [path, index]
        index.write_text(json.dumps(write_items(path, items)))

    def finish(self, rels: Iterable[str], planner_data=None, checkpoint_id=None) -> None:
        """Write the ``.metadata`` of the files ``rels`` (every file of the checkpoint), last, and
        remove their indexes."""
        from ucp.errors import UcpError

        files = {}
        for rel in rels:
            try:
                files[rel] = json.loads(self._index(rel).read_text())
            except FileNotFoundError:
                raise UcpError(f"{self._index(rel)}: the index of {rel} is missing: was it written by every "
                               "process, into the same folder?") from None
        write_metadata(self.root, build_metadata(files, planner_data, checkpoint_id))
        for rel in files:
            self._index(rel).unlink(missing_ok=True)
