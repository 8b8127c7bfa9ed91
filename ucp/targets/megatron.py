"""Megatron-Core ``dist_checkpointing`` ``torch_dist`` checkpoints as a target, at any TP/PP.

``ucp export U DST --to megatron --tp N --pp M`` writes what ``dist_checkpointing.save`` of a
GPTModel at (N, M) writes, so that Megatron-Core's own ``dist_checkpointing.load`` reads it
into a GPTModel built at that TP/PP:

* one ShardedTensor key per tensor, transformer layers stacked on a leading axis
  (``decoder.layers.{i}.X`` -> key ``decoder.layers.X`` of shape ``(layers, ...)``);
* the stored global tensors as Megatron lays them out: fused QKV group-interleaved, SwiGLU
  ``linear_fc1`` as ``[gate; up]``, the vocabulary padded to a multiple of
  ``vocab_multiple * tp`` (``converters/megatron_gpt.ucp``; the spec bound at ``tp = 1`` maps
  universal boxes into these global tensors);
* one chunk per rank's shard, as the main replica of each rank writes it (the ``tp`` shard of
  a column- or row-parallel weight, gate and up halves separately, replicated tensors once),
  in one ``__<rank>_0.distcp`` file per rank (rank = pp_rank * tp + tp_rank), each item a
  ``torch.save`` record as torch DCP's ``FileSystemWriter`` writes it;
* ``.metadata`` (DCP ``Metadata``), ``metadata.json`` (the backend) and ``common.pt``
  (``iteration``, ``args`` as Megatron-LM keeps them, the universal HF metadata as JSON);
  ShardedObjects (``_extra_state``) carried from a Megatron source, else written empty (the
  local layers ignore them, Transformer Engine recomputes its fp8 state).

With ``degrees={"vp": V}`` the layers are placed as an interleaved virtual pipeline: chunk
``c`` of ``pp * V`` chunks of consecutive layers lives on stage ``c % pp`` (the spec's
``layers(..., chunks=vp)``). The stored keys are global (layer offsets on the stacked axis),
so a rank writes the layers of all its chunks; Megatron-LM loads them as ``model0``,
``model1``, ...

Distributed-optimizer state is written when the universal checkpoint came from a Megatron
distributed optimizer (its metadata records ``optimizer.sharding_type`` and every parameter
has ``exp_avg`` and ``exp_avg_sq``): in the ``fully_reshardable`` format, which any TP/PP/DP
loads, ``optimizer.state.{param,exp_avg,exp_avg_sq}.<model key>`` with the model key's own
chunks (``param`` is the universal fp32 ``param``, the optimizer's main parameter) and the
param groups (with ``step``) in ``common.pt``. Otherwise only the model weights are written.

A checkpoint in HF Llama names is mapped through ``converters/megatron_to_hf_llama.ucp``
(q/k/v and gate/up fused back). Degrees the model cannot take (query groups or layers not
divisible, a shard that does not split evenly) are refused in :meth:`plan`, before anything
is written; ``.metadata`` is written last (no ``.metadata``, no checkpoint for Megatron).
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from ucp.errors import UcpError
from ucp.plan.renames import fused_views, translate
from ucp.sources.megatron import (BACKEND_FILE, CARRIED_KEY, COMMON_FILE, OPTIMIZER_PREFIX, STACKED,
                                  STACKED_PREFIX, restrict)
from ucp.targets import Target, TargetUnit
from ucp.targets._distcp import DistcpWriter, distcp_name

DEFAULT_SPEC = "megatron_gpt"
RENAME_SPEC = "megatron_to_hf_llama"
BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
           "common_backend": "torch", "common_backend_version": 1}
#: Megatron-Core's linear layers expose an ``_extra_state`` (Transformer Engine fp8 state)
EXTRA_STATE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj",
                       "mlp.linear_fc1", "mlp.linear_fc2")


class MegatronTargetError(UcpError):
    """The universal checkpoint cannot be written as Megatron torch_dist at these degrees."""


_STACKED_NAMES = [(re.compile("^" + re.escape(pattern).replace(r"\{\}", r"(\d+)")), prefix)
                  for prefix, pattern in STACKED]


def stored_key(name: str) -> tuple[str, tuple[int, ...] | None]:
    """(ShardedTensor key, leading indices or None): layers (and experts) are stacked on
    leading axes, the inverse of the source's un-stacking (``ucp.sources.megatron.STACKED``)."""
    for regex, prefix in _STACKED_NAMES:
        m = regex.match(name)
        if m:
            return prefix + name[m.end():], tuple(int(g) for g in m.groups())
    return name, None


def shard_blocks(rule, shape, tp: int, rank: int, where: str) -> list[tuple[tuple, tuple]] | None:
    """Boxes of the stored global tensor (``shape``) that tp rank ``rank`` writes, from the
    rule's ``shard(over=tp)`` and ``parts`` ops; None when the tensor is replicated over tp
    (only tp rank 0 writes it). Gate/up parts are sharded each on their own (two boxes)."""
    shard = next((op for op in rule.ops if type(op).__name__ == "Shard" and op.axis == "tp"), None)
    if shard is None:
        return None if rank else [((0,) * len(shape), tuple(shape))]
    d = shard.dim
    parts = next((op for op in rule.ops if type(op).__name__ == "Parts" and op.dim == d and op.groups == 1), None)
    sizes = list(parts.sizes) if parts and parts.sizes else (
        [shape[d] // len(parts.names)] * len(parts.names) if parts else [shape[d]])
    boxes, offset = [], 0
    for n in sizes:
        if n % tp:
            raise MegatronTargetError(f"{where}: dim {d} of size {n} does not split evenly over tp={tp}")
        lo = offset + rank * (n // tp)
        start, stop = [0] * len(shape), list(shape)
        start[d], stop[d] = lo, lo + n // tp
        boxes.append((tuple(start), tuple(stop)))
        offset += n
    return boxes


class MegatronTarget(Target):
    """Writes Megatron-Core torch_dist checkpoints for a GPTModel at --tp/--pp."""
    name = "megatron"
    description = "Megatron-Core dist_checkpointing torch_dist (GPTModel at --tp N --pp M)"

    def __init__(self, dst, *, degrees=None, spec=None, storage_options=None, **options):
        super().__init__(dst, degrees=degrees, spec=spec, storage_options=storage_options, **options)
        self.reject_options()
        unknown = sorted(a for a, d in self.degrees.items()
                         if a not in ("tp", "pp", "ep", "vp") and d not in (None, 1))
        if unknown:
            raise MegatronTargetError(f"--to megatron takes --tp, --pp, --ep and vp; not {', '.join(unknown)} "
                                      "(data-parallel ranks hold replicas in torch_dist)")
        self.tp, self.pp, self.ep = (self.degrees.get(a, 1) for a in ("tp", "pp", "ep"))
        self.vp = self.degrees.get("vp", 1)   # virtual pipeline: model chunks per stage
        self._files = DistcpWriter(self.dst)
        self._objects: dict[str, Any] = {}
        self._common: dict[str, Any] = {}
        self._optim: list[str] = []

    # ------------------------------------------------------------------ planning
    def plan(self, checkpoint):
        self.check_destination()
        md = checkpoint.metadata if isinstance(checkpoint.metadata, dict) else {}
        names = list(checkpoint.params)
        shapes = {n: tuple(checkpoint.array_info(n, "param").shape) for n in names}
        views, constants = self._megatron_views(names, shapes, md)
        constants.pop("vocab_multiple", None)   # the source's binding detail, not the model's
        self._vocab_multiple = (md.get("megatron", {}).get("args") or {}).get("make_vocab_size_divisible_by")
        self._check_degrees(constants)
        meg_shapes = {t: s for t, (s, _) in views.items()}
        self._optim = self._optimizer_states(checkpoint, md)
        units = self._units(views, meg_shapes, shapes, constants)
        self._objects = self._carried_objects(md, constants)
        self._common = self._common_state(md, constants, meg_shapes)
        self._rels = [u.key for u in units]    # .metadata indexes them all, whoever wrote each
        return units

    @staticmethod
    def _optimizer_states(checkpoint, md) -> list[str]:
        """The optimizer states to write: those of a Megatron distributed optimizer, when every
        parameter has them (``[]``: the model weights only)."""
        if not (md.get("optimizer") or {}).get("sharding_type"):
            return []
        states = ["exp_avg", "exp_avg_sq"]
        return states if all(set(states) <= set(checkpoint.states(n)) for n in checkpoint.params) else []

    def _megatron_views(self, names, shapes, md):
        """``{Megatron name: (shape, segments over checkpoint tensors)}`` and the constants."""
        from ucp.lang import load
        from ucp.plan.renames import Segment
        from ucp.targets.hf import model_constants

        spec = load(self.spec or DEFAULT_SPEC)
        constants = model_constants(md, spec)
        bound = spec.bind(constants=constants)
        if all(bound.match(n) is not None for n in names):
            return {n: (shapes[n], [Segment(n)]) for n in names}, constants
        rename = load(RENAME_SPEC)
        rbound = rename.bind(constants=model_constants(md, rename))
        fused = []
        for n in names:
            t, _part = rename.rename(n)  # UnmatchedError lists names no rename maps
            if t not in fused:
                fused.append(t)
        return fused_views(rbound, fused, shapes), constants

    def _check_degrees(self, c) -> None:
        """Refuse degrees the model cannot take, naming the constraint."""
        problems = []
        if c.get("kv_heads") and c["kv_heads"] % self.tp:
            problems.append(f"tp={self.tp} does not divide the {c['kv_heads']} query groups")
        if c.get("heads") and c["heads"] % self.tp:
            problems.append(f"tp={self.tp} does not divide the {c['heads']} attention heads")
        if c.get("layers") and c["layers"] % (self.pp * self.vp):
            problems.append(f"pp={self.pp} x vp={self.vp} does not divide the {c['layers']} layers evenly")
        if self.ep > 1 and (not c.get("experts") or c["experts"] % self.ep):
            problems.append(f"ep={self.ep} needs a MoE model whose experts it divides "
                            f"(experts={c.get('experts', 0)})")
        if problems:
            raise MegatronTargetError(f"{self.dst}: cannot write a GPTModel at tp={self.tp}, pp={self.pp}"
                                      + (f", vp={self.vp}" if self.vp > 1 else "") + ": "
                                      + "; ".join(problems) + " (nothing written)")

    def _units(self, views, meg_shapes, shapes, constants) -> list[TargetUnit]:
        """One unit per rank (pp, ep, tp; tp fastest): the chunks that rank's main replica
        writes. Dense tensors are written by ep rank 0 only (experts ranks replicate them)."""
        placed, stored, whole = self._bindings(meg_shapes, constants)
        units = []
        for s, e, r in itertools.product(range(self.pp), range(self.ep), range(self.tp)):
            coords = {"pp": s, "ep": e, "tp": r}
            frags = []
            for n in meg_shapes:
                rule = stored.matches[n].rule
                expert = any(rn.axis == "ep" for rn in rule.renumber)
                if (expert or e == 0) and placed.holds(n, coords):
                    frags.extend(self._chunk_fragments(n, whole[n], rule, r, views[n][1], shapes))
            units.append(TargetUnit(key=distcp_name((s * self.ep + e) * self.tp + r), coords=coords,
                                    fragments=frags, states=["param", *self._optim]))
        lead = (int(constants.get("layers", 0)), int(constants.get("experts", 0)))
        self._global = {}
        for n in meg_shapes:
            key, index = stored_key(n)
            self._global[key] = lead[:len(index or ())] + whole[n].local_shape
        return units

    def _bindings(self, meg_shapes, constants):
        """The spec bound at (tp, pp) (who holds what) and at tp = 1 with the vocabulary padded
        for tp (universal boxes -> the stored global tensors), and the latter's fragments."""
        from ucp.engine import bind_layout, load_spec

        spec = load_spec(self.spec or DEFAULT_SPEC)
        self.vocab_multiple = int(self._vocab_multiple or spec_default(spec, "vocab_multiple"))
        placed = spec.bind(degrees={"tp": self.tp, "pp": self.pp, "ep": self.ep},
                           constants={**constants, "vocab_multiple": self.vocab_multiple, "vp": self.vp})
        stored = bind_layout(spec, list(meg_shapes), {}, {**constants, "vocab_multiple": self.vocab_multiple * self.tp})
        return placed, stored, {f.name: f for f in stored.rank_fragments(meg_shapes, {})}

    def _chunk_fragments(self, name, whole, rule, r, segments, shapes) -> list:
        """Fragments (over checkpoint names) of the chunks tp rank ``r`` writes of ``name``;
        each chunk's local name carries its key, layer and offsets for :meth:`write_unit`."""
        key, lead = stored_key(name)
        out = []
        for start, stop in shard_blocks(rule, whole.local_shape, self.tp, r, name) or []:
            local = f"{key}|{','.join(map(str, lead or ()))}|{','.join(map(str, start))}"
            f = replace(restrict(whole, start, stop), local_name=local, coords=(("tp", r),))
            out.extend(translate(f, segments, shapes))
        return out

    def _carried_objects(self, md, constants) -> dict[str, Any]:
        """ShardedObjects to write: carried from a Megatron source, else empty extra states."""
        objects = md.get("megatron", {}).get("objects")
        if objects:
            return dict(objects)
        n = int(constants.get("layers", 0))
        # stored as Megatron's torch_dist stores an object: the list of its values
        return {f"{STACKED_PREFIX}{m}._extra_state/shard_{i}_{n}": [None]
                for i in range(n) for m in EXTRA_STATE_MODULES}

    def _common_state(self, md, constants, meg_shapes) -> dict[str, Any]:
        """common.pt: iteration, args (Megatron-LM's names), the universal HF metadata as JSON."""
        meg = md.get("megatron", {})
        args = dict(meg.get("args") or {})
        hf_cfg = md.get("hf", {}).get("config") or {}
        if not meg.get("args"):
            args.update(llama_args(hf_cfg, constants))
            args.update({"make_vocab_size_divisible_by": self.vocab_multiple,
                         "padded_vocab_size": self._global.get("embedding.word_embeddings.weight", (None,))[0]})
        args.update({"tensor_model_parallel_size": self.tp, "pipeline_model_parallel_size": self.pp,
                     "virtual_pipeline_model_parallel_size": self.vp if self.vp > 1 else None})
        args.pop("params_dtype", None)
        # the optimizer's common state is rebuilt below (fully_reshardable) or left out
        common = {k: v for k, v in (meg.get("common") or {}).items() if k != "optimizer"}
        common.setdefault("iteration", md.get("iteration", 0))
        common["args"] = argparse.Namespace(**args)
        if md.get("hf"):
            common[CARRIED_KEY] = json.dumps({"hf": md["hf"]})
        if self._optim:
            groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()}
                      for g in md["optimizer"].get("param_groups") or []]
            common["optimizer"] = {"optimizer": {"param_groups": groups},
                                   "param_state_sharding_type": "fully_reshardable"}
        return common

    # ------------------------------------------------------------------ writing
    def write_unit(self, unit: TargetUnit, tensors) -> None:
        self.dst.mkdir(parents=True, exist_ok=True)
        items, seen = [], set()
        # the model key, then the optimizer's keys with the same chunks (``param`` = fp32 main param)
        prefixes = [("param", "")] + [(st, f"{OPTIMIZER_PREFIX}{st}.") for st in
                                      (["param", *self._optim] if self._optim else [])]
        for f in unit.fragments:
            if f.local_name in seen:
                continue
            seen.add(f.local_name)
            key, lead, start = (tuple(int(x) for x in part.split(",") if x) if i else part
                                for i, part in enumerate(f.local_name.split("|")))
            for state, prefix in prefixes:
                t = tensors[state][f.local_name]
                t = t.reshape((1,) * len(lead) + tuple(t.shape))       # the stacked leading axes
                items.append((prefix + key, lead + start, self._global_size(key), t))
        if not any(unit.coords.values()):
            items.extend((k, None, None, v) for k, v in self._objects.items())
        self._files.write(unit.key, items)

    def _global_size(self, key: str) -> tuple:
        if key not in self._global:
            raise MegatronTargetError(f"{key}: no global shape planned")
        return self._global[key]

    def finish(self, checkpoint) -> None:
        import torch

        self.dst.mkdir(parents=True, exist_ok=True)
        self._files.written += [self.dst / BACKEND_FILE, self.dst / COMMON_FILE]
        _atomic(self.dst / BACKEND_FILE, json.dumps(BACKEND).encode())
        buf = io.BytesIO()
        torch.save(self._common, buf)
        _atomic(self.dst / COMMON_FILE, buf.getvalue())
        self._files.finish(self._rels)

    def abort(self) -> None:
        self.remove_written(self._files.written + [p.with_name(p.name + ".partial") for p in self._files.written])


def _atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def spec_default(spec, name: str) -> int:
    """The default of a config constant (a literal)."""
    expr = spec.constants.get(name)
    return int(getattr(expr, "value", 1)) if expr is not None else 1


def llama_args(cfg: dict, constants: dict) -> dict:
    """Megatron-LM ``args`` for a model converted from an HF Llama config."""
    if not cfg:
        return {}
    return {"num_layers": cfg.get("num_hidden_layers"), "hidden_size": cfg.get("hidden_size"),
            "num_attention_heads": cfg.get("num_attention_heads"),
            "num_query_groups": cfg.get("num_key_value_heads"), "group_query_attention": True,
            "kv_channels": constants.get("head_dim"), "ffn_hidden_size": cfg.get("intermediate_size"),
            "swiglu": True, "normalization": "RMSNorm", "norm_epsilon": cfg.get("rms_norm_eps"),
            "add_qkv_bias": bool(cfg.get("attention_bias")), "add_bias_linear": bool(cfg.get("attention_bias")),
            "vocab_size": cfg.get("vocab_size"),
            "untie_embeddings_and_output_weights": not cfg.get("tie_word_embeddings", False),
            "position_embedding_type": "rope", "max_position_embeddings": cfg.get("max_position_embeddings")}
