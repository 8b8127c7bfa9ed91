"""``UniversalWriter``: ``dcp.save`` / ``dcp.async_save`` straight into the universal form, each
rank writing its own boxes and part record, the coordinator committing the manifest (the
several-writers protocol of FORMAT.md §13; see the package docstring)."""
from __future__ import annotations

import dataclasses
import os
import uuid
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.futures import Future
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult

from ucp.dcp.keys import canonical_key, canonical_paths, is_array, key_form, parse_in_form, parse_key, saved_ndim
from ucp.dcp.metadata import (check_states_held, non_tensor_metadata, param_flags, param_group_of, regroup,
                              tied_aliases)
from ucp.dcp.saveplan import chunk_grids, doc_writers, saved_arrays, writes_nothing
from ucp.dcp.threads import rank_threads
from ucp.errors import UcpError, value_globals, unpickling_refusal
# imported with this module, not on the first dcp.save: see ucp.dcp.reader
from ucp.format import commit_parts, create_checkpoint, jsonmeta
from ucp.format.dtypes import dtype_name, scalar_dtype_name
from ucp.format.parts import part_rel
from ucp.format.store import MANIFEST, make_store
from ucp.format.writer import clear_to_overwrite


_SUMMARY = "__ucp_rank_summary__"     # the extra WriteResult each rank sends to the coordinator


@dataclass
class _RankSummary:
    """What a rank tells the coordinator besides its written boxes (sent as one extra
    ``WriteResult``): scalars, non-tensor values, tensors outside model/optim, ties, keys."""
    rank: int
    scalars: dict = dataclasses.field(default_factory=dict)      # name -> {state: value}
    scalar_dtypes: dict = dataclasses.field(default_factory=dict)
    groups: dict = dataclasses.field(default_factory=dict)       # (i, key) -> value
    extras: dict = dataclasses.field(default_factory=dict)       # key -> value | [(offsets, tensor)]
    ties: dict = dataclasses.field(default_factory=dict)         # alias -> target
    shapes: dict = dataclasses.field(default_factory=dict)       # model name -> (shape, dtype name)
    keys: set = dataclasses.field(default_factory=set)           # every flattened key on this rank
    listed: dict = dataclasses.field(default_factory=dict)       # FQN -> its param group (None: flattened)
    params: list = dataclasses.field(default_factory=list)       # model order on this rank
    records: Optional[list] = None                               # the committed part (PartWriter.records)


class UniversalWriter(StorageWriter):
    """``dcp.save`` / ``dcp.async_save`` straight into a universal checkpoint.

    Each rank writes the boxes DCP assigns it (its DTensor shards; replicated tensors once),
    the coordinator commits the manifest after every rank succeeded. Destination must be empty
    or absent unless ``overwrite=True`` (the coordinator clears it before any rank writes).

    Args:
        path: destination (local path or fsspec URL); or ``checkpoint_id=`` of ``dcp.save``.
        overwrite: replace an existing checkpoint / non-empty directory.
        durable: fsync chunk files, part records and manifest (FORMAT.md §2).
        workers: writer threads per rank (default: :func:`rank_threads`).
        storage_options: fsspec options for remote paths.
        chunk_bytes: plain chunks of about this size instead of the default layout (one shard
            per saved box, inner chunks in column blocks: see ``chunk_grids``). Smaller chunks
            make later partial reads finer-grained along rows too, at the cost of more files and
            of staging the chunks two ranks share.
    """

    def __init__(self, path=None, *, overwrite: bool = False, durable: bool = True, workers: Optional[int] = None,
                 storage_options=None, chunk_bytes: Optional[int] = None):
        super().__init__()
        self.path = path
        self.chunk_bytes = chunk_bytes
        self.overwrite = overwrite
        self.durable = durable
        self.workers = workers
        self.storage_options = storage_options
        self.is_coordinator = False
        self.rank = 0
        self.save_id = str(uuid.uuid4())
        self._part = None         # the coordinator's own part writer, committed in finish()
        self._world = 1
        self._form = "get_state_dict"     # the saved keys' form (key_form), found by the coordinator

    def reset(self, checkpoint_id=None) -> None:
        if checkpoint_id is not None:
            self.path = checkpoint_id
        self.save_id = str(uuid.uuid4())
        self._drop_part()

    def _drop_part(self) -> None:
        """Abort the coordinator's part writer of an earlier save that failed on another rank
        (DCP never called ``finish``): its files stay ignorable, no manifest was written."""
        if self._part is not None:
            self._part.abort()
            self._part = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))

    @property
    def threads(self) -> int:
        """Writer threads per rank: ``workers``, or :func:`rank_threads` when not given."""
        return self.workers or rank_threads(self.path, self.storage_options)

    def storage_meta(self) -> Optional[StorageMeta]:
        return StorageMeta(checkpoint_id=str(self.path), save_id=self.save_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args, **kwargs) -> None:
        self._drop_part()
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank", 0) or 0)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Coordinator: clear the destination if asked, pick every array's chunk grid from all
        ranks' boxes, and tell each rank its part number and the grids."""
        if self.path is None:
            raise UcpError("UniversalWriter: no path (pass it, or checkpoint_id= to dcp.save)")
        self._form = key_form({item.index.fqn: saved_ndim(item.tensor_data) for p in plans for item in p.items},
                              {k: v for p in plans if isinstance(p.planner_data, dict) for k, v in p.planner_data.items()})
        keys = [parse_in_form(item.index.fqn, self._form) for p in plans for item in p.items]
        check_states_held(self.path, [k.name for k in keys if k.kind == "state"],
                          [k.name for k in keys if k.kind == "param"])
        _prepare_destination(self.path, self.overwrite, self.storage_options)
        arrays = saved_arrays(plans, self._form)
        grids = chunk_grids(arrays, self.chunk_bytes)
        docs = doc_writers(arrays, len(plans))
        return [dataclasses.replace(p, storage_data={"part": i, "world": len(plans), "grids": grids, "docs": docs,
                                                     "keys": self._form})
                for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner) -> Future:
        """Write this rank's boxes and part record (the coordinator's part waits for ``finish``)."""
        info = plan.storage_data
        self._world, form = info["world"], info["keys"]
        # durable: one syncfs before the part record (format's rank protocol), no fsync per chunk
        writer = create_checkpoint(self.path, rank=info["part"], world_size=info["world"],
                                   durable=self.durable, workers=self.threads, fsync_each=False,
                                   storage_options=self.storage_options)
        try:
            summary = _RankSummary(info["part"])
            _summarize_state_dict(getattr(planner, "state_dict", None) or {}, summary, form)
            aliases = tied_aliases(summary.params, summary.keys, summary.ties, summary.listed)
            arrays, results = [], []
            for item in plan.items:
                k = parse_in_form(item.index.fqn, form)
                if k.kind == "param" and k.name in aliases:     # stored once, as its tied_to
                    results.append(WriteResult(item.index, 0, None))
                    continue
                data = planner.resolve_data(item)
                if item.type != WriteItemType.BYTE_IO and is_array(k, item.tensor_data.size):
                    arrays.append((item, data))
                else:
                    results.append(_record_item(item, data, summary, form))
            results += _write_arrays(writer, arrays, info["grids"], self.threads, info.get("docs"), form)
            for name in summary.params:
                writer.add_param(name)
            if self.is_coordinator:
                writer.sync_data()       # now, in parallel with the other ranks' syncs, not in finish
                self._part = writer
            else:
                writer.commit()
                summary.records = writer.records
            results.append(WriteResult(MetadataIndex(_SUMMARY), 0, summary))
        except BaseException:
            writer.abort()
            raise
        fut = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Coordinator, after every rank succeeded: per-parameter metadata (scalars, frozen,
        tied) into its own part, then ``commit_parts`` writes the manifest."""
        writer, self._part = self._part, None
        if writer is None:
            raise UcpError(f"{self.path}: finish() on a rank that wrote no part (not the coordinator?)")
        try:
            summaries = [r.storage_data for rs in results for r in rs if r.index.fqn == _SUMMARY]
            _check_parts_here(self.path, self.storage_options, [s.rank for s in summaries if s.records is not None])
            order, meta, universal_md = _merge_summaries(summaries, metadata.planner_data, self._form)
            for name in order:
                writer.add_param(name, meta.get(name) or None)
            # commit_parts syncs everything before the manifest; our records go to it in memory
            writer.commit(sync=False, record_file=False)
        except BaseException:
            writer.abort()
            raise
        parts = {s.rank: s.records for s in summaries if s.records is not None}
        parts[writer.rank] = writer.records
        commit_parts(self.path, self._world, metadata=universal_md, storage_options=self.storage_options,
                     durable=self.durable, workers=self.threads, param_order=order, parts=parts)


def _check_parts_here(path, storage_options, ranks) -> None:
    """Every other rank's part record must be in the coordinator's checkpoint. The coordinator
    commits the manifest from the records DCP hands it in memory, so a rank that was given another
    path (a per-rank directory, a node-local mount) would otherwise leave a committed manifest
    listing files that are not there."""
    store = make_store(path, storage_options)
    away = [r for r in sorted(ranks) if not store.exists(part_rel(r))]
    if away:
        raise UcpError(f"{path}: the parts of rank(s) {', '.join(map(str, away[:8]))} were written elsewhere: "
                       "every rank must pass the same path (one shared checkpoint) to UniversalWriter; "
                       "nothing was committed")


def _prepare_destination(path, overwrite: bool, storage_options) -> None:
    store = make_store(path, storage_options)
    if store.is_empty():
        return
    if not overwrite:
        what = ("is a committed ucp checkpoint" if store.exists(MANIFEST) else
                "holds an unfinished ucp save (nothing committed)" if store.top_level().get("_ucp") else
                "is not empty")
        raise UcpError(f"{path} {what}; pass UniversalWriter(path, overwrite=True) to replace it")
    clear_to_overwrite(store, path)


def _write_arrays(writer, items, grids, workers: int, docs: Optional[dict] = None,
                  form: str = "get_state_dict") -> list[WriteResult]:
    """Write the array boxes of this rank, several at once (chunk files are independent: their
    writes and fsyncs overlap). Arrays are declared first, in plan order. ``docs``: the part that
    writes each array's ``zarr.json`` (:func:`doc_writers`; None: the format's default rule)."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = []
    for item, data in items:
        k, td = parse_in_form(item.index.fqn, form), item.tensor_data
        if writes_nothing(td):
            jobs.append(None)
            continue
        chunks, shards = grids.get((k.name, k.state), (None, None))
        arr = writer.add_array(k.name, k.state, tuple(td.size), td.properties.dtype, chunks=chunks, shards=shards)
        mine = None if docs is None else docs.get((k.name, k.state)) == writer.rank
        jobs.append((arr, tuple(int(o) for o in td.chunk.offsets), data, mine))

    def write(job):
        if job is None:
            return 0
        arr, offsets, data, mine = job
        t = data.detach()
        t = (t.cpu() if t.device.type != "cpu" else t).contiguous()
        arr.write(offsets, t)
        writer.write_doc(arr, mine)     # on this thread, before the data sync, not in the serial commit
        return t.numel() * t.element_size()

    # each rank starts at another array: under FSDP every rank writes a box of every array, and
    # ranks making the same directories at the same moment wait for each other (a mkdir, even of
    # a directory that exists, locks the parent); staggered, each array's are made by one rank
    shift = len(jobs) * writer.rank // writer.world_size
    order = jobs[shift:] + jobs[:shift]
    if workers > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(workers, thread_name_prefix="ucp-dcp-write") as pool:
            sizes = list(pool.map(write, order))
    else:
        sizes = [write(j) for j in order]
    sizes = sizes[len(jobs) - shift:] + sizes[:len(jobs) - shift]
    return [WriteResult(item.index, n, None) for (item, _), n in zip(items, sizes)]


def _record_item(item, data, summary: _RankSummary, form: str = "get_state_dict") -> WriteResult:
    """A non-array item goes to the coordinator through ``summary``: a param-group value, a
    0-d optimizer state (scalar), or another entry (a value, or a piece of a tensor), under its
    ``get_state_dict`` key."""
    key = canonical_key(item.index.fqn, form)
    k = parse_key(key)
    if item.type == WriteItemType.BYTE_IO:
        value = _load_value(item.index.fqn, data)
        if k.kind == "group":
            summary.groups[(k.group, k.state)] = value
        else:
            summary.extras[key] = value
        return WriteResult(item.index, data.getbuffer().nbytes, None)
    t = data.detach().cpu()
    if k.kind == "state":
        summary.scalars.setdefault(k.name, {})[k.state] = t.item()   # a JSON number; ints stay ints
        summary.scalar_dtypes.setdefault(k.name, {})[k.state] = scalar_dtype_name(t.dtype)
    else:
        summary.extras.setdefault(key, _Pieces()).append(
            (tuple(item.tensor_data.chunk.offsets), tuple(item.tensor_data.size), t.clone()))
    return WriteResult(item.index, t.numel() * t.element_size(), None)


def _load_value(fqn: str, buf) -> Any:
    """A non-tensor value DCP serialised with ``torch.save``, loaded back weights-only: ucp
    stores JSON, never pickles, and refuses what it cannot store faithfully."""
    buf.seek(0)
    try:
        with torch.serialization.safe_globals(value_globals()):
            value = torch.load(buf, weights_only=True)
        jsonmeta.encode(value, lambda t: "", f"state-dict entry {fqn!r}")   # fail here, on this rank
        return value
    except Exception as e:
        raise UcpError(f"state-dict entry {fqn!r}: ucp stores non-tensor values as JSON and cannot "
                       f"store this one ({unpickling_refusal(e)})") from None


def _summarize_state_dict(state_dict: dict, summary: _RankSummary, form: str = "get_state_dict") -> None:
    """Keys (``get_state_dict``'s), model order and tied model tensors (same storage, shape and
    strides) of this rank's flattened state dict (DefaultSavePlanner's ``state_dict``)."""
    seen: dict[tuple, str] = {}
    for fqn, v in state_dict.items():
        fqn = canonical_key(fqn, form)
        summary.keys.add(fqn)
        k = parse_key(fqn)
        if k.kind == "group":
            summary.listed.update(param_group_of({(k.group, k.state): v}))
        elif k.kind == "hyper":   # flattened groups: listed, in a group numbered at the merge
            summary.listed.setdefault(k.name, None)
        if k.kind != "param" or not isinstance(v, torch.Tensor):
            continue
        summary.params.append(k.name)
        summary.shapes[k.name] = (list(v.shape), dtype_name(v.dtype))
        local = v.to_local() if hasattr(v, "to_local") else v
        if local.numel() == 0:
            continue
        ident = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape),
                 tuple(local.stride()), tuple(v.shape))
        if ident in seen:
            summary.ties[k.name] = seen[ident]
        else:
            seen[ident] = k.name


def _merge_summaries(summaries: list[_RankSummary], planner_data=None,
                     form: str = "get_state_dict") -> tuple[list, dict, dict]:
    """Model order, per-parameter metadata and the checkpoint's non-tensor metadata from
    every rank's summary (``planner_data``: DCP's, the nested paths of the saved keys, in
    ``form``)."""
    order: list[str] = []
    keys: set[str] = set()
    meta: dict[str, dict] = {}
    groups: dict[tuple, Any] = {}
    extras: dict[str, Any] = {}
    ties: dict[str, str] = {}
    shapes: dict[str, tuple] = {}
    for s in sorted(summaries, key=lambda s: s.rank):
        order += [n for n in s.params if n not in meta]
        for n in s.params:
            meta.setdefault(n, {})
        keys |= s.keys
        for n, sc in s.scalars.items():
            meta.setdefault(n, {}).setdefault("scalars", {}).update(sc)
            meta[n].setdefault("scalar_dtypes", {}).update(s.scalar_dtypes.get(n, {}))
        groups.update(s.groups)
        ties.update(s.ties)
        shapes.update(s.shapes)
        for key, v in s.extras.items():
            if isinstance(v, _Pieces) and key in extras:
                extras[key] = _Pieces(extras[key] + v)
            else:
                extras.setdefault(key, v)
    groups, extras, flattened = regroup(groups, {k: _assemble_extra(v) for k, v in extras.items()}, order)
    for n, flags in param_flags(order, keys, ties, param_group_of(groups)).items():
        meta.setdefault(n, {}).update(flags)
        if "tied_to" in flags and n in shapes:     # an alias has no array to take them from
            meta[n].update(shape=shapes[n][0], dtype=shapes[n][1])
    return order, meta, non_tensor_metadata(groups, extras, canonical_paths(planner_data, form), flattened, form)


class _Pieces(list):
    """``(offsets, global size, tensor)`` pieces of a tensor outside model/optim."""


def _assemble_extra(v):
    """A value, or a tensor outside model/optim from its saved pieces."""
    if not isinstance(v, _Pieces):
        return v
    _, size, t0 = v[0]
    out = torch.empty(size, dtype=t0.dtype)
    for offsets, _, t in v:
        out[tuple(slice(o, o + n) for o, n in zip(offsets, t.shape))] = t
    return out
