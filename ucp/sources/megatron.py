"""Megatron-Core ``dist_checkpointing`` checkpoints in the ``torch_dist`` format as a source.

A ``torch_dist`` checkpoint is a torch DCP checkpoint (``.metadata`` + ``__*_*.distcp``,
read through ``ucp.sources._dcpfiles``: an allow-list unpickler, memory-mapped items) plus
``metadata.json`` (the backend) and ``common.pt`` (the non-sharded state: ``iteration``,
``args``, ...). Everything is read from the checkpoint's own metadata, not from a guess of
the run's degrees:

* each ShardedTensor key is a DCP tensor with its global shape and the chunks the main
  replicas wrote (``replica_id == 0``: DCP keeps one chunk per distinct region);
* the transformer layers are stacked on a leading axis (``prepend_axis_num = 1``):
  ``decoder.layers.self_attention.linear_qkv.weight`` of shape ``(L, ...)`` becomes the
  per-layer parameters ``decoder.layers.{i}.self_attention.linear_qkv.weight``; MoE experts
  (``SequentialMLP``) on two, layer and global expert index:
  ``decoder.layers.mlp.experts.experts.linear_fc1.weight`` of shape ``(L, E, ...)`` becomes
  ``decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc1.weight``;
* the universal tensors follow ``converters/megatron_gpt.ucp``: the stored global fused QKV
  is group-interleaved (per query group ``[q x heads/groups, k, v]``) and becomes part-major
  ``[q; k; v]``; SwiGLU ``linear_fc1`` is stored as ``[gate; up]`` already (Megatron's swiglu
  factory saves the two halves as separate chunks) and stays so. The spec bound at
  ``tp = 1`` maps universal boxes to the stored global tensor; each stored chunk is a box of
  that global tensor (:func:`restrict`);
* the padded vocabulary rows of the embedding and output layer are kept (Megatron trains
  the output layer's padding rows); ``padding`` records how many rows pad ``args.vocab_size``;
* ShardedObjects (``_extra_state``) are carried in the metadata (``megatron.objects``) so that
  a model loaded at default strictness finds them again; they are read with the weights-only
  unpickler (tensors and plain data: Transformer Engine's tensor-valued fp8 state passes, a
  pickled ``BytesIO`` is refused by name);
* ``common.pt`` is read with ``torch.load(weights_only=True)`` and an allow-list that adds
  only ``argparse.Namespace``; ``args`` are stored as JSON.

Distributed-optimizer state (``DistributedOptimizer.sharded_state_dict``), by the
``param_state_sharding_type`` recorded with it:

* ``fully_reshardable``: ``optimizer.state.{param,exp_avg,exp_avg_sq}.<model key>`` are
  ShardedTensors with the model key's own global shape and sharding (Megatron replaces only
  the key and the data of the model's ShardedTensor / ShardedTensorFactory), so they are
  read like the weights: state ``exp_avg`` of the parameters of ``<model key>``. ``param`` is
  the optimizer's fp32 main parameter and becomes the universal ``param`` (the model weight
  under that key is its copy at the model's precision). ``step`` comes from the param groups
  in ``common.pt`` (torch Adam keeps it there in this format); the groups are kept in the
  metadata (``optimizer.param_groups``).
* ``dp_reshardable`` stores the flat buckets of the optimizer's buffers,
  ``optimizer.distributed.dp_group_idx_G.gbuf_idx_V.dtype_*.bucket_idx_B.{param,exp_avg,...}``:
  one 1-D tensor per bucket of model chunk ``V`` of model-parallel rank ``G`` (= pp rank x tp
  + tp rank), the DP ranks' shards one after the other (the padding to the DP multiple cut
  off at the end). Where each parameter lies in a bucket is the spec's ``flat(..., group=
  "dense.{v}", order=reverse, param_align=64, ...)`` bound at the run's tp, pp and dp
  (``args.data_parallel_size``) with ``distributed_optimizer = 1`` and the bucket size DDP
  derives from the args (:func:`bucket_elements`): the fragments of rank
  (tp, pp, dp) are shifted by dp x the shard length into the stored tensor, each piece
  inside one stored chunk (Megatron writes one chunk per parameter range per rank). Expert
  buffers (MoE) are refused by name. ``step`` and the groups come from the
  ``optimizer.distributed.dp_group_idx_0.optimizer`` object.
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

from ucp.errors import UcpError
from ucp.sources import Source, SourceLayout, SourceParam

DEFAULT_SPEC = "megatron_gpt"
BACKEND_FILE = "metadata.json"
COMMON_FILE = "common.pt"
STACKED_PREFIX = "decoder.layers."
#: stored key prefix -> universal name pattern, for tensors stacked on leading axes
STACKED = (("decoder.layers.mlp.experts.experts.", "decoder.layers.{}.mlp.experts.local_experts.{}."),
           (STACKED_PREFIX, "decoder.layers.{}."))
#: the key under which ucp's own target carries the universal metadata in common.pt (JSON)
CARRIED_KEY = "ucp_metadata"
VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")
_OBJECT_KEY = re.compile(r"^(?P<key>.+)/shard_(?P<offsets>[0-9_]+)$")
#: fully_reshardable distributed-optimizer state: the model key's layout under another key
OPTIMIZER_PREFIX = "optimizer.state."
OPTIMIZER_STATE = re.compile(r"^optimizer\.state\.(?P<state>[A-Za-z0-9_]+)\.(?P<key>.+)$")
#: dp_reshardable distributed-optimizer state: one flat tensor per bucket of a buffer
BUCKET = re.compile(r"^optimizer\.distributed\.dp_group_idx_(?P<group>\d+)\.gbuf_idx_(?P<buffer>\d+)\."
                    r"dtype_.*\.bucket_idx_(?P<bucket>\d+)\.(?P<state>[A-Za-z0-9_]+)$")


class MegatronError(UcpError):
    """A Megatron ``torch_dist`` checkpoint is incomplete or not understood."""


def planner_globals() -> list:
    """DCP planner dataclasses Megatron-Core keeps in ``.metadata`` (``all_local_plans``);
    plain data, added to the DCP metadata allow-list."""
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    return [SavePlan, WriteItem, WriteItemType, TensorWriteData]


def read_backend(path: Path) -> dict:
    """``metadata.json``; only the ``torch_dist`` sharded backend is understood."""
    file = path / BACKEND_FILE
    try:
        doc = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MegatronError(f"{file}: not a readable dist_checkpointing metadata.json ({e})") from None
    if doc.get("sharded_backend") != "torch_dist":
        raise MegatronError(f"{file}: sharded_backend {doc.get('sharded_backend')!r}; only 'torch_dist' "
                            "checkpoints are supported")
    return doc


def load_common(path: Path) -> dict:
    """``common.pt`` through the weights-only unpickler (``argparse.Namespace`` allowed)."""
    import torch

    file = path / COMMON_FILE
    if not file.is_file():
        return {}
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # the weights-only unpickler names the refused global
        found = re.search(r"GLOBAL (\S+)", str(e))
        why = (f"refusing to unpickle global {found.group(1)!r} (only tensors, plain data and "
               "argparse.Namespace are loaded; no pickled code runs)") if found else \
            f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        raise MegatronError(f"{file}: {why}") from None
    if not isinstance(obj, dict):
        raise MegatronError(f"{file}: holds a {type(obj).__name__}, a dict was expected")
    return obj


def jsonable(value: Any) -> Any:
    """Non-tensor state as JSON-like data (Namespaces as dicts, dtypes as names)."""
    import torch

    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    return {"$repr": repr(value)}


def model_constants(args: Mapping[str, Any], given: Mapping[str, int] | None) -> dict[str, int]:
    """The spec's model constants from Megatron-LM's ``args`` (``given`` wins)."""
    out: dict[str, int] = {}
    heads = args.get("num_attention_heads")
    if args.get("num_layers") is not None:
        out["layers"] = args["num_layers"]
    if heads is not None:
        out["heads"] = heads
        gqa = args.get("group_query_attention") or args.get("num_query_groups")
        out["kv_heads"] = args.get("num_query_groups") if gqa and args.get("num_query_groups") else heads
        out["head_dim"] = args.get("kv_channels") or args["hidden_size"] // heads
    if args.get("num_experts"):
        out["experts"] = args["num_experts"]
    out.update(given or {})
    return {k: int(v) for k, v in out.items()}


def model_order(tensors: dict) -> dict:
    """Parameters in model order: what precedes the layers, layer by layer, what follows
    (``tensors``: name -> state -> stored entry, whose [3] is the leading index or None)."""
    names = list(tensors)
    first = next((i for i, n in enumerate(names) if tensors[n]["param"][3] is not None), len(names))

    def rank(item):
        i, n = item
        layer = tensors[n]["param"][3]
        return (1, layer, i) if layer is not None else ((0 if i < first else 2), 0, i)

    return {n: tensors[n] for _, n in sorted(enumerate(names), key=rank)}


def unstack(key, item, model_key=None):
    """``(universal name, (shape, dtype, key, leading indices or None, chunks))`` for each
    parameter stored under ``key``; ``model_key`` (default ``key``) names them: layers (and
    experts) stacked on leading axes become one parameter per index."""
    model_key = model_key or key
    size, dtype = tuple(item.size), item.properties.dtype
    prefix, pattern = next(((p, n) for p, n in STACKED if model_key.startswith(p)), (None, None))
    if prefix is None or model_key[len(prefix):][:1].isdigit():
        return [(model_key, (size, dtype, key, None, item.chunks))]
    lead = pattern.count("{}")
    return [(pattern.format(*index) + model_key[len(prefix):], (size[lead:], dtype, key, index, item.chunks))
            for index in itertools.product(*(range(n) for n in size[:lead]))]


def optimizer_scalars(common: Mapping[str, Any], tensors: Mapping[str, Mapping]) -> dict:
    """Adam's ``step`` of a fully_reshardable distributed optimizer: torch Adam keeps it in the
    param groups saved in ``common.pt`` (all groups step together); ``{}`` without optimizer state."""
    if not any(len(t) > 1 for t in tensors.values()):
        return {}
    groups = optimizer_groups(common)
    steps = {g.get("step") for g in groups if g.get("step") is not None}
    if len(steps) > 1:
        raise MegatronError(f"{COMMON_FILE}: optimizer param groups disagree on the step: {sorted(steps)}")
    if not steps:
        return {}
    step = steps.pop()
    return {"step": int(step) if float(step).is_integer() else step}


def optimizer_groups(common: Mapping[str, Any]) -> list:
    """The optimizer's param groups (hyper-parameters, no tensors) from ``common.pt``."""
    opt = common.get("optimizer")
    inner = opt.get("optimizer") if isinstance(opt, dict) else None
    groups = inner.get("param_groups") if isinstance(inner, dict) else None
    return [jsonable(g) for g in groups] if isinstance(groups, list) else []


def bucket_elements(args: Mapping[str, Any], dp: int, stage: int) -> int:
    """The DDP bucket size (elements) of pipeline stage ``stage`` as Megatron-Core's
    DistributedDataParallel sets it from Megatron-LM's args; 0: one bucket per buffer
    (no ``overlap_grad_reduce``, or a stage after the first, which Megatron never splits)."""
    if not args.get("overlap_grad_reduce") or stage > 0:
        return 0
    return int(args.get("ddp_bucket_size") or max(40000000, 1000000 * dp))


def restrict(fragment, chunk_start, chunk_stop):
    """The part of ``fragment`` (whose local tensor is a stored global tensor) that one
    stored chunk ``[chunk_start, chunk_stop)`` holds, as a fragment whose local tensor is
    that chunk."""
    from ucp.plan import Box, Piece

    chunk = Box(tuple(chunk_start), tuple(chunk_stop))
    pieces = []
    for pc in fragment.pieces:
        inter = pc.dst.intersect(chunk)
        if inter.empty:
            continue
        shift = [a - b for a, b in zip(inter.start, pc.dst.start)]
        src_start = tuple(s + d for s, d in zip(pc.src.start, shift))
        src = Box(src_start, tuple(s + n for s, n in zip(src_start, inter.shape)))
        pieces.append(Piece(src, inter.relative_to(chunk)))
    return replace(fragment, local_shape=chunk.shape, pieces=tuple(pieces))


class MegatronSource(Source):
    """Reads Megatron-Core ``dist_checkpointing`` ``torch_dist`` checkpoints."""
    name = "megatron"
    description = "Megatron-Core dist_checkpointing (torch_dist: .metadata, *.distcp, common.pt)"
    priority = 10          # before plain DCP (20): a torch_dist checkpoint is a DCP directory too

    def __init__(self, path, *, spec=None, storage_options=None, constants=None, **options):
        super().__init__(path, spec=spec, storage_options=storage_options, **options)
        self.reject_options()
        self.constants = dict(constants or {})
        self._files = None
        self._where: dict[tuple[str, tuple], tuple[Any, int | None]] = {}

    @classmethod
    def detect(cls, path) -> bool:
        p = Path(path)
        if not ((p / BACKEND_FILE).is_file() and (p / ".metadata").is_file()):
            return False
        try:
            return json.loads((p / BACKEND_FILE).read_text()).get("sharded_backend") == "torch_dist"
        except (OSError, json.JSONDecodeError):
            return False

    def layout(self) -> SourceLayout:
        from ucp.engine import bind_layout
        from ucp.sources._dcpfiles import DcpFiles

        read_backend(self.path)
        self._files = DcpFiles(self.path, extra_globals=planner_globals())
        common = load_common(self.path)
        args = jsonable(common.get("args") or {})
        tensors, objects, buckets = self._stored_items()
        shapes = {n: t["param"][0] for n, t in tensors.items()}
        constants = {**model_constants(args, self.constants), "vocab_multiple": 1}
        bound = bind_layout(self.spec or DEFAULT_SPEC, list(shapes), {}, constants)
        whole = {f.name: f for f in bound.rank_fragments(shapes, {})}
        planned = {}
        if buckets:
            common = {**common, "optimizer": {**(common.get("optimizer") or {}), **self._bucket_common(objects)}}
            planned = self._bucket_fragments(buckets, shapes, args, constants)
            dtype = {st: item.properties.dtype for (_, _, _, st), (_, item) in buckets.items()}
            for name, by_state in planned.items():
                tensors[name].update({st: (shapes[name], dtype[st]) + tensors[name]["param"][2:]
                                      for st in by_state})
        scalars = optimizer_scalars(common, tensors)
        params = [self._param(n, tensors[n], whole[n], bound, args, scalars, planned.get(n, {}))
                  for n in shapes]
        metadata = self._metadata(common, args, constants, objects)
        return SourceLayout(params=params, metadata=metadata, spec_name=bound.spec_name,
                            spec_text=bound.spec.text, constants=constants)

    def _stored_items(self):
        """``{param: {state: (shape, dtype, key, leading indices or None, chunks)}}``,
        ``{object key: index}`` and ``{(group, buffer, bucket, state): (key, item)}``. A model
        key gives state ``param``; a fully_reshardable optimizer key ``optimizer.state.S.<model
        key>`` gives state ``S`` of the same parameters (``param`` there is the fp32 main
        parameter and wins); dp_reshardable buckets are returned as they are."""
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

        md = self._files.metadata
        tensors, objects, optim, buckets = {}, {}, [], {}
        for key, item in md.state_dict_metadata.items():
            if isinstance(item, BytesStorageMetadata):
                objects[key] = MetadataIndex(key)
            elif (m := BUCKET.match(key)):
                buckets[(int(m["group"]), int(m["buffer"]), int(m["bucket"]), m["state"])] = (key, item)
            elif (m := OPTIMIZER_STATE.match(key)):
                optim.append((m["state"], m["key"], key, item))
            else:
                for name, entry in unstack(key, item):
                    tensors[name] = {"param": entry}
        for state, model_key, key, item in optim:
            for name, entry in unstack(key, item, model_key):
                if name not in tensors:
                    raise MegatronError(f"{self.path}: optimizer state {key!r} has no model tensor "
                                        f"{model_key!r} beside it")
                if tuple(entry[0]) != tuple(tensors[name]["param"][0]):
                    raise MegatronError(f"{self.path}: optimizer state {key!r} has shape {entry[0]}, the "
                                        f"model tensor {model_key!r} {tensors[name]['param'][0]}")
                tensors[name][state] = entry
        return model_order(tensors), objects, buckets

    def _bucket_fragments(self, buckets, shapes, args, constants) -> dict:
        """dp_reshardable: ``{param: {state: [fragment per stored chunk]}}`` from the spec's
        bucket layout bound at the run's degrees (see the module docstring)."""
        from ucp.engine import bind_layout

        tp, pp = int(args.get("tensor_model_parallel_size") or 1), int(args.get("pipeline_model_parallel_size") or 1)
        dp = args.get("data_parallel_size")
        if not dp:
            raise MegatronError(f"{self.path}: dp_reshardable optimizer state is laid out by the run's "
                                "data-parallel size, which common.pt does not record (args.data_parallel_size)")
        if constants.get("experts"):
            raise MegatronError(f"{self.path}: dp_reshardable optimizer state of a MoE model (expert "
                                "buffers) is not supported; save with 'fully_reshardable'")
        binds = {}

        def bound_at(stage):
            size = bucket_elements(args, int(dp), stage)
            if size not in binds:
                degrees = {"tp": tp, "pp": pp, "dp": int(dp)}
                binds[size] = bind_layout(self.spec or DEFAULT_SPEC, dict(shapes), degrees,
                                          {**constants, "distributed_optimizer": 1, "bucket_size": size,
                                           "vp": int(args.get("virtual_pipeline_model_parallel_size") or 1)})
            return binds[size]

        states = sorted({k[3] for k in buckets})
        out: dict = {n: {st: {} for st in states} for n in shapes}
        for coords in bound_at(0).mesh():
            group = coords.get("pp", 0) * tp + coords.get("tp", 0)
            bound = bound_at(coords.get("pp", 0))
            for state in states:
                for f in bound.rank_fragments(shapes, coords, state=state):
                    if not f.replica:
                        self._place_in_bucket(f, buckets, (group, state), coords.get("dp", 0), out[f.name][state])
        return {n: {st: list(fr.values()) for st, fr in by.items()} for n, by in out.items()}

    def _place_in_bucket(self, f, buckets, where, dp_rank, into: dict) -> None:
        """The pieces of rank fragment ``f`` (local tensor: that DP rank's shard of bucket
        ``f.local_name`` = "dense.V[.B]") as pieces of the stored chunks that hold them."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        from ucp.plan import Box, Piece

        _, v, *b = f.local_name.split(".")
        group, state = where
        found = buckets.get((group, int(v), int(b[0]) if b else 0, state))
        if found is None:
            raise MegatronError(f"{self.path}: no dp_reshardable bucket {f.local_name} of {state} for "
                                f"dp_group_idx_{group} ({f.name} is there by the spec's layout)")
        key, item = found
        shift = dp_rank * f.local_shape[0]
        for pc in f.pieces:
            start, stop = pc.dst.start[0] + shift, pc.dst.stop[0] + shift
            k, ch = next(((k, c) for k, c in enumerate(item.chunks)
                          if c.offsets[0] <= start and stop <= c.offsets[0] + c.sizes[0]), (None, None))
            if ch is None:
                raise MegatronError(f"{self.path}: {key}: no stored chunk holds [{start}, {stop}) of "
                                    f"{f.name} (the buffer layout differs from the spec's)")
            coords = (("group", group), ("chunk", k))
            frag = into.get(coords)
            if frag is None:
                frag = replace(f, local_name=key, coords=coords, local_shape=tuple(ch.sizes), pieces=())
                self._where[(f.name, state, coords)] = (MetadataIndex(key, tuple(ch.offsets), k), None)
            dst = Box((start - ch.offsets[0],), (stop - ch.offsets[0],))
            into[coords] = replace(frag, pieces=frag.pieces + (Piece(pc.src, dst),))

    def _bucket_common(self, objects) -> dict:
        """dp_reshardable: the optimizer's common state (param groups) from its ShardedObject."""
        key = next((k for k in objects if k.startswith("optimizer.distributed.dp_group_idx_0.optimizer/")), None)
        value = self._files.obj(objects[key]) if key else None
        value = value[0] if isinstance(value, list) and len(value) == 1 else value
        return {"optimizer": value} if isinstance(value, dict) else {}

    def _param(self, name, stored, whole, bound, args, scalars, planned) -> SourceParam:
        """One universal parameter: per state, a fragment per stored chunk that holds part of it
        (``planned``: states whose fragments are planned already, dp_reshardable buckets)."""
        frags = {state: planned.get(state) or self._fragments(name, state, entry, whole)
                 for state, entry in stored.items()}
        shape, key = stored["param"][0], stored["param"][2]
        key = m["key"] if (m := OPTIMIZER_STATE.match(key)) else key     # the model key, also for main params
        meta = {**bound.param_meta(name, shape), "fragmentation": {"layout": "megatron", "key": key}}
        meta.pop("padding", None)
        if name in VOCAB_PARAMS and args.get("vocab_size") and shape[0] > args["vocab_size"]:
            meta["padding"] = {"dim": 0, "size": int(shape[0] - args["vocab_size"])}
        dtypes = {state: entry[1] for state, entry in stored.items()}
        return SourceParam(name=name, shape=tuple(shape), dtypes=dtypes, fragments=frags.pop("param"),
                           state_fragments=frags, scalars=scalars if len(stored) > 1 else {}, meta=meta)

    def _fragments(self, name, state, entry, whole) -> list:
        """The fragments of one stored key's chunks that hold part of parameter ``name``."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        shape, dtype, key, lead, chunks = entry
        frags = []
        for k, ch in enumerate(chunks):
            start, sizes = tuple(ch.offsets), tuple(ch.sizes)
            within = None
            if lead is not None:
                n = len(lead)
                if not all(a <= i < a + b for i, a, b in zip(lead, start, sizes)):
                    continue
                within = tuple(i - a for i, a in zip(lead, start))
                start, sizes = start[n:], sizes[n:]
            f = restrict(whole, start, tuple(a + b for a, b in zip(start, sizes)))
            f = replace(f, local_name=key, coords=(("chunk", k),))
            self._where[(name, state, f.coords)] = (MetadataIndex(key, tuple(ch.offsets), k), within)
            frags.append(f)
        return frags

    def _metadata(self, common, args, constants, objects) -> dict:
        """Non-tensor state: iteration, args, other common items, ShardedObjects."""
        carried = common.get(CARRIED_KEY)
        out = json.loads(carried) if isinstance(carried, str) else {}
        rest = {k: jsonable(v) for k, v in common.items() if k not in ("args", CARRIED_KEY)}
        out["megatron"] = {"common": rest, "args": args, "constants": constants,
                           "objects": {k: jsonable(self._files.obj(i)) for k, i in objects.items()}}
        if "iteration" in common:
            out["iteration"] = common["iteration"]
        if optimizer_groups(common):
            out["optimizer"] = {"param_groups": optimizer_groups(common),
                                "sharding_type": common["optimizer"].get("param_state_sharding_type")}
        return out

    def read(self, fragment, state: str, piece):
        return self.local(fragment, state)[piece.dst.slices()].reshape(piece.src.shape)

    def local(self, fragment, state: str):
        where = self._where.get((fragment.name, state, fragment.coords))
        if where is None:
            raise MegatronError(f"{self.describe(fragment, state)}: the checkpoint holds no such state")
        index, within = where
        t = self._files.tensor(index)
        return t if within is None else t[within]

    def describe(self, fragment, state: str) -> str:
        return f"{self.path}: {state} of {fragment.name} (stored key {fragment.local_name})"

    def close(self) -> None:
        if self._files is not None:
            self._files.close()
