"""``UniversalReader``: ``dcp.load`` from a universal checkpoint into any layout, reading only
the bytes each rank's shards need (see the package docstring)."""
from __future__ import annotations

import io
import os
import uuid
from pathlib import Path
from typing import Any, Optional

import torch
from torch.futures import Future
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, StorageMeta, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan
from torch.distributed.checkpoint.storage import StorageReader

from ucp.dcp.keys import check_form, form_key, model_key, optim_key, planner_path
from ucp.dcp.metadata import group_entries, is_flattened, listed_param_groups, param_holder
from ucp.dcp.threads import rank_threads
from ucp.errors import UcpError
# imported with this module, not on the first dcp.load: the format's modules take about
# 0.1-0.3 s to import (more where bytecode is not cached), which a load that imported them
# itself paid inside its own time, once per process
from ucp.format import open_checkpoint
from ucp.format.dtypes import scalar_dtype
from ucp.format.staging import read_regions
from ucp.format.store import MANIFEST, make_store


class UniversalReader(StorageReader):
    """``dcp.load(state_dict, storage_reader=UniversalReader(path))`` from a universal checkpoint.

    Fills any DTensor layout (FSDP2, TP, 2-D with ``_StridedShard``), plain tensors and
    non-tensor entries at any world size; each rank reads only the boxes its shards need.
    ``bytes_read`` / ``bytes_needed`` count this rank's tensor reads (for benchmarks).

    Args:
        path: the universal checkpoint (local path or fsspec URL).
        storage_options: fsspec options for remote paths.
        workers: reader threads of the underlying ``Checkpoint`` (default: :func:`rank_threads`).
        keys: the form of the keys to serve (:data:`KEY_FORMS`: ``"get_state_dict"``,
            ``"torchtitan"``: the model's keys at the top level, the optimizer under
            ``optimizer.``, or ``"model_optimizer"``; ``"<form>@<key>"`` under one top-level key);
            default: the form the checkpoint was saved in (``get_state_dict`` for checkpoints
            from other frameworks).
    """

    def __init__(self, path=None, *, storage_options=None, workers: Optional[int] = None,
                 keys: Optional[str] = None):
        super().__init__()
        self.path = path
        self.keys = None if keys is None else check_form(keys, "keys")
        self.storage_options = storage_options
        self.workers = workers
        self.storage_data: dict = {}
        self.load_id = str(uuid.uuid4())
        self._ck = None
        self.bytes_needed = 0

    # -- protocol ---------------------------------------------------------------------------
    def reset(self, checkpoint_id=None) -> None:
        if checkpoint_id is not None:
            self.path = checkpoint_id
        self.storage_data = {}
        self.load_id = str(uuid.uuid4())
        self._close()

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))

    def read_metadata(self) -> Metadata:
        """DCP metadata describing every array of the checkpoint as one whole-tensor chunk."""
        ck = self._checkpoint()
        sdm: dict[str, Any] = {}
        storage: dict[MetadataIndex, tuple] = {}

        def tensor(key, shape, dtype, entry):
            sdm[key] = _whole(shape, dtype)
            storage[MetadataIndex(key, [0] * len(shape))] = entry

        def value(key, v):
            if isinstance(v, torch.Tensor):
                tensor(key, tuple(v.shape), v.dtype, ("value", v))
            else:
                sdm[key] = BytesStorageMetadata()
                storage[MetadataIndex(key)] = ("value", v)

        for name in ck.params:
            _describe_param(ck, name, tensor)
        md = ck.metadata if isinstance(ck.metadata, dict) else {}
        groups, flat = listed_param_groups(ck, md), is_flattened(md)
        served = dict(group_entries(groups, flat))
        for key, v in group_entries(groups, not flat):   # the other form too, where it spells no key
            served.setdefault(key, v)                    # of the saved one: a job loads either
        for key, v in served.items():
            value(key, v)
        for key, v in (md.get("dcp") or {}).items():
            value(key, v)
        paths, form = md.get("dcp_paths"), self.keys or md.get("dcp_keys") or "get_state_dict"
        spelt = {k: form_key(k, form) for k in sdm}
        return Metadata(state_dict_metadata={spelt[k]: v for k, v in sdm.items()},
                        storage_data={MetadataIndex(spelt[i.fqn], i.offset): e for i, e in storage.items()},
                        planner_data={spelt[k]: planner_path(k, paths, flat, form) for k in sdm},
                        storage_meta=StorageMeta(checkpoint_id=str(self.path), load_id=self.load_id))

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args, **kwargs) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner) -> Future:
        """Serve every ``ReadItem`` by reading exactly its region of the universal array. All the
        array regions go to :func:`read_regions` at once: one pool reads their chunks straight
        into the destination tensors DCP resolves where they are contiguous CPU tensors of the
        stored dtype, and through reused host buffers otherwise (CUDA tensors: pinned, the copy of
        one batch overlapping the read of the next). The planner is called from this thread only."""
        regions, done = [], []
        for req in plan.items:
            entry = self.storage_data.get(req.storage_index)
            if entry is None:
                raise UcpError(f"{self.path}: DCP asked for {req.storage_index.fqn!r}, which this "
                               "universal checkpoint does not hold")
            if req.type == LoadItemType.BYTE_IO:
                buf = io.BytesIO()
                torch.save(entry[1], buf)
                buf.seek(0)
                planner.load_bytes(req, buf)
                continue
            target = planner.resolve_tensor(req).detach()
            self.bytes_needed += target.numel() * target.element_size()
            done.append((req, target))
            start = [int(o) for o in req.storage_offsets]
            stop = [o + int(n) for o, n in zip(start, req.lengths)]
            if entry[0] != "array":
                _fill_value(entry, start, stop, target)
            else:
                regions.append((entry[1], entry[2], start, stop, target))
        if regions:
            read_regions(self._checkpoint(), regions)
        for req, target in done:
            planner.commit_tensor(req, target)
        fut = Future()
        fut.set_result(None)
        return fut

    # -- internals --------------------------------------------------------------------------
    def _checkpoint(self):
        if self._ck is None:
            if self.path is None:
                raise UcpError("UniversalReader: no path (pass it, or checkpoint_id= to dcp.load)")
            _check_not_stock_dcp(self.path, self.storage_options)
            workers = self.workers or rank_threads(self.path, self.storage_options)
            self._ck = open_checkpoint(self.path, storage_options=self.storage_options, workers=workers)
        return self._ck

    @property
    def bytes_read(self) -> int:
        return self._ck.bytes_read if self._ck is not None else 0

    def _close(self):
        if self._ck is not None:
            self._ck.close()
            self._ck = None


def _whole(shape, dtype) -> TensorStorageMetadata:
    shape = torch.Size(shape)
    return TensorStorageMetadata(TensorProperties(dtype=dtype), shape,
                                 [ChunkStorageMetadata(torch.Size([0] * len(shape)), shape)])


def _check_not_stock_dcp(path, storage_options=None) -> None:
    """Refuse a local directory that holds DCP's own files (``.metadata`` + ``*.distcp``): alone, it
    is no universal checkpoint (say what it is and how to read it, not only that a manifest is
    missing); beside a universal checkpoint, ``FileSystemWriter`` saved over one (it clears
    nothing), and which of the two a job should load is not for ucp to guess."""
    from ucp.format.store import LocalStore
    from ucp.sources._dcpfiles import is_dcp_dir

    store = make_store(str(path), storage_options)     # its rule for what is local (a file:// URL is)
    if not isinstance(store, LocalStore):
        return
    path = store.root

    if not is_dcp_dir(path):
        return
    if not (Path(path) / MANIFEST).is_file():
        raise UcpError(f"{path} is a stock DCP checkpoint (.metadata + *.distcp), not a universal one: load it "
                       f"with FileSystemReader, or make it universal with `ucp convert {path} DST`")
    raise UcpError(f"{path} holds both a universal checkpoint ({MANIFEST}) and DCP's own files (.metadata + "
                   "*.distcp, which FileSystemWriter leaves beside what it finds): load the DCP files with "
                   "FileSystemReader, or move one of the two out")


def _fill_value(entry, start, stop, target: torch.Tensor) -> None:
    """A region of a value kept in the metadata (a small tensor, or a scalar as a 0-d one)."""
    src = entry[1] if entry[0] == "value" else torch.tensor(entry[1], dtype=entry[2])
    target.copy_(src[tuple(slice(a, b) for a, b in zip(start, stop))] if src.dim() else src)


def _describe_param(ck, name: str, tensor) -> None:
    """Declare ``model.<name>``, its optimizer states and its scalars through ``tensor(key,
    shape, dtype, entry)``. A tied alias stored without arrays reads its ``tied_to``'s."""
    meta = ck.param_meta(name)
    states = ck.states(name)
    holder = param_holder(ck, name)
    info = ck.array_info(holder, "param")
    tensor(model_key(name), info.shape, info.dtype, ("array", holder, "param"))
    for st in states:
        if st != "param":
            info = ck.array_info(name, st)
            tensor(optim_key(name, st), info.shape, info.dtype, ("array", name, st))
    dtypes = meta.get("scalar_dtypes") or {}
    for st, v in (meta.get("scalars") or {}).items():
        dt = scalar_dtype(v, dtypes.get(st), f"{ck.path}: scalar_dtypes[{st!r}] of {name!r}")
        tensor(optim_key(name, st), (), dt, ("scalar", v, dt))
