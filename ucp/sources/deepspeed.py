"""Source ``deepspeed``: a DeepSpeed ZeRO 1/2/3 save directory, read without running its code.

DeepSpeed writes, per tag folder (``global_step3/``, named by ``latest``):

* ``mp_rank_00_model_states.pt`` (ZeRO-1/2) or ``zero_pp_rank_{r}_mp_rank_00_model_states.pt``
  (ZeRO-3, one per data-parallel rank): the module weights in the model dtype (empty under
  ZeRO-3), ``param_shapes`` (one ordered dict per optimizer group / ZeRO-3 sub-group), frozen
  parameters (``frozen_param_fragments``: whole under ZeRO-1/2, rank r's 1-D partition under
  ZeRO-3), tied parameters (``shared_params``, only rank 0's file under ZeRO-3), the lr
  scheduler, iteration counters, the config and the client state.
* ``[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt``: rank r's fp32 master partition and
  the Adam moments over it. ZeRO-1/2: one flat partition per param group
  (``single_partition_of_fp32_groups``) with DeepSpeed's own map of where each parameter lies
  in it (``param_slice_mappings``; padding stripped). ZeRO-3: per ``sub_group_size`` sub-group,
  the concatenation of every member parameter's own rank-r partition (``ceil(numel / dp)``
  elements, the last rank's padded).

The fragments come from that saved metadata (``param_slice_mappings``, ``param_shapes``), so
the layout is exactly what DeepSpeed recorded, whatever its alignment or ordering options. The
pickles are loaded with ``torch.load(weights_only=True)`` and :data:`ALLOWED_GLOBALS`: stand-in
classes under DeepSpeed's qualified names, so neither DeepSpeed nor any pickled code is needed,
and a pickle naming any other global is refused with the global's name.
"""
from __future__ import annotations

import dataclasses
import math
import enum
import re
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Optional

from ucp.errors import UcpError
from ucp.sources import Source, SourceLayout, SourceParam


class DeepSpeedError(UcpError):
    """A DeepSpeed checkpoint is incomplete, inconsistent or not loadable safely."""


# ------------------------------------------------------------------ the pickle allow-list
@dataclasses.dataclass
class FragmentAddress:
    """Stand-in for ``deepspeed.utils.tensor_fragment.fragment_address`` (numel, start)."""
    numel: int = 0
    start: int = 0


class ZeroStage(enum.IntEnum):
    """Stand-in for ``deepspeed.runtime.zero.config.ZeroStageEnum``."""
    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3
    max_stage = 3


class LossScalerState:
    """Stand-in for DeepSpeed's loss scalers: keeps the pickled attributes as a plain dict."""

    def __setstate__(self, state):
        self.__dict__.update(state)

    def to_json(self) -> dict:
        import torch

        return {k: v for k, v in vars(self).items()
                if isinstance(v, (int, float, bool, str, type(None), torch.dtype))}


#: (stand-in, DeepSpeed's qualified name): every non-torch global a DeepSpeed 0.x checkpoint
#: pickles. ``torch.load(weights_only=True)`` allows torch's own tensor globals by itself.
ALLOWED_GLOBALS = [
    (FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address"),
    (ZeroStage, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (LossScalerState, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (LossScalerState, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
]


def load_pickle(path: Path) -> dict:
    """``torch.load`` a DeepSpeed file memory-mapped, with only :data:`ALLOWED_GLOBALS` beyond
    torch's weights-only set; every failure names the file (and the refused global)."""
    import torch

    if not path.is_file():
        raise DeepSpeedError(f"{path}: file is missing")
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for truncated or hostile files
        msg = str(e)
        hit = re.search(r"GLOBAL ([\w.]+)", msg) or re.search(r"Unsupported global: ([\w.]+)", msg)
        if hit:
            raise DeepSpeedError(f"{path}: refuses to unpickle global {hit.group(1)} (not in the "
                                 f"DeepSpeed allow-list; see docs/deepspeed.md)") from None
        first = msg.strip().splitlines()[0] if msg.strip() else ""
        raise DeepSpeedError(f"{path}: cannot be read as a DeepSpeed checkpoint file, truncated or "
                             f"corrupt? ({type(e).__name__}: {first})") from None


# ------------------------------------------------------------------ finding the files
OPTIM_RE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
MODEL_RE = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")


def tag_dir(path) -> Path:
    """The folder holding the rank files: ``path`` itself, or the tag ``latest`` names."""
    p = Path(path)
    if any(p.glob("*model_states.pt")):
        return p
    latest = p / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if not (p / tag).is_dir():
            raise DeepSpeedError(f"{latest}: names tag {tag!r} but {p / tag} does not exist")
        return p / tag
    raise DeepSpeedError(f"{p}: no 'latest' file and no *model_states.pt: not a DeepSpeed checkpoint")


@dataclasses.dataclass(frozen=True)
class RankFiles:
    """The rank files of one tag folder (tensor-parallel rank 0; mp_rank > 0 is refused)."""
    folder: Path
    model: dict[int, Path]        # dp rank -> model states (ZeRO-1/2: only rank 0)
    optim: dict[int, Path]        # dp rank -> optimizer states

    @staticmethod
    def scan(folder: Path) -> "RankFiles":
        model, optim = {}, {}
        for f in sorted(folder.iterdir()):
            m, o = MODEL_RE.match(f.name), OPTIM_RE.match(f.name)
            if o:
                if int(o.group(3)):
                    raise DeepSpeedError(f"{f}: tensor-parallel DeepSpeed checkpoints (mp_rank > 0) are not "
                                         f"supported by the deepspeed source")
                optim[int(o.group(2))] = f
            elif m:
                if int(m.group(2)):
                    raise DeepSpeedError(f"{f}: tensor-parallel DeepSpeed checkpoints (mp_rank > 0) are not "
                                         f"supported by the deepspeed source")
                model[int(m.group(1) or 0)] = f
        if not model:
            raise DeepSpeedError(f"{folder}: no *model_states.pt file")
        return RankFiles(folder, model, optim)

    def check_world(self, dp: int, stage: int, optim_name) -> None:
        """Every rank file the saved world size implies is there, and no other."""
        want = set(range(dp))
        for kind, have, name in (("optimizer", self.optim, optim_name),
                                 ("model", self.model if stage == 3 else None, model_name)):
            if have is None:
                continue
            missing, extra = sorted(want - set(have)), sorted(set(have) - want)
            if missing:
                raise DeepSpeedError(f"{self.folder / name(missing[0])}: {kind} states file is missing "
                                     f"(the checkpoint was saved by {dp} data-parallel ranks)")
            if extra:
                raise DeepSpeedError(f"{have[extra[0]]}: world size mismatch: the checkpoint records "
                                     f"dp_world_size={dp} but this is rank {extra[0]}'s file")


def model_name(rank: int) -> str:
    return f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"


# ------------------------------------------------------------------ fragments
def flat_pieces(shape, lo: int, hi: int, local_start: int):
    """Pieces mapping the flat range ``[lo, hi)`` of a tensor of ``shape`` onto the local
    1-D range starting at ``local_start`` (one piece per row-major box)."""
    from ucp.plan import Box, Piece, flat_to_boxes

    pieces, at = [], local_start
    for box in flat_to_boxes(lo, hi, shape):
        pieces.append(Piece(box, Box((at,), (at + box.numel,))))
        at += box.numel
    return tuple(pieces)


def flat_fragment(name, shape, rank, local_name, local_len, lo, hi, local_start, origin):
    from ucp.plan import Fragment

    return Fragment(name=name, local_name=local_name, coords=(("dp", rank),), local_shape=(local_len,),
                    pieces=flat_pieces(shape, lo, hi, local_start), global_shape=tuple(shape),
                    group=local_name, origin=origin)


def whole_fragment(name, shape, origin):
    from ucp.plan import Box, Fragment, Piece

    box = Box((0,) * len(shape), tuple(shape))
    return Fragment(name=name, local_name=name, coords=(("dp", 0),), local_shape=tuple(shape),
                    pieces=(Piece(box, box),) if box.numel else (), global_shape=tuple(shape),
                    origin=origin)


def zero3_partition(numel: int, dp: int) -> int:
    """ZeRO-3's per-parameter partition size (``ceil(numel / dp)``; the last rank padded)."""
    return -(-numel // dp)


def zero3_buffer(members, dp: int, rank: int, local_name: str, origin: str) -> tuple[int, list]:
    """(length, fragments) of rank ``rank``'s ZeRO-3 buffer holding ``members`` ((name, shape)
    pairs in order): each member's own ``ceil(numel / dp)`` partition, concatenated (DeepSpeed's
    fp32 sub-group buffers, and frozen partitions as one-member buffers)."""
    frags, local = [], 0
    for name, shape in members:
        numel, size = math.prod(shape), zero3_partition(math.prod(shape), dp)
        frags.append((name, shape, min(rank * size, numel), min((rank + 1) * size, numel), local))
        local += size
    return local, [flat_fragment(n, tuple(shape), rank, local_name, local, a, b, at, origin)
                   for n, shape, a, b, at in frags]


# ------------------------------------------------------------------ the source
class DeepSpeedSource(Source):
    name = "deepspeed"
    description = "DeepSpeed ZeRO 1/2/3 save directory (folder with 'latest', or a tag folder)"
    priority = 40

    @classmethod
    def detect(cls, path) -> bool:
        p = Path(path)
        if not p.is_dir():
            return False
        if any(p.glob("*model_states.pt")):
            return True
        latest = p / "latest"
        return latest.is_file() and any((p / latest.read_text().strip()).glob("*model_states.pt"))

    def __init__(self, path, **kw):
        super().__init__(path, **kw)
        self.reject_options()
        self.folder = tag_dir(path)
        self.files = RankFiles.scan(self.folder)
        self._loaded: dict[Path, dict] = {}

    # -- file access
    def _file(self, path: Path) -> dict:
        if path not in self._loaded:
            self._loaded[path] = load_pickle(path)
        return self._loaded[path]

    def _optim(self, rank: int) -> dict:
        path = self.files.optim[rank]
        sd = self._file(path).get("optimizer_state_dict")
        if not isinstance(sd, dict):
            raise DeepSpeedError(f"{path}: no 'optimizer_state_dict' (not a ZeRO optimizer states file)")
        return sd

    @cached_property
    def model0(self) -> dict:
        return self._file(self.files.model[0])

    @cached_property
    def stage(self) -> int:
        if not self.files.optim:
            raise DeepSpeedError(f"{self.folder}: no *optim_states.pt file (saved without optimizer "
                                 f"states, or not a ZeRO checkpoint)")
        stage = self._optim(min(self.files.optim)).get("zero_stage")
        if stage is None:
            raise DeepSpeedError(f"{self.files.optim[min(self.files.optim)]}: no 'zero_stage' recorded")
        return int(stage)

    @cached_property
    def dp(self) -> int:
        dp = int(self.model0.get("dp_world_size", 0))
        if dp < 1:
            raise DeepSpeedError(f"{self.files.model[0]}: no valid dp_world_size recorded")
        return dp

    # -- layout
    def layout(self) -> SourceLayout:
        files, dp, stage = self.files, self.dp, self.stage
        prefix = "bf16_" if any(p.name.startswith("bf16_") for p in files.optim.values()) else ""
        files.check_world(dp, stage, lambda r: f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        self._check_same_save()
        build = self._zero3_params if stage == 3 else self._zero12_params
        trainable = build()
        params = self._ordered(trainable)
        return SourceLayout(params=params, metadata=self._metadata(),
                            degrees={"dp": dp}, constants={"zero_stage": stage})

    def _check_same_save(self) -> None:
        """Rank files of one save agree on the optimizer step (files of two tags do not)."""
        seen = None
        for r in sorted(self.files.optim):
            steps = {_scalar(st.get("step")) for st in self._base_state(r)["state"].values()}
            if seen is None:
                seen = (steps, r)
            elif steps != seen[0]:
                raise DeepSpeedError(f"{self.files.optim[r]}: optimizer step {sorted(steps)} differs from "
                                     f"{sorted(seen[0])} in {self.files.optim[seen[1]].name}: rank files "
                                     f"of different saves (tags) are mixed")
        if self.stage == 3:
            its = {r: self._file(p).get("global_steps") for r, p in self.files.model.items()}
            if len(set(its.values())) > 1:
                r = next(r for r, v in its.items() if v != its[0])
                raise DeepSpeedError(f"{self.files.model[r]}: global_steps {its[r]} differs from {its[0]} "
                                     f"in {self.files.model[0].name}: rank files of different saves are mixed")

    def _base_state(self, rank: int) -> dict:
        sd = self._optim(rank)
        key = "optimizer_state_dict" if self.stage == 3 else "base_optimizer_state"
        base = sd.get(key)
        if not isinstance(base, dict) or "state" not in base:
            raise DeepSpeedError(f"{self.files.optim[rank]}: no optimizer state ('{key}')")
        return base

    def _group_of_local(self) -> dict[int, int]:
        """Optimizer state index (ZeRO-1/2 group, ZeRO-3 sub-group) -> torch param group."""
        out = {}
        for gi, g in enumerate(self._base_state(0)["param_groups"]):
            for idx in g["params"]:
                out[int(idx)] = gi
        return out

    def _states_of(self, index: int) -> tuple[list[str], dict]:
        st = self._base_state(0)["state"].get(index, {})
        tensors = [k for k, v in st.items() if _is_tensor(v) and v.ndim == 1]
        scalars = {k: _scalar(v) for k, v in st.items() if k not in tensors}
        return tensors, scalars

    def _zero12_params(self) -> dict[str, SourceParam]:
        """ZeRO-1/2: each rank's slice of each parameter, where ``param_slice_mappings`` puts it
        in the rank's partition of the group; ranks hold consecutive slices. The fp32 partition
        is saved with the group padding stripped, the Adam moments with it: the same pieces in
        local tensors of two lengths."""
        import torch

        shapes = self.model0.get("param_shapes") or []
        out = {}
        group_of = self._group_of_local()
        for g, group_shapes in enumerate(shapes):
            states, scalars = self._states_of(g)
            frags = {n: {st: [] for st in ["param", *states]} for n in group_shapes}
            at = {n: 0 for n in group_shapes}          # flat offset reached per parameter
            for r in range(self.dp):
                sd, origin = self._optim(r), f"{self.files.optim[r].name}:param_slice_mappings[{g}]"
                lengths = {st: self._local_state(r, g, st).numel() for st in ["param", *states]}
                for n, addr in sd["param_slice_mappings"][g].items():
                    for st, length in lengths.items():
                        frags[n][st].append(flat_fragment(n, tuple(group_shapes[n]), r, f"group{g}", length,
                                                          at[n], at[n] + addr.numel, addr.start, origin))
                    at[n] += addr.numel
            for n, shape in group_shapes.items():
                out[n] = SourceParam(name=n, shape=tuple(shape),
                                     dtypes={"param": torch.float32, **{s: torch.float32 for s in states}},
                                     fragments=frags[n]["param"], state_fragments=frags[n], scalars=scalars,
                                     meta={"optimizer_group": group_of.get(g, g), "zero_stage": self.stage})
        return out

    def _zero3_params(self) -> dict[str, SourceParam]:
        import torch

        shapes = self.model0.get("param_shapes") or []
        flat0 = self._optim(0).get("fp32_flat_groups")
        if not isinstance(flat0, list) or len(flat0) != len(shapes):
            raise DeepSpeedError(f"{self.files.optim[0]}: {len(flat0 or [])} fp32 sub-groups but "
                                 f"{self.files.model[0].name} lists {len(shapes)}")
        group_of = self._group_of_local()
        out = {}
        for i, sub in enumerate(shapes):
            states, scalars = self._states_of(i)
            frags = {n: [] for n in sub}
            for r in range(self.dp):
                length, held = zero3_buffer(list(sub.items()), self.dp, r, f"sub{i}",
                                            f"{self.files.optim[r].name}:fp32_flat_groups[{i}]")
                got = self._optim(r)["fp32_flat_groups"][i].numel()
                if got != length:
                    raise DeepSpeedError(f"{self.files.optim[r]}: fp32 sub-group {i} holds {got} elements, "
                                         f"its parameters' partitions need {length} (world size {self.dp})")
                for f in held:
                    frags[f.name].append(f)
            for n, shape in sub.items():
                out[n] = SourceParam(name=n, shape=tuple(shape),
                                     dtypes={"param": torch.float32, **{s: torch.float32 for s in states}},
                                     fragments=frags[n], scalars=scalars,
                                     meta={"optimizer_group": group_of.get(i, i), "zero_stage": 3,
                                           "sub_group": i})
        return out

    def _frozen_params(self, trainable) -> dict[str, SourceParam]:
        """Frozen parameters, in the model dtype: ZeRO-3's 1-D partitions
        (``frozen_param_fragments`` of every rank), or under ZeRO-1/2 the module weights that no
        optimizer group holds (ZeRO-1 records no ``frozen_param_shapes`` at all)."""
        if self.stage == 3:
            return {n: self._frozen3(n, tuple(s)) for n, s in (self.model0.get("frozen_param_shapes") or {}).items()}
        skip = set(trainable) | set(self.model0.get("shared_params") or {}) | set(self.model0.get("buffer_names") or [])
        module = self.model0.get("module") or {}
        origin = f"{self.files.model[0].name}:module"
        return {n: SourceParam(name=n, shape=tuple(t.shape), dtypes={"param": t.dtype},
                               fragments=[whole_fragment(n, tuple(t.shape), origin)],
                               meta={"frozen": True, "zero_stage": self.stage})
                for n, t in module.items() if n not in skip}

    def _frozen3(self, name: str, shape: tuple) -> SourceParam:
        frags = [zero3_buffer([(name, shape)], self.dp, r, f"frozen:{name}",
                              f"{self.files.model[r].name}:frozen_param_fragments")[1][0] for r in range(self.dp)]
        dtype = self.model0["frozen_param_fragments"][name].dtype
        return SourceParam(name=name, shape=shape, dtypes={"param": dtype}, fragments=frags,
                           meta={"frozen": True, "zero_stage": 3})

    def _ordered(self, trainable: dict[str, SourceParam]) -> list[SourceParam]:
        """Model order (the module's state dict), frozen ones included, tied ones last-named."""
        every = {**trainable, **self._frozen_params(trainable)}
        tied = dict(self.model0.get("shared_params") or {})
        order = [n for n in (self.model0.get("module") or {}) if n in every or n in tied]
        order += [n for n in every if n not in order]
        out = []
        for n in order:
            if n in every:
                out.append(every[n])
            elif tied[n] in every:
                p = every[tied[n]]
                rename = lambda frags: [dataclasses.replace(f, name=n) for f in frags]  # noqa: E731
                out.append(dataclasses.replace(p, name=n, meta={**p.meta, "tied_to": tied[n]},
                                               fragments=rename(p.fragments),
                                               state_fragments={st: rename(fs) for st, fs in p.state_fragments.items()}))
            else:
                raise DeepSpeedError(f"{self.files.model[0]}: shared parameter {n} is tied to {tied[n]}, "
                                     f"which the checkpoint does not hold")
        return out

    # -- metadata
    def _metadata(self) -> dict:
        m, opt0 = self.model0, self._optim(0)
        client = {k: v for k, v in m.items() if k not in MODEL_KEYS}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self._base_state(0)["param_groups"]]
        scaler = opt0.get("loss_scaler")
        return {
            "iteration": m.get("global_steps"),
            "lr_scheduler": m.get("lr_scheduler"),
            "client_state": client,
            "optimizer": {"param_groups": groups},
            "deepspeed": {
                "zero_stage": self.stage, "dp_world_size": self.dp, "ds_version": m.get("ds_version"),
                "ds_config": m.get("ds_config"), "global_steps": m.get("global_steps"),
                "global_samples": m.get("global_samples"), "skipped_steps": m.get("skipped_steps"),
                "loss_scaler": scaler.to_json() if isinstance(scaler, LossScalerState) else None,
                "dynamic_loss_scale": opt0.get("dynamic_loss_scale"), "overflow": opt0.get("overflow"),
                "clip_grad": opt0.get("clip_grad"),
                "bf16_files": any(p.name.startswith("bf16_") for p in self.files.optim.values()),
            },
        }

    # -- tensors
    def local(self, fragment, state: str):
        rank = fragment.coord("dp")
        ln = fragment.local_name
        if ln.startswith("frozen:"):
            t = self._file(self.files.model[rank])["frozen_param_fragments"][ln[len("frozen:"):]]
            t = t.reshape(-1) if self.stage == 3 else t
        elif ln.startswith("group") or ln.startswith("sub"):
            index = int(ln.removeprefix("group").removeprefix("sub"))
            t = self._local_state(rank, index, state)
        else:
            t = self.model0["module"][ln]
        if tuple(t.shape) != tuple(fragment.local_shape):
            raise DeepSpeedError(f"{self.describe(fragment, state)}: shape {tuple(t.shape)}, DeepSpeed's "
                                 f"metadata implies {tuple(fragment.local_shape)}")
        return t

    def describe(self, fragment, state: str) -> str:
        rank = fragment.coord("dp")
        files = self.files.model if fragment.local_name.startswith("frozen:") or "." in fragment.local_name \
            else self.files.optim
        return f"{files.get(rank, self.folder)}: {state} of {fragment.name} ({fragment.local_name})"

    def _local_state(self, rank: int, index: int, state: str):
        if state == "param":
            key = "fp32_flat_groups" if self.stage == 3 else "single_partition_of_fp32_groups"
            return self._optim(rank)[key][index]
        st = self._base_state(rank)["state"].get(index, {})
        if state not in st:
            raise DeepSpeedError(f"{self.files.optim[rank]}: no optimizer state {state!r} for group {index}")
        return st[state]

    def close(self) -> None:
        self._loaded.clear()


#: keys DeepSpeed itself writes into model states; every other key is the user's client state
MODEL_KEYS = frozenset({
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
    "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
    "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config",
    "ds_version", "checkpoint_parallel_dimensions", "mp_world_size",
})


def _is_tensor(v) -> bool:
    import torch

    return isinstance(v, torch.Tensor)


def _scalar(v):
    """A 0-d tensor (Adam ``step``) as a Python number: int when integral."""
    if _is_tensor(v):
        v = v.item()
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v
