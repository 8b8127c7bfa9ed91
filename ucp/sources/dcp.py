"""Source plug-in for torch DCP checkpoints (``.metadata`` + ``__<rank>_<n>.distcp``).

DCP's metadata already lists, for every state-dict key, the global shape and the box of every
saved chunk, whatever the layout that wrote it (FSDP2, TP, 2-D with ``_StridedShard``,
pipeline stages): the fragments come straight from it, one per saved chunk (coordinates
``{"item": k}``), no spec needed. DCP saves each replicated region once, so there are no
replicas to dedupe.

Keys follow ``ucp.dcp.parse_key`` (``get_state_dict``'s layout): ``model.<fqn>`` -> parameter
``<fqn>``; ``optim.state.<fqn>.<state>`` -> state (0-d ones, Adam ``step``, -> scalars);
``optim.param_groups.*`` and other entries -> non-tensor metadata. A checkpoint saved the
torchtitan way (model keys at the top level, the optimizer under ``optimizer.``:
``ucp.dcp.key_form``) is read through ``ucp.dcp.canonical_key`` and records its form.

Frozen and tied parameters: a model tensor that the optimizer of the checkpoint neither keeps
state for nor lists in a param group is either a tied alias (DCP stores it again under its own
key; the optimizer knows it under one name) or frozen. It is tied to a trained model tensor of
the same shape, dtype and chunking whose saved bytes are identical — read once at ``layout()``
time, for those candidates only — and frozen otherwise (``ucp.dcp.metadata.param_flags``). A tied alias
is stored once: a parameter with no arrays, ``tied_to`` the trained one.

Files are read through ``ucp.sources._dcpfiles``: metadata through an allow-list unpickler,
items as memory-mapped tensors, so the engine's box reads touch only the pages they need.
"""
from __future__ import annotations

from typing import Any, TYPE_CHECKING

from ucp.errors import UcpError
from ucp.format.dtypes import dtype_name, scalar_dtype_name
from ucp.sources import Source, SourceLayout, SourceParam
from ucp.sources._dcpfiles import DcpFiles, chunk_box, is_dcp_dir

if TYPE_CHECKING:
    import torch


class DcpSource(Source):
    name = "dcp"
    description = "torch.distributed.checkpoint directory (.metadata + *.distcp), get_state_dict keys"
    priority = 20

    def __init__(self, path, *, spec=None, storage_options=None, **options):
        super().__init__(path, spec=spec, storage_options=storage_options, **options)
        self.reject_options()
        if spec is not None:
            raise UcpError(f"{path}: a DCP checkpoint describes its own layout; --spec is not used")
        self._files: DcpFiles | None = None
        self._items: dict[str, Any] = {}       # fragment local_name -> MetadataIndex

    @classmethod
    def detect(cls, path) -> bool:
        return is_dcp_dir(path)

    def files(self) -> DcpFiles:
        if self._files is None:
            self._files = DcpFiles(self.path)
        return self._files

    def layout(self) -> SourceLayout:
        from ucp.dcp.keys import canonical_key, canonical_paths, key_form, parse_key, saved_ndim
        from ucp.dcp.metadata import check_states_held, non_tensor_metadata, param_flags, param_group_of, regroup

        md = self.files().metadata
        saved = _key_order(md)
        form = key_form({k: saved_ndim(md.state_dict_metadata[k]) for k in saved}, md.planner_data)
        canon = {k: canonical_key(k, form) for k in saved}
        keys = [canon[k] for k in saved]
        arrays, scalars, groups, extras = self._classify(canon)
        # a model-section key holding a value (a flat {"w": t, "step": 5}) is an entry, not a tensor
        names = [k.name for k in (parse_key(x) for x in keys) if k.kind == "param" and (k.name, "param") in arrays]
        states: dict[str, list] = {}
        for name, state in arrays:
            states.setdefault(name, []).append(state)
        check_states_held(self.path, [n for n, _ in arrays] + list(scalars), names)
        groups, extras, flattened = regroup(groups, extras, names)
        listed = param_group_of(groups)
        flags = param_flags(names, keys, self._ties(names, keys, arrays, listed), listed)
        params = [self._alias(n, arrays, flags[n]) if "tied_to" in flags[n] else
                  self._param(n, arrays, states[n], scalars.get(n, {}), flags[n]) for n in names]
        paths = canonical_paths(md.planner_data, form)
        return SourceLayout(params=params, metadata=non_tensor_metadata(groups, extras, paths, flattened, form))

    def _classify(self, canon: dict):
        """``arrays[(name, state)] = (saved key, TensorStorageMetadata)``, per-parameter scalars
        ``{name: {state: (value, dtype)}}``, param-group values and other entries (under their
        ``get_state_dict`` keys: ``canon`` maps each saved key to it)."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        from ucp.dcp.keys import is_array, parse_key

        files, sdm = self.files(), self.files().metadata.state_dict_metadata
        arrays, scalars, groups, extras = {}, {}, {}, {}
        for fqn, key in canon.items():
            k, tmd = parse_key(key), sdm[fqn]
            if not isinstance(tmd, TensorStorageMetadata):
                value = files.obj(_index(fqn))
                (groups.__setitem__((k.group, k.state), value) if k.kind == "group"
                 else extras.__setitem__(key, value))
            elif is_array(k, tmd.size):
                arrays[(k.name, k.state)] = (fqn, tmd)
            elif k.kind == "state":
                t = files.tensor(_index(fqn, tmd.chunks[0].offsets, 0))
                scalars.setdefault(k.name, {})[k.state] = (t.item(), t.dtype)
            else:
                extras[key] = self._whole_tensor(fqn, tmd)
        return arrays, scalars, groups, extras

    def _whole_tensor(self, fqn: str, tmd) -> torch.Tensor:
        """A tensor outside model/optim (kept as metadata), assembled from its chunks."""
        import torch

        out = torch.empty(tuple(tmd.size), dtype=tmd.properties.dtype)
        for k, ch in enumerate(tmd.chunks):
            start, stop = chunk_box(ch)
            out[tuple(slice(a, b) for a, b in zip(start, stop))] = self.files().tensor(_index(fqn, ch.offsets, k))
        return out

    def _param(self, name: str, arrays: dict, saved_states: list, scalars: dict, flags: dict) -> SourceParam:
        states = ["param"] + sorted(s for s in saved_states if s != "param")
        frags = {s: self._fragments(name, *arrays[(name, s)]) for s in states}
        fqn, tmd = arrays[(name, "param")]
        meta = dict(flags)
        if scalars:
            meta["scalar_dtypes"] = {s: scalar_dtype_name(dt) for s, (_, dt) in scalars.items()}
        shapes = {s: tuple(arrays[(name, s)][1].size) for s in states}
        return SourceParam(name=name, shape=tuple(tmd.size),
                           dtypes={s: arrays[(name, s)][1].properties.dtype for s in states},
                           fragments=frags["param"], state_fragments={s: f for s, f in frags.items() if s != "param"},
                           scalars={s: v for s, (v, _) in scalars.items()}, meta=meta,
                           state_shapes={s: shp for s, shp in shapes.items() if shp != tuple(tmd.size)})

    def _alias(self, name: str, arrays: dict, flags: dict) -> SourceParam:
        """A tied alias: no arrays, read through its ``tied_to`` (stored once)."""
        _, tmd = arrays[(name, "param")]
        return SourceParam(name=name, shape=tuple(tmd.size), dtypes={}, fragments=[],
                           meta={**flags, "shape": list(tmd.size),
                                 "dtype": dtype_name(tmd.properties.dtype)})

    def _fragments(self, name: str, fqn: str, tmd) -> list:
        from ucp.plan import Box, Fragment, Piece

        out = []
        for k, ch in enumerate(tmd.chunks):
            start, stop = chunk_box(ch)
            local = f"{fqn}[{k}]"
            self._items[local] = _index(fqn, ch.offsets, k)
            sizes = tuple(b - a for a, b in zip(start, stop))
            out.append(Fragment(name=name, local_name=local, coords=(("item", k),), local_shape=sizes,
                                pieces=(Piece(Box(start, stop), Box.full(sizes)),), global_shape=tuple(tmd.size),
                                origin=f"{self.path}/.metadata"))
        return out

    def _ties(self, names, keys, arrays, listed) -> dict:
        """``alias -> target`` for model tensors the optimizer neither keeps state for nor lists
        (``listed``) whose saved chunks are bytewise those of exactly one model tensor it trains
        (same shape, dtype and chunk boxes): DCP saves a tied tensor under each of its names, the
        optimizer knows it under one. A tensor of one repeated value is never an alias: equal
        bytes show nothing there (BatchNorm's buffers start as the ones and zeros of a fresh
        LayerNorm's weight and bias)."""
        from ucp.dcp.metadata import stepped_params

        trained = stepped_params(keys) | set(listed)
        if not trained:
            return {}
        by_layout: dict[tuple, list] = {}    # the trained tensors by shape, dtype and chunk boxes
        for n in names:
            if n in trained:
                by_layout.setdefault(_saved_layout(arrays[(n, "param")][1]), []).append(n)
        ties = {}
        for alias in (n for n in names if n not in trained):
            saved = arrays[(alias, "param")]
            same = [t for t in by_layout.get(_saved_layout(saved[1]), []) if self._same_chunks(saved, arrays[(t, "param")])]
            if len(same) == 1 and not self._constant(saved):   # read only when it matters
                ties[alias] = same[0]
        return ties

    def _chunk(self, saved, k: int):
        """Saved chunk ``k`` of ``saved`` (``(key, TensorStorageMetadata)``), memory-mapped."""
        fqn, tmd = saved
        return self.files().tensor(_index(fqn, tmd.chunks[k].offsets, k))

    def _constant(self, saved) -> bool:
        import torch

        chunks = [t.reshape(-1) for t in (self._chunk(saved, k) for k in range(len(saved[1].chunks))) if t.numel()]
        return all(torch.equal(_bits(t), _bits(chunks[0][:1].expand_as(t))) for t in chunks)

    def _same_chunks(self, a, b) -> bool:
        """Whether two saved tensors of one :func:`_saved_layout` hold the same bytes."""
        import torch

        return all(torch.equal(_bits(self._chunk(a, ka)), _bits(self._chunk(b, kb)))
                   for (_, ka), (_, kb) in zip(_chunk_order(a[1]), _chunk_order(b[1])))

    def describe(self, fragment, state: str) -> str:
        idx = self._items.get(fragment.local_name)
        info = self.files().metadata.storage_data.get(idx) if idx is not None else None
        where = self.path / info.relative_path if info is not None else self.path
        return f"{where}: item {fragment.local_name} ({state} of parameter {fragment.name})"

    def local(self, fragment, state: str):
        idx = self._items.get(fragment.local_name)
        if idx is None:
            raise UcpError(f"{self.path}: no DCP item {fragment.local_name} ({state} of {fragment.name})")
        t = self.files().tensor(idx)
        if tuple(t.shape) != tuple(fragment.local_shape):
            raise UcpError(f"{self.describe(fragment, state)}: stored tensor has shape {tuple(t.shape)}, "
                           f".metadata says {tuple(fragment.local_shape)}")
        return t

    def close(self) -> None:
        if self._files is not None:
            self._files.close()
            self._files = None


def _index(fqn: str, offsets=None, k=None):
    from torch.distributed.checkpoint.metadata import MetadataIndex

    return MetadataIndex(fqn, offsets, k)


def _key_order(md) -> list[str]:
    """State-dict keys in model order. ``planner_data`` keeps each rank's flattening order, but
    DCP merges the ranks' maps as a ``ChainMap`` (the last rank's keys first), which for pipeline
    stages puts the last stage first (and a DeepSpeed export flattens its groups in this order).
    So the keys are grouped by the ranks that store them: ranks that store chunks of a common key
    hold one part of the model (a stage; under FSDP, TP or 2-D every rank shares keys, so there is
    one part and the order is DCP's), and the parts go in order of their lowest rank, each in its
    own order. Keys only in ``state_dict_metadata`` follow."""
    keys = [k for k in (md.planner_data or {}) if k in md.state_dict_metadata] \
        if isinstance(md.planner_data, dict) else []
    seen = set(keys)
    keys += [k for k in md.state_dict_metadata if k not in seen]
    holders: dict[str, set] = {}
    for index, info in md.storage_data.items():
        holders.setdefault(index.fqn, set()).add(getattr(info, "relative_path", ""))
    part = _parts({k: {_file_rank(f) for f in files} for k, files in holders.items()})
    return sorted(keys, key=lambda k: part.get(k, _NO_RANK))   # stable: each part's own order kept


_NO_RANK = 1 << 30


def _parts(ranks_of: dict) -> dict:
    """``key -> the lowest rank of its part``: ranks joined when they store chunks of one key."""
    parent: dict[int, int] = {}

    def root(r):
        while parent.setdefault(r, r) != r:
            r = parent[r]
        return r

    for ranks in ranks_of.values():
        first, *rest = sorted(ranks)
        for r in rest:
            a, b = root(first), root(r)
            parent[max(a, b)] = min(a, b)
    return {k: root(min(ranks)) for k, ranks in ranks_of.items() if ranks}


def _file_rank(rel: str) -> int:
    """The saving rank in a DCP file name (``__<rank>_<n>.distcp``, FileSystemWriter's), else
    after every rank."""
    name = rel.rsplit("/", 1)[-1]
    head = name.removeprefix("__").split("_", 1)[0]
    return int(head) if name.startswith("__") and head.isdigit() else _NO_RANK


def _bits(t: torch.Tensor) -> torch.Tensor:
    import torch

    return t.contiguous().reshape(-1).view(torch.uint8)


def _chunk_order(tmd) -> list:
    """``[(box, chunk index)]`` of a saved tensor's chunks, in box order."""
    return sorted((chunk_box(c), k) for k, c in enumerate(tmd.chunks))


def _saved_layout(tmd) -> tuple:
    """Shape, dtype and chunk boxes of a saved tensor: what two copies of one tensor share."""
    return tuple(tmd.size), tmd.properties.dtype, tuple(box for box, _ in _chunk_order(tmd))
