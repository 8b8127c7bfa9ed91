"""torch.distributed.checkpoint (DCP) storage over the universal format.

``UniversalReader`` and ``UniversalWriter`` plug the universal format into DCP's own
``dcp.load`` / ``dcp.save`` / ``dcp.async_save``, so a training job reads and writes universal
checkpoints with no conversion step, in whatever DTensor layout it runs::

    sd = {"model": msd, "optim": osd}               # get_state_dict(model, optimizer)
    dcp.save(sd, storage_writer=UniversalWriter(path))
    dcp.load(sd, storage_reader=UniversalReader(path))   # ANY layout, ANY world size
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])

**Keys** (:func:`parse_key` / :func:`model_key` / :func:`optim_key`, the one mapping used by
the reader, the writer, the DCP source and the DCP target). With ``get_state_dict``'s layout:

* ``model.<fqn>`` — state ``param`` of parameter ``<fqn>`` (buffers included: every key of the
  model's state dict is a parameter of the universal checkpoint);
* ``optim.state.<fqn>.<state>`` — state ``<state>`` of ``<fqn>``; 0-d states (Adam ``step``)
  are per-parameter ``scalars`` in the parameter's metadata, their dtypes in ``scalar_dtypes``;
* ``optim.param_groups.<i>.<key>`` — ``metadata["optimizer"]["param_groups"][i][key]``;
* ``optim.param_groups.<fqn>.<key>`` (``flatten_optimizer_state_dict=True``, which pipeline stages
  need: each stage's groups are numbered from 0) — the same groups, rebuilt from the
  parameters' values (:func:`regroup`), with ``metadata["optimizer"]["flattened"]`` so that
  reads and exports give back that form;
* anything else — ``metadata["dcp"][<key>]`` (values JSON-encoded, tensors as small arrays).

torchtitan's form (the model's keys at the top level, the optimizer under ``optimizer.``; also a
plain ``dcp.save(model.state_dict())``) is read into these keys at the edges
(:func:`key_form`, :func:`canonical_key`) and written back from them (:func:`form_key`).

A model tensor that is the same storage as another (tied embeddings) is stored once: the alias
is a parameter with no arrays, ``tied_to`` the one the optimizer steps (and that one's shape
and dtype), and the reader serves both keys from the one stored array. A model tensor that the
optimizer neither lists in a group nor keeps state for gets ``frozen: true``
(:func:`param_flags`).

**Reading only what is needed.** The reader describes every universal array to DCP as ONE
saved chunk covering the whole tensor; DCP's planner then asks, for each chunk of each rank's
DTensor, for exactly the region it needs (``storage_offsets`` / ``lengths``), and
:meth:`UniversalReader.read_data` hands all of a rank's regions to ``Checkpoint.read_boxes`` at
once: it touches only the zarr chunks (inner chunks of shards) they intersect, reads them on one
pool of :func:`rank_threads` threads and copies them straight into the DTensors' local shards.
DCP's ``FileSystemReader`` instead loads each whole saved chunk and narrows it (pytorch issue
76331).

**Writing from every rank.** The writer uses the several-writers protocol (FORMAT.md §13):
the coordinator picks each array's chunk grid in ``prepare_global_plan`` (aligned with every
rank's boxes where possible, so no chunk is shared), each rank writes its boxes and its part
record in ``write_data``, and the coordinator commits its own part and then the manifest in
``finish`` — which DCP calls only when every rank's ``write_data`` succeeded. A failure
anywhere (DCP's ``CheckpointException`` derives from ``BaseException``) leaves no manifest.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch.futures import Future
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, StorageMeta, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, SavePlan, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult

from ucp.errors import UcpError, numpy_value_globals, unpickling_refusal
# imported with this module, not on the first dcp.save / dcp.load: the format's modules take
# about 0.1-0.3 s to import (more where bytecode is not cached), which a save or load that
# imported them itself paid inside its own time, once per process
from ucp.format import (aligned_chunks, commit_parts, create_checkpoint, default_chunks, jsonmeta, layout,
                        open_checkpoint)
from ucp.format.parts import part_rel
from ucp.format.staging import read_regions
from ucp.format.store import MANIFEST, make_store
from ucp.format.writer import clear_to_overwrite

MODEL = "model."
OPTIM_STATE = "optim.state."
PARAM_GROUPS = "optim.param_groups."
_SUMMARY = "__ucp_rank_summary__"     # the extra WriteResult each rank sends to the coordinator


# ==================================================================== keys
@dataclass(frozen=True)
class DcpKey:
    """What a flattened DCP state-dict key means in the universal checkpoint.

    ``kind``: ``"param"`` (``name``, state ``param``), ``"state"`` (``name``, ``state``),
    ``"group"`` (``group`` index, ``state`` = the hyper-parameter), ``"hyper"`` (a
    hyper-parameter ``state`` of parameter ``name``: flattened groups; an extra where ``name`` is
    no model tensor) or ``"extra"``."""
    kind: str
    name: str = ""
    state: str = ""
    group: int = -1


def parse_key(fqn: str) -> DcpKey:
    """The meaning of the flattened DCP key ``fqn`` (see the module docstring)."""
    if fqn.startswith(MODEL) and len(fqn) > len(MODEL):
        return DcpKey("param", fqn[len(MODEL):], "param")
    if fqn.startswith(OPTIM_STATE):
        name, _, state = fqn[len(OPTIM_STATE):].rpartition(".")
        if name and state:
            return DcpKey("state", name, state)
    if fqn.startswith(PARAM_GROUPS):
        rest = fqn[len(PARAM_GROUPS):]
        idx, _, key = rest.partition(".")
        if idx.isdigit() and key and "." not in key:  # not "0.weight.lr": lr of parameter "0.weight"
            return DcpKey("group", state=key, group=int(idx))
        name, _, key = rest.rpartition(".")
        if name and key:
            return DcpKey("hyper", name, key)
    return DcpKey("extra", fqn)


#: How a DCP state dict lays out its keys: where the model's section and the optimizer's are.
#: ``get_state_dict``: ``{"model": ..., "optim": ...}`` (the keys above). ``torchtitan``: the
#: model's keys at the top level and the optimizer's state dict under ``optimizer`` (flattened
#: there by torchtitan), beside torchtitan's other states (:data:`TITAN_STATES`); a plain
#: ``dcp.save(model.state_dict())`` has this form too. ``model_optimizer``: ``{"model": ...,
#: "optimizer": ...}``. Any of them may sit under one top-level key, as the DCP tutorial's
#: ``{"app": AppState(model, optimizer)}`` puts them: the form is then spelt ``<form>@<key>``
#: (``get_state_dict@app``: keys ``app.model.<fqn>``, ``app.optim.state...``); entries beside
#: the sections keep their keys as saved. Inside ucp every key is in the ``get_state_dict`` form
#: (:func:`canonical_key`); a checkpoint of another records it (``metadata["dcp_keys"]``) and is
#: read and exported in it (:func:`form_key`).
KEY_FORMS = ("get_state_dict", "torchtitan", "model_optimizer")
#: the sections' prefixes of each form: (model, optimizer)
_SECTIONS = {"get_state_dict": (MODEL, "optim."), "torchtitan": ("", "optimizer."),
             "model_optimizer": (MODEL, "optimizer.")}
TITAN_OPTIM = "optimizer."
#: the other states torchtitan's CheckpointManager saves beside the model and the optimizer
TITAN_STATES = ("lr_scheduler.", "dataloader.", "train_state.")


def form_parts(form: str) -> tuple[str, str, tuple]:
    """(model section prefix, optimizer section prefix, wrapper path) of ``form``: the wrapper is
    the nested path the sections sit under, written after ``@`` with ``/`` between its levels
    (``get_state_dict@app``, ``get_state_dict@run/app``), ``()`` for none."""
    name, _, wrapper = form.partition("@")
    model, optim = _SECTIONS[name]
    return model, optim, tuple(wrapper.split("/")) if wrapper else ()


def _dotted(path: tuple) -> str:
    """The flattened-key prefix of a wrapper path (``("run", "app")`` -> ``"run.app."``)."""
    return "".join(f"{p}." for p in path)


def key_form(keys: dict, paths: Optional[dict] = None) -> str:
    """The form of a state dict's keys (``{key: number of dims, None for a value}``): an ``optim``
    section says ``get_state_dict``; an optimizer under ``optimizer`` says ``model_optimizer``
    beside a ``model`` section, else ``torchtitan``. Without an optimizer, a ``model`` section says
    ``get_state_dict`` and tensors at the top level say ``torchtitan``. ``paths`` (DCP's
    ``planner_data``: key -> nested path) tell a section (``("model", fqn)``, ``("optim", ...)``)
    from a top-level key that merely starts with its name (a Hugging Face model's own ``model.*``
    beside its ``lm_head.weight``, a submodule called ``optim``), and find sections nested under
    other keys (``("app", "model", fqn)``: ``get_state_dict@app``, :func:`_wrapper`); without
    them, keys starting with ``optim.`` are an optimizer section and tensors all under ``model.``
    say ``get_state_dict``."""
    wrapper = _wrapper(keys, paths)
    if wrapper:
        dotted, depth = _dotted(wrapper), len(wrapper)
        inner = {k[len(dotted):]: nd for k, nd in keys.items() if k.startswith(dotted)}
        inner_paths = {k[len(dotted):]: tuple(v)[depth:] for k, v in paths.items() if k.startswith(dotted)}
        return f"{key_form(inner, inner_paths)}@{'/'.join(wrapper)}"
    known = isinstance(paths, dict)

    def section(k, name):
        if not k.startswith(name + "."):
            return False
        if not known or k not in paths:
            return True
        return len(paths[k]) > 1 and paths[k][0] == name

    arrays = [k for k, nd in keys.items() if nd]
    if known and all(k in paths for k in arrays):
        model = any(section(k, "model") for k in arrays)
    else:
        model = bool(arrays) and all(k.startswith(MODEL) for k in arrays)
    if any(section(k, "optim") for k in keys):
        return "get_state_dict"
    if any(section(k, "optimizer") and k.startswith((TITAN_OPTIM + "state.", TITAN_OPTIM + "param_groups."))
           for k in keys):
        return "model_optimizer" if model else "torchtitan"
    if not arrays:
        return "get_state_dict"
    return "get_state_dict" if model else "torchtitan"


_SECTION_NAMES = ("model", "optim", "optimizer")


def _wrapper(keys, paths) -> tuple:
    """The nested path the model and optimizer sections sit under (``("app",)`` of the DCP
    tutorial's ``{"app": AppState(...)}``), or ``()``: known from the saved paths only, and only
    where no section is at the top level. Sections under several paths (an EMA model's
    ``{"ema": {"model": ...}}`` beside the app) are told apart by the optimizer: the wrapper is the
    one path with a model section and an optimizer section, the others are entries beside it; where
    that leaves more than one (or none of several), which model to keep is not ucp's to guess."""
    if not isinstance(paths, dict):
        return ()
    found: dict[tuple, set] = {}
    for k in keys:
        path = paths.get(k)
        if path is None or len(path) < 2:
            continue
        path = tuple(str(x) for x in path)
        for i, name in enumerate(path[:-1]):
            if name in _SECTION_NAMES and k.startswith(_dotted(path[:i + 1])):
                if i == 0:
                    return ()
                if name != "model" or keys[k] is not None:    # a model section holds tensors
                    found.setdefault(path[:i], set()).add(name)
                break
    models = [w for w, names in found.items() if "model" in names]
    with_optim = [w for w in models if found[w] & {"optim", "optimizer"}]
    pick = with_optim if with_optim else models
    if len(pick) == 1 and not any("/" in x or "@" in x for x in pick[0]):
        return pick[0]
    if not pick:
        return ()
    raise UcpError(f"model sections under several keys ({', '.join('/'.join(w) for w in pick)}): ucp keeps one model and "
                   "its optimizer; save the others apart, or give the model with the optimizer its own key")


def check_form(form: str, what: str) -> str:
    """``form`` where it names one of :data:`KEY_FORMS`, optionally under a wrapper path
    (``<form>@<key>[/<key>...]``); a typo would otherwise serve keys no job asks for."""
    name, at, wrapper = form.partition("@")
    if name not in KEY_FORMS or (at and (not wrapper or "@" in wrapper or "" in wrapper.split("/"))):
        raise UcpError(f"{what}={form!r}: the key forms are {', '.join(map(repr, KEY_FORMS))}, each optionally "
                       "under the keys of a wrapper as <form>@<key>[/<key>...]")
    return form


def canonical_key(fqn: str, form: str) -> str:
    """``fqn`` of a state dict in ``form`` as the ``get_state_dict`` form spells it. Entries outside
    the model and optimizer sections keep their keys."""
    model, optim, wrapper = form_parts(form)
    if wrapper:
        dotted = _dotted(wrapper)
        if not fqn.startswith(dotted):
            return fqn
        inner = canonical_key(fqn[len(dotted):], form.partition("@")[0])
        return inner if inner.startswith((MODEL, "optim.")) else fqn
    if fqn.startswith(optim):
        return "optim." + fqn[len(optim):]
    if model:
        return fqn
    return fqn if fqn.startswith(TITAN_STATES) else MODEL + fqn


def form_key(key: str, form: str) -> str:
    """A ``get_state_dict`` key as ``form`` spells it (:func:`canonical_key` undone)."""
    model, optim, wrapper = form_parts(form)
    if key.startswith(MODEL):
        return _dotted(wrapper) + model + key[len(MODEL):]
    if key.startswith("optim."):
        return _dotted(wrapper) + optim + key[len("optim."):]
    return key


def model_key(name: str) -> str:
    return MODEL + name


def optim_key(name: str, state: str) -> str:
    return f"{OPTIM_STATE}{name}.{state}" if state != "param" else model_key(name)


def planner_path(fqn: str, paths: Optional[dict] = None, flattened: bool = False,
                 form: str = "get_state_dict") -> tuple:
    """The nested-dict path of a flattened key (DCP's ``planner_data``), so that tools that
    rebuild nested state dicts (``format_utils.dcp_to_torch_save``) work on universal ones.
    ``fqn``: a ``get_state_dict`` key, its path given as ``form`` nests it. ``paths``: the saved
    paths of entries outside model/optim that the dotted key alone does not give
    (``metadata["dcp_paths"]``, :func:`extra_paths`). ``flattened``: the optimizer state dict was
    saved flattened, one level of dotted keys (``state.<fqn>.<state>``)."""
    k = parse_key(fqn)
    model, optim, top = form_parts(form)
    sec = top + (optim[:-1],)
    if k.kind == "param":
        return top + ((model[:-1], k.name) if model else (k.name,))
    if k.kind == "hyper" or (k.kind in ("state", "group") and flattened):
        return sec + (fqn[len("optim."):],)
    if k.kind == "state":
        return sec + ("state", k.name, k.state)
    if k.kind == "group":
        return sec + ("param_groups", k.group, k.state)
    saved = (paths or {}).get(fqn)
    return tuple(saved) if saved else tuple(form_key(fqn, form).split("."))


def extra_paths(keys, planner_data) -> dict:
    """``{key: path}`` of the entries outside model/optim whose nested path (DCP's
    ``planner_data``) is not their key split at the dots: a list index (an int step), a dict key
    holding a dot. Kept as ``metadata["dcp_paths"]``, so that :func:`planner_path` rebuilds them as
    saved (lists stay lists)."""
    out = {}
    for fqn in keys:
        path = (planner_data or {}).get(fqn) if isinstance(planner_data, dict) else None
        if path is not None and parse_key(fqn).kind == "extra" and list(path) != fqn.split("."):
            out[fqn] = list(path)
    return out


def scalar_value(t: torch.Tensor):
    """A 0-d tensor as a JSON number (ints stay ints)."""
    return t.item()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def scalar_dtype(value, name: Optional[str] = None) -> torch.dtype:
    """The dtype of a per-parameter scalar (``scalars``, FORMAT.md §6.1) as the 0-d tensor torch's
    optimizers keep it: its ``scalar_dtypes`` entry ``name``, else float32 for a float and int64
    for an int (a scalar recorded without its dtype). One rule for the reader and the exports."""
    if name is None:
        return torch.float32 if isinstance(value, float) else torch.int64
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise UcpError(f"unknown torch dtype {name!r} in scalar_dtypes")
    return dt


# ==================================================================== reader
def _whole(shape, dtype) -> TensorStorageMetadata:
    shape = torch.Size(shape)
    return TensorStorageMetadata(TensorProperties(dtype=dtype), shape,
                                 [ChunkStorageMetadata(torch.Size([0] * len(shape)), shape)])


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


#: threads per rank of a UniversalReader or UniversalWriter at most (and on object stores)
MAX_RANK_THREADS = 4


def rank_threads(path, storage_options=None) -> int:
    """Reader or writer threads per rank when not given. Object stores: :data:`MAX_RANK_THREADS`
    (their requests wait on the network). Local files: the cores this process may run on shared
    among the ranks of this node (``LOCAL_WORLD_SIZE``, set by torchrun), at least 1: a warm read
    or a write into the page cache is memory copies and crc32c, and threads beyond the cores only
    queue for them and for the GIL (4 ranks of 4 threads on 2 cores, each thread handing the GIL
    back and forth around every read or write)."""
    if make_store(str(path), storage_options).parallel_reads:
        return MAX_RANK_THREADS
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, min(MAX_RANK_THREADS, cores // local))


def _fill_value(entry, start, stop, target: torch.Tensor) -> None:
    """A region of a value kept in the metadata (a small tensor, or a scalar as a 0-d one)."""
    src = entry[1] if entry[0] == "value" else torch.tensor(entry[1], dtype=entry[2])
    target.copy_(src[tuple(slice(a, b) for a, b in zip(start, stop))] if src.dim() else src)


def listed_param_groups(ck, md: dict) -> list:
    """The optimizer's param groups as ``get_state_dict`` lays them out. A checkpoint converted
    from a framework whose groups do not list their parameters (DeepSpeed) records each one's
    group as ``optimizer_group``: ``params`` is then rebuilt from it, in model order."""
    groups = [dict(g) for g in (md.get("optimizer") or {}).get("param_groups") or []]
    if not groups or all("params" in g for g in groups):
        return groups
    member = {n: ck.param_meta(n).get("optimizer_group") for n in ck.params}
    for i, g in enumerate(groups):
        g.setdefault("params", [n for n in ck.params if member[n] == i])
    return groups


def _describe_param(ck, name: str, tensor) -> None:
    """Declare ``model.<name>``, its optimizer states and its scalars through ``tensor(key,
    shape, dtype, entry)``. A tied alias stored without arrays reads its ``tied_to``'s."""
    meta = ck.param_meta(name)
    states = ck.states(name)
    holder = name if "param" in states else meta.get("tied_to")
    if holder is None or "param" not in ck.states(holder):
        raise UcpError(f"{ck.path}: parameter {name!r} has no 'param' array (and no tied_to that has one)")
    info = ck.array_info(holder, "param")
    tensor(model_key(name), info.shape, info.dtype, ("array", holder, "param"))
    for st in states:
        if st != "param":
            info = ck.array_info(name, st)
            tensor(optim_key(name, st), info.shape, info.dtype, ("array", name, st))
    dtypes = meta.get("scalar_dtypes") or {}
    for st, v in (meta.get("scalars") or {}).items():
        dt = scalar_dtype(v, dtypes.get(st))
        tensor(optim_key(name, st), (), dt, ("scalar", v, dt))


# ==================================================================== writer
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
            per saved box, inner chunks in column blocks: see ``_chunk_grids``). Smaller chunks
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
        keys = [_parse(item.index.fqn, self._form) for p in plans for item in p.items]
        check_states_held(self.path, [k.name for k in keys if k.kind == "state"],
                          [k.name for k in keys if k.kind == "param"])
        _prepare_destination(self.path, self.overwrite, self.storage_options)
        arrays = _saved_arrays(plans, self._form)
        grids = _chunk_grids(arrays, self.chunk_bytes)
        docs = _doc_writers(arrays, len(plans))
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
                k = _parse(item.index.fqn, form)
                if k.kind == "param" and k.name in aliases:     # stored once, as its tied_to
                    results.append(WriteResult(item.index, 0, None))
                    continue
                data = planner.resolve_data(item)
                if item.type != WriteItemType.BYTE_IO and _is_array(k, item.tensor_data.size):
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
        what = "a committed ucp checkpoint" if store.exists(MANIFEST) else "not empty"
        raise UcpError(f"{path} is {what}; pass UniversalWriter(path, overwrite=True) to replace it")
    clear_to_overwrite(store, path)


def _saved_arrays(plans: list[SavePlan], form: str = "get_state_dict") -> dict:
    """``(name, state) -> (shape, dtype, [(start, stop)] boxes of all ranks, [the plans (parts)
    that write a box of it]))`` of every array saved."""
    out: dict[tuple, tuple] = {}
    for i, p in enumerate(plans):
        for item in p.items:
            td = item.tensor_data
            k = _parse(item.index.fqn, form)
            if td is None or not _is_array(k, td.size):
                continue
            start = tuple(int(o) for o in td.chunk.offsets)
            box = (start, tuple(a + int(s) for a, s in zip(start, td.chunk.sizes)))
            _, _, boxes, parts = out.setdefault((k.name, k.state), (tuple(td.size), td.properties.dtype, [], []))
            boxes.append(box)
            if not _writes_nothing(td):
                parts.append(i)
    return out


def _doc_writers(arrays: dict, world: int) -> dict:
    """``(name, state) -> the part that writes the array's zarr.json``: one of the parts writing
    a box of it, the fewest documents each (under FSDP every rank writes a box of every array, and
    the rank holding every first chunk, the default writer, would write them all while the others
    wait). An array no part writes a box of is left to the coordinator."""
    load = [0] * world
    out = {}
    # the arrays fewest parts write first, while those parts still have the fewest documents
    for key, (_, _, _, parts) in sorted(arrays.items(), key=lambda kv: len(kv[1][3])):
        if parts:
            out[key] = min(parts, key=lambda r: (load[r], r))
            load[out[key]] += 1
    return out


def _chunk_grids(arrays: dict, chunk_bytes: Optional[int] = None) -> dict:
    """``(name, state) -> (chunks, shards)`` for every array of :func:`_saved_arrays` (``(None,
    None)``: the writer's default layout). By default: shards aligned with every rank's boxes (one
    file per box, no chunk shared by two ranks, nothing staged) whose inner chunks cut the last dim
    in column blocks (:func:`_column_blocks`), so that a load reads only the inner chunks it needs:
    row-wise TP shards (o, down) split that dim, and the rows are already aligned with the
    boxes. Arrays of one dim, or too narrow to cut: plain chunks on the aligned grid.
    With ``chunk_bytes``: plain chunks of about that size,
    the last dim cut in :data:`COLUMN_BLOCKS` where no box splits it (so column-sliced
    reads, row-wise TP shards, read about what they need), and plain chunks of about that
    size when the aligned grid has none within 2x of it (the coordinator then assembles the
    chunks two ranks share: a slower save for finer-grained reads)."""
    memo: dict[tuple, tuple] = {}     # a parameter and its optimizer states share shape and boxes
    out = {}
    for key, (shape, dtype, bx, _) in arrays.items():
        if not shape:
            out[key] = (None, None)
            continue
        sig = (shape, dtype, tuple(sorted(bx)))
        if sig not in memo:
            memo[sig] = _grid(shape, dtype, bx, chunk_bytes)
        out[key] = memo[sig]
    return out


#: column blocks of the last dim of 2-D+ arrays when ``chunk_bytes`` is given
COLUMN_BLOCKS = 4


def _grid(shape, dtype, boxes, chunk_bytes):
    isz = dtype.itemsize
    if not chunk_bytes:
        grid = aligned_chunks(shape, boxes, isz)
        k = _column_blocks(grid, isz) if grid is not None else 1
        return (grid, None) if k == 1 else (tuple(grid[:-1]) + (grid[-1] // k,), grid)
    cols = shape[-1]
    split = len(shape) >= 2 and cols >= COLUMN_BLOCKS * 64 and \
        not any(0 < b[d][-1] < cols for b in boxes for d in (0, 1))
    target = chunk_bytes * (COLUMN_BLOCKS if split else 1)
    grid = aligned_chunks(shape, boxes, isz, target=target, min_bytes=min(64 << 10, chunk_bytes))
    if grid is None or math.prod(grid) * isz > 2 * target:
        grid = default_chunks(shape, isz, target)   # finer reads asked for: staging it is
    if split:
        grid = tuple(grid[:-1]) + (min(grid[-1], -(-cols // COLUMN_BLOCKS)),)
    return grid, None


def _column_blocks(shard, itemsize: int) -> int:
    """How many column blocks the inner chunks of an aligned shard cut its last dim into: the
    format's default split (``layout.DEFAULT_COL_SPLIT``) or the largest fewer that divides the
    shard's last dim into blocks of at least ``layout.MIN_COL_BYTES`` per row; 1 for 1-D."""
    if len(shard) < 2:
        return 1
    for k in range(layout.DEFAULT_COL_SPLIT, 1, -1):
        if shard[-1] % k == 0 and shard[-1] // k * itemsize >= layout.MIN_COL_BYTES:
            return k
    return 1


def _is_array(k: DcpKey, size) -> bool:
    """Model tensors and optimizer states of at least one dimension are arrays; 0-d optimizer
    states are scalars; the rest is metadata."""
    return k.kind == "param" or (k.kind == "state" and len(size) > 0)


def _writes_nothing(td) -> bool:
    """A rank's empty box of a non-empty array: nothing to write, and nothing to declare (the
    ranks holding the rest declare it; an empty shard cannot show a tie, so an alias is never
    declared by this rank alone)."""
    return 0 in td.chunk.sizes and math.prod(td.size) > 0


def _write_arrays(writer, items, grids, workers: int, docs: Optional[dict] = None,
                  form: str = "get_state_dict") -> list[WriteResult]:
    """Write the array boxes of this rank, several at once (chunk files are independent: their
    writes and fsyncs overlap). Arrays are declared first, in plan order. ``docs``: the part that
    writes each array's ``zarr.json`` (:func:`_doc_writers`; None: the format's default rule)."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = []
    for item, data in items:
        k, td = _parse(item.index.fqn, form), item.tensor_data
        if _writes_nothing(td):
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
        summary.scalars.setdefault(k.name, {})[k.state] = scalar_value(t)
        summary.scalar_dtypes.setdefault(k.name, {})[k.state] = _dtype_name(t.dtype)
    else:
        summary.extras.setdefault(key, _Pieces()).append(
            (tuple(item.tensor_data.chunk.offsets), tuple(item.tensor_data.size), t.clone()))
    return WriteResult(item.index, t.numel() * t.element_size(), None)


def _load_value(fqn: str, buf) -> Any:
    """A non-tensor value DCP serialised with ``torch.save``, loaded back weights-only: ucp
    stores JSON, never pickles, and refuses what it cannot store faithfully."""
    buf.seek(0)
    try:
        with torch.serialization.safe_globals(numpy_value_globals()):
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
        summary.shapes[k.name] = (list(v.shape), _dtype_name(v.dtype))
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


def param_flags(names, keys, ties: dict, listed=None) -> dict[str, dict]:
    """``tied_to`` / ``frozen`` / ``optimizer_group`` of model parameters ``names`` from the
    flattened keys of the state dict, the ties found (``alias -> other``, either way round) and
    the group of each FQN its param groups list (``optim.param_groups.<i>.params``,
    :func:`param_group_of`). ``optimizer_group`` is how the universal form records membership
    for every source (DeepSpeed's files do not list a group's parameters; its target builds its
    flat groups from it).

    The optimizer trains what its param groups list, and what it keeps state for. Keeping no
    state says little (SGD without momentum keeps none; Adam none for a parameter that has not
    had a gradient yet), so a model tensor is frozen only when the state dict has an optimizer
    that neither lists it nor keeps state for it, and it is not tied. The tie points to the one
    the optimizer keeps state for, else to the one it lists."""
    listed = listed or {}
    has_optim = any(parse_key(k).kind in ("state", "group", "hyper") for k in keys)
    stepped = stepped_params(keys)
    out: dict[str, dict] = {n: {} for n in names}

    def trained(n):
        return n in stepped, n in listed

    for alias, target in ties.items():
        if trained(alias) > trained(target):
            alias, target = target, alias
        out.setdefault(alias, {})["tied_to"] = target
    for n in names:
        if has_optim and not any(trained(n)) and "tied_to" not in out[n]:
            out[n]["frozen"] = True
        if listed.get(n) is not None:
            out[n]["optimizer_group"] = listed[n]
    return out


def stepped_params(keys) -> set:
    """The model tensors the optimizer keeps state for (``optim.state.<fqn>.<state>`` keys)."""
    return {k.name for k in map(parse_key, keys) if k.kind == "state"}


def regroup(groups: dict, extras: dict, names) -> tuple[dict, dict, bool]:
    """Param groups ``{(group, key): value}`` with the per-parameter hyper-parameters among
    ``extras`` (``optim.param_groups.<fqn>.<key>`` of model tensors ``names``: a flattened optimizer
    state dict) turned into indexed groups: tensors whose hyper-parameters are all equal share a
    group, numbered in model order after any indexed one, that lists them in ``params``. Returns
    (groups, the other extras, whether any entry was per parameter). The flattened form does not
    number the groups, so two groups of equal hyper-parameters come back as one."""
    known = set(names)
    numbered = any(key == "params" for _, key in groups)   # the indexed form lists each group's params
    per: dict[str, dict] = {}
    kept, rest = {}, {}
    for (i, key), v in groups.items():
        if not numbered and str(i) in known:   # flattened: "optim.param_groups.0.lr" is parameter "0"'s lr
            per.setdefault(str(i), {})[key] = v
        else:
            kept[(i, key)] = v
    for fqn, v in extras.items():
        k = parse_key(fqn)
        if k.kind == "hyper" and k.name in known:
            per.setdefault(k.name, {})[k.state] = v
        else:
            rest[fqn] = v
    if not per:
        return groups, extras, False
    found: list[tuple[dict, list]] = []
    for n in names:
        if n in per:
            i = next((j for j, (g, _) in enumerate(found) if _same_values(g, per[n])), None)
            if i is None:
                found.append((per[n], []))
            found[-1 if i is None else i][1].append(n)
    out = kept
    base = max((i for i, _ in kept), default=-1) + 1
    for i, (g, members) in enumerate(found, start=base):
        out.update({(i, k): v for k, v in g.items()})
        out[(i, "params")] = members
    return out, rest, True


def _same_values(a: dict, b: dict) -> bool:
    def same(x, y):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype
                    and x.shape == y.shape and torch.equal(x, y))
        return type(x) is type(y) and x == y

    return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)


def is_flattened(md: dict) -> bool:
    """Whether the checkpoint's optimizer state dict was saved flattened (:func:`regroup`)."""
    return bool((md.get("optimizer") or {}).get("flattened"))


def group_entries(groups: list, flattened: bool) -> list[tuple[str, Any]]:
    """The DCP ``(key, value)`` entries of param groups (dicts listing their ``params``), in the
    form they were saved in: ``optim.param_groups.<i>.<key>``, or with ``flattened``
    ``optim.param_groups.<fqn>.<key>`` for each parameter listed (its group's values)."""
    if not flattened:
        return [(f"{PARAM_GROUPS}{i}.{k}", v) for i, g in enumerate(groups) for k, v in g.items()]
    if any("params" not in g for g in groups):
        return []   # groups that do not list their parameters have no per-parameter form
    return [(f"{PARAM_GROUPS}{n}.{k}", v) for g in groups for n in g.get("params") or []
            for k, v in g.items() if k != "params"]


def param_group_of(groups: dict) -> dict[str, int]:
    """The group of each FQN the param groups list (``{(group, key): value}``): ``get_state_dict``
    names each parameter of a group in its ``params`` (a plain ``optimizer.state_dict()`` numbers
    them, and lists no names)."""
    return {p: i for (i, key), v in groups.items() if key == "params" and isinstance(v, (list, tuple))
            for p in v if isinstance(p, str)}


def tied_aliases(names, keys, ties: dict, listed=None) -> set:
    """The model tensors stored through another one (``tied_to`` of :func:`param_flags`)."""
    return {n for n, f in param_flags(names, keys, ties, listed).items() if "tied_to" in f}


def check_states_held(where, state_names, param_names) -> None:
    """Optimizer state must come with its model tensor: a universal parameter is made from its
    ``model.<fqn>`` entry (its ``param`` array), so state alone could be stored but never loaded
    or exported."""
    held = set(param_names)
    missing = sorted(set(state_names) - held)
    listed = [n for n in missing if n.rpartition(".")[0] in held]
    if listed:   # optim.state.<fqn>.<state>.<i>: read as state <i> of a parameter "<fqn>.<state>"
        name, _, state = listed[0].rpartition(".")
        more = f" (and {len(listed) - 1} more)" if len(listed) > 1 else ""
        raise UcpError(f"{where}: optimizer state {state!r} of {name}{more} is a list of tensors (keys "
                       f"optim.state.{name}.{state}.<i>, as LBFGS keeps its history), which ucp does not store")
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise UcpError(f"{where}: optimizer state for {', '.join(missing[:5])}{more}, which the model "
                       "section (model.<fqn>) does not hold: save the model's state dict with the "
                       "optimizer's ({'model': ..., 'optim': ...} of get_state_dict(model, optimizer))")


def non_tensor_metadata(groups: dict, extras: dict, planner_data=None, flattened: bool = False,
                        form: str = "get_state_dict") -> dict:
    """The universal checkpoint's non-tensor metadata: ``{"optimizer": {"param_groups":
    [...]}}`` from ``{(group, key): value}`` (``"flattened": true`` where they were saved per
    parameter, :func:`regroup`), ``{"dcp": {key: value}}`` from the other entries, and their
    nested paths where the keys alone do not give them (``"dcp_paths"``, :func:`extra_paths` of
    the saved ``planner_data``, keyed as ``extras``); ``"dcp_keys"``: the form of the saved keys
    where it is not ``get_state_dict``."""
    md: dict[str, Any] = {}
    if form != "get_state_dict":
        md["dcp_keys"] = form
    if groups:
        n_groups = max(i for i, _ in groups) + 1
        md["optimizer"] = {"param_groups": [{k: v for (i, k), v in sorted(groups.items(), key=_group_order)
                                             if i == g} for g in range(n_groups)]}
        if flattened:
            md["optimizer"]["flattened"] = True
    if extras:
        md["dcp"] = dict(extras)
        paths = extra_paths(extras, planner_data)
        if paths:
            md["dcp_paths"] = paths
    return md


def canonical_paths(planner_data, form: str) -> Optional[dict]:
    """DCP's ``planner_data`` (saved key -> nested path) keyed by ``get_state_dict`` keys."""
    if not isinstance(planner_data, dict) or form == "get_state_dict":
        return planner_data
    return {canonical_key(k, form): v for k, v in planner_data.items()}


def _parse(fqn: str, form: str) -> DcpKey:
    """The meaning of a key of a state dict in ``form``."""
    return parse_key(canonical_key(fqn, form))


def saved_ndim(meta) -> Optional[int]:
    """Dims of a saved tensor from its metadata (a ``TensorStorageMetadata``, or a write item's
    ``tensor_data``); None for a value, whose metadata has no size (``key_form``)."""
    size = getattr(meta, "size", None)
    return None if size is None else len(size)


def _group_order(item):
    (i, k), _ = item
    return (i, k != "params", k)


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
