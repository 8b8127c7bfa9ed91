"""Hugging Face ``save_pretrained`` layout as a target: sharded safetensors + index.

Names: a checkpoint converted from Hugging Face files keeps HF names and is written as it
is; any other (a Megatron GPT checkpoint) is mapped by a spec's ``rename`` rules (default
``converters/megatron_to_hf_llama.ucp``), fused QKV and ``[gate; up]`` unfused into their
HF tensors by ``ucp.plan.renames``. Vocabulary padding rows (Megatron pads the
embedding and output layer) are left out when ``config.json`` gives a smaller
``vocab_size``; a tied ``lm_head.weight`` is left out as ``save_pretrained`` does.

Files: ``model.safetensors`` when everything fits in ``--max-shard-size`` (default 5GB),
else ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``; each shard is
written under a ``.partial`` name and renamed in :meth:`HFTarget.finish`, which writes the
index last, so an interrupted export never looks like a checkpoint. ``config.json`` is
carried from the source (``metadata["hf"]["config"]``) or built from the Megatron model
constants, or given as ``config=`` (a path or a dict) for checkpoints that carry none (DCP,
DeepSpeed).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

from ucp.errors import UcpError
from ucp.plan import Box, Fragment, Piece
from ucp.plan.renames import Segment, split_views
from ucp.sources.hf import CARRIED_JSON, DEFAULT_SPEC, INDEX_FILE, SINGLE_FILE, TIED_PAIRS
from ucp.targets import Target, TargetUnit

DEFAULT_RENAME_SPEC = "megatron_to_hf_llama"
DEFAULT_MAX_SHARD = 5 * 10**9
PARTIAL = ".partial"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
#: HF tensors whose rows are the vocabulary
VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")


class HFTargetError(UcpError):
    """The universal checkpoint cannot be written as Hugging Face files (or bad options)."""


def parse_size(value) -> int:
    """Bytes from ``5GB`` / ``500MiB`` / ``1000000`` (HF's convention: GB = 10**9)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(value).upper())
        if not m:
            raise HFTargetError(f"--max-shard-size {value!r}: expected bytes or a size such as 5GB, 500MiB")
        size = int(float(m.group(1)) * _UNITS[m.group(2) or ""])
    if size <= 0:
        raise HFTargetError(f"--max-shard-size {value!r}: must be positive")
    return size


def shard_names(n: int) -> list[str]:
    """HF's shard file names for ``n`` shards (one shard: ``model.safetensors``)."""
    if n == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def group_by_size(sizes: Mapping[str, int], limit: int) -> list[list[str]]:
    """Consecutive tensors into shards of at most ``limit`` bytes (a bigger tensor alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes.items():
        if shards[-1] and used + n > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return [s for s in shards if s]


class HFTarget(Target):
    """Writes ``save_pretrained``-style safetensors shards, an index and config.json."""
    name = "hf"
    description = "Hugging Face safetensors (sharded, with index and config.json)"

    def __init__(self, dst, *, degrees=None, spec=None, storage_options=None, max_shard_size=None,
                 config=None, **options):
        super().__init__(dst, degrees=degrees, spec=spec, storage_options=storage_options, **options)
        bad = {a: d for a, d in self.degrees.items() if d not in (None, 1)}
        if bad:
            raise HFTargetError(f"--to hf writes whole tensors; parallel degrees {bad} do not apply")
        self.reject_options()
        self.max_shard = parse_size(max_shard_size) if max_shard_size is not None else DEFAULT_MAX_SHARD
        self.config = _given_config(config)
        self._written: list[Path] = []
        self._index: dict[str, str] = {}
        self._config: dict | None = None
        self._extra: dict[str, Any] = {}
        self._total = 0
        self._finishing = False

    # ------------------------------------------------------------------ planning
    def plan(self, checkpoint):
        self.check_destination()
        md = checkpoint.metadata if isinstance(checkpoint.metadata, dict) else {}
        names = list(checkpoint.params)
        shapes = {n: tuple(checkpoint.array_info(n, "param").shape) for n in names}
        views = self._views(names, shapes, md, getattr(checkpoint, "path", checkpoint))
        self._config = self.config or hf_config(md, views)
        if not self._config and os.environ.get("RANK", "0") == "0":    # once in a torchrun job
            warnings.warn(f"{self.dst}: no config.json written: the checkpoint carries none "
                          f"({md.get('source', {}).get('format', 'unknown')} source); pass config= "
                          "(--config) with the model's config.json for from_pretrained to load it",
                          stacklevel=2)
        vocab = self._config.get("vocab_size") if self._config else None
        tied = bool(self._config.get("tie_word_embeddings")) if self._config else False
        frags = {}
        for hf_name, (shape, seg) in views.items():
            if tied and hf_name in TIED_PAIRS and TIED_PAIRS[hf_name] in views:
                continue
            if hf_name in VOCAB_ROWS and vocab and shape[0] > vocab:
                shape = (vocab,) + tuple(shape[1:])   # Megatron's vocabulary padding rows
            frags[hf_name] = _fragment(hf_name, shape, seg, shapes[seg.name])
        itemsize = {n: checkpoint.array_info(n, "param").dtype.itemsize for n in names}
        sizes = {t: f.local_numel * itemsize[f.name] for t, f in frags.items()}
        groups = group_by_size(sizes, self.max_shard)
        units = []
        for fname, members in zip(shard_names(len(groups)), groups):
            units.append(TargetUnit(key=fname, coords={}, fragments=[frags[t] for t in members],
                                    states=["param"]))
            self._index.update({t: fname for t in members})
        self._total = sum(sizes.values())
        self._extra = {k: v for k, v in md.get("hf", {}).items()
                       if k in {c.removesuffix(".json") for c in CARRIED_JSON} and k != "config"}
        return units

    def _views(self, names, shapes, md, where) -> dict[str, tuple[tuple[int, ...], Segment]]:
        """``{HF name: (shape, where it lies in a checkpoint tensor)}`` (``where``: the checkpoint, for errors)."""
        from ucp.lang import load

        if self.spec is None and _all_match(load(DEFAULT_SPEC), names):
            return {n: (shapes[n], Segment(n)) for n in names}
        spec = load(self.spec or DEFAULT_RENAME_SPEC)
        if not spec.renames and _all_match(spec, names):
            return {n: (shapes[n], Segment(n)) for n in names}
        if self.spec is None:   # the default rename rules: do they take any of these names?
            sources = [r.source.regex() for r in spec.renames]
            if not any(rx.fullmatch(n) for rx in sources for n in names):
                raise HFTargetError(
                    f"{where}: the parameter names are neither Hugging Face Llama names nor Megatron GPT "
                    f"names (the default {DEFAULT_RENAME_SPEC} spec maps none of them): "
                    f"{', '.join(names[:6])}{' ...' if len(names) > 6 else ''}; pass --spec with rename "
                    "rules to the HF names (a torchtitan Llama's q/k rows also differ from HF's rotary "
                    "order, which rename rules cannot express)")
        bound = spec.bind(constants=model_constants(md, spec, self.config, config_option=True))
        return split_views(bound, names, shapes)

    # ------------------------------------------------------------------ writing
    def write_unit(self, unit: TargetUnit, tensors) -> None:
        from safetensors.torch import save_file

        self.dst.mkdir(parents=True, exist_ok=True)
        local = tensors.get("param", {})
        ordered = {f.local_name: local[f.local_name].contiguous() for f in unit.fragments}
        path = self.dst / (unit.key + PARTIAL)
        self._written.append(path)
        save_file(ordered, str(path), metadata={"format": "pt"})

    def finish(self, checkpoint) -> None:
        self.dst.mkdir(parents=True, exist_ok=True)
        self._finishing = True
        if self._config:
            _write_json(self.dst / "config.json", self._config)
        for name, doc in self._extra.items():
            _write_json(self.dst / f"{name}.json", doc)
        files = sorted(set(self._index.values()))
        for f in files:
            os.replace(self.dst / (f + PARTIAL), self.dst / f)
        if len(files) > 1:   # total_size: tensor bytes, as save_pretrained counts them
            _write_json(self.dst / INDEX_FILE, {"metadata": {"total_size": self._total}, "weight_map": self._index})

    def abort(self) -> None:
        done = []
        if self._finishing:   # the folder was empty when planned: these are this export's
            done = [self.dst / f for f in set(self._index.values())] + \
                [self.dst / n for n in ("config.json", INDEX_FILE, *(f"{x}.json" for x in self._extra))]
        self.remove_written(self._written + done + [p.with_name(p.name + PARTIAL) for p in done])


def _given_config(config) -> dict | None:
    """``config=``: a config.json path or a dict, for checkpoints that carry none (DCP,
    DeepSpeed); it wins over a carried one."""
    if config is None or isinstance(config, dict):
        return config
    from ucp.sources.hf import read_json

    p = Path(config)
    p = p / "config.json" if p.is_dir() else p
    if not p.is_file():
        raise HFTargetError(f"config={config!r}: no such config.json")
    doc = read_json(p)
    if not isinstance(doc, dict):
        raise HFTargetError(f"{p}: a config.json holds a JSON object")
    return doc


def _fragment(hf_name: str, shape, seg: Segment, src_shape) -> Fragment:
    """The one-piece fragment that fills HF tensor ``hf_name`` from its checkpoint tensor."""
    start = [0] * len(shape)
    stop = list(shape)
    if seg.dim is not None:
        start[seg.dim] = seg.start
        stop[seg.dim] = seg.start + shape[seg.dim]
    return Fragment(name=seg.name, local_name=hf_name, coords=(), local_shape=tuple(shape),
                    pieces=(Piece(Box(tuple(start), tuple(stop)), Box.full(shape)),),
                    global_shape=tuple(src_shape))


def _all_match(spec, names) -> bool:
    bound = spec.bind()
    return all(bound.match(n) is not None for n in names)


def _write_json(path: Path, doc) -> None:
    tmp = path.with_name(path.name + PARTIAL)
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def model_constants(md: Mapping, spec, config: Mapping | None = None, *,
                    config_option: bool = False) -> dict[str, int]:
    """The constants a spec needs (layers, heads, kv_heads, head_dim, ...): recorded by the
    Megatron source in the checkpoint's metadata, else read from ``config`` (an HF config.json
    the user gave) or from the HF config.json the checkpoint carries. ``config_option``: the
    caller takes a config.json (``--config`` / ``config=``), and the error says so."""
    recorded = dict(md.get("megatron", {}).get("constants", {}))
    cfg = config or md.get("hf", {}).get("config", {})
    if cfg and not recorded:
        heads = cfg.get("num_attention_heads")
        hidden = cfg.get("hidden_size")
        recorded = {"layers": cfg.get("num_hidden_layers"), "heads": heads,
                    "kv_heads": cfg.get("num_key_value_heads") or heads,
                    "head_dim": cfg.get("head_dim") or (hidden // heads if hidden and heads else None)}
    need = spec.constants_needed
    missing = [c for c in need if recorded.get(c) is None and spec.constants.get(c) is None]
    if missing:
        if config:
            why = ("the given config.json lacks them (num_hidden_layers, num_attention_heads, "
                   "num_key_value_heads, head_dim or hidden_size)")
        else:
            why = "the checkpoint records neither a Megatron model config nor an HF config.json"
            if config_option:
                why += ": pass the model's config.json as --config PATH (Python: config=PATH)"
        raise HFTargetError(f"spec {spec.name} needs the model constants {', '.join(missing)}; {why}")
    return {k: int(v) for k, v in recorded.items() if k in spec.configs and v is not None}


def hf_config(md: Mapping, views) -> dict | None:
    """config.json: carried from an HF source, else built from a Megatron source's args."""
    cfg = md.get("hf", {}).get("config")
    if cfg:
        return dict(cfg)
    meg = md.get("megatron", {})
    return llama_config(meg["args"], meg.get("constants", {}), views) if meg.get("args") else None


def llama_config(args: Mapping, c: Mapping, views) -> dict:
    """A ``LlamaForCausalLM`` config.json from Megatron-LM's ``args`` and the model constants
    (vocab_size: the unpadded vocabulary when args record it)."""
    emb = views.get("model.embed_tokens.weight")
    vocab = args.get("vocab_size") or (emb[0][0] if emb else None)
    dtype = args.get("params_dtype") or "float32"
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": args.get("hidden_size"), "intermediate_size": args.get("ffn_hidden_size"),
            "num_hidden_layers": c.get("layers"), "num_attention_heads": c.get("heads"),
            "num_key_value_heads": c.get("kv_heads"), "head_dim": c.get("head_dim"), "vocab_size": vocab,
            "rms_norm_eps": args.get("norm_epsilon", 1e-5), "rope_theta": args.get("rotary_base", 10000),
            "max_position_embeddings": args.get("max_position_embeddings") or args.get("seq_length"),
            "tie_word_embeddings": "lm_head.weight" not in views,
            "attention_bias": bool(args.get("add_qkv_bias")), "mlp_bias": bool(args.get("add_bias_linear")),
            "torch_dtype": dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")}
