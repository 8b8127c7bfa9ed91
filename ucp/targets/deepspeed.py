"""Target ``deepspeed``: the files N data-parallel ranks at ZeRO stage S would have saved, which
DeepSpeed's own ``engine.load_checkpoint(dir, load_optimizer_states=True)`` resumes from.

``ucp export SRC DST --to deepspeed --dp N --zero-stage S [--dtype fp32|bf16|fp16]
[--sub-group-size M] [--tag T]``. The layout is DeepSpeed's (runtime/zero/stage_1_and_2.py and
stage3.py), computed from the parameters alone, so any source and any stage can be written:

* ZeRO-1/2: per torch param group, the trainable parameters (model order) flattened into one
  buffer padded to a multiple of 2 * N, split into N equal partitions. Rank r saves its fp32
  partition with the group padding stripped (last rank), the Adam moments unstripped, and
  ``param_slice_mappings``. Frozen weights are whole in the module (and, at stage 2,
  ``frozen_param_fragments``).
* ZeRO-3: each parameter partitioned on its own into ``ceil(numel / N)`` elements per rank
  (last rank padded); per group, consecutive parameters form sub-groups of at least
  ``sub_group_size`` partition elements; rank r's fp32 sub-group buffer is the concatenation of
  its members' partitions. Frozen weights are 1-D partitions in every rank's model states.

Which group a parameter belongs to comes from its ``optimizer_group`` metadata (recorded by
the DeepSpeed sources and by the DCP ones from the groups' ``params``; group 0 otherwise), the groups' hyper-parameters from
``metadata["optimizer"]["param_groups"]``. Writing DeepSpeed's pickles needs DeepSpeed
installed (its loss scaler, ZeRO stage enum and fragment address classes are pickled by
reference, as DeepSpeed itself saves them).
"""
from __future__ import annotations

import math
import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, TYPE_CHECKING

from ucp.errors import UcpError
from ucp.sources.deepspeed import flat_fragment, whole_fragment, zero3_buffer, zero3_partition
from ucp.targets import Target, TargetUnit, check_states_shaped_as_params, is_count

if TYPE_CHECKING:
    import torch

#: --dtype -> the torch dtype's name (the run's model dtype)
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
ZERO_ALIGN = 2  # stage_1_and_2.py: nccl_start_alignment_factor


class DeepSpeedTargetError(UcpError):
    pass


# ------------------------------------------------------------------ the model, from the checkpoint
@dataclass
class Model:
    """What the layout depends on: parameters in model order, shapes, frozen, tied, groups."""
    names: list[str]
    shapes: dict[str, tuple]
    frozen: list[str]
    tied: dict[str, str]                       # tied name -> the name that holds it
    groups: list[list[str]]                    # trainable names per torch param group
    states: list[str]                          # optimizer states besides "param"
    steps: list[Any]                           # per group: Adam step (None if unknown)
    hyper: list[dict] = field(default_factory=list)
    scalars: list[dict] = field(default_factory=list)   # per group: 0-d states besides step, {state: (value, dtype)}

    @staticmethod
    def of(ck) -> "Model":
        names = list(ck.params)
        infos = {n: ck.array_info(n, "param") for n in names}
        shapes = {n: tuple(info.shape) for n, info in infos.items()}
        meta = {n: ck.param_meta(n) for n in names}
        tied = {n: m["tied_to"] for n, m in meta.items() if m.get("tied_to")}
        # an integer tensor (a buffer of a checkpoint without optimizer) is never trained: DeepSpeed's
        # flat groups hold floating point only
        frozen = [n for n in names if n not in tied and (meta[n].get("frozen")
                                                         or not infos[n].dtype.is_floating_point)]
        md = ck.metadata if isinstance(ck.metadata, dict) else {}
        hyper = list(((md.get("optimizer") or {}).get("param_groups")) or [])
        trainable = [n for n in names if n not in tied and n not in frozen]
        count = max([len(hyper), 1] + [int(meta[n].get("optimizer_group", 0)) + 1 for n in trainable])
        groups = [[n for n in trainable if int(meta[n].get("optimizer_group", 0)) == g] for g in range(count)]
        states = sorted({st for n in trainable for st in ck.states(n)} - {"param"})
        check_states_shaped_as_params(ck, trainable, "DeepSpeed's flat buffers hold states shaped as their "
                                                    "parameters")
        if states and not hyper:
            raise UcpError(f"{ck.path}: optimizer state ({', '.join(states)}) but no optimizer hyper-parameters "
                           "(metadata optimizer.param_groups: lr, betas, ...), which DeepSpeed's files need")
        steps = [next((meta[n].get("scalars", {}).get("step") for n in grp), None) for grp in groups]
        return Model(names, shapes, frozen, tied, groups, states, steps, hyper,
                     [_group_scalars(meta, grp) for grp in groups])

    def numel(self, name: str) -> int:
        return math.prod(self.shapes[name])


def _group_scalars(meta: dict, group: list[str]) -> dict:
    """The 0-d optimizer states besides ``step`` (NAdam's ``mu_product``, ASGD's ``eta`` and ``mu``)
    of a flat group: one torch state per flat buffer, so its first member's, as for ``step``.
    Left out, the optimizer's ``load_state_dict`` on resume fails on the missing key."""
    first = next((meta[n] for n in group if meta[n].get("scalars")), None)
    if first is None:
        return {}
    dtypes = first.get("scalar_dtypes") or {}
    return {k: (v, dtypes.get(k)) for k, v in first["scalars"].items() if k != "step"}


# ------------------------------------------------------------------ DeepSpeed's partitioning
@dataclass
class FlatGroup:
    """One rank's flat buffer: the fragments of its members for every state, the slice map."""
    key: str
    lengths: dict[str, int]                    # state -> local buffer length
    fragments: dict[str, list]                 # state -> fragments
    slices: "OrderedDict[str, tuple[int, int]]" = field(default_factory=OrderedDict)  # name -> (numel, start)
    padding: int = 0


def zero12_groups(model: Model, dp: int, rank: int) -> list[FlatGroup]:
    """Rank ``rank``'s partition of every group (ZeRO-1/2, stage_1_and_2.py)."""
    out = []
    for g, names in enumerate(model.groups):
        total = sum(model.numel(n) for n in names)
        padded = -(-total // (ZERO_ALIGN * dp)) * ZERO_ALIGN * dp
        part = padded // dp
        lo, hi = rank * part, (rank + 1) * part
        padding = padded - total if rank == dp - 1 else 0
        if padding > part:
            raise DeepSpeedTargetError(f"param group {g} has {total} elements, too few for {dp} ranks "
                                       f"(DeepSpeed's last partition would be all padding)")
        lengths = {"param": part - padding, **{st: part for st in model.states}}
        grp = FlatGroup(f"group{g}", lengths, {st: [] for st in lengths}, padding=padding)
        offset = 0
        for n in names:
            a, b = max(offset, lo), min(offset + model.numel(n), hi)
            if a < b:
                for st, length in lengths.items():
                    grp.fragments[st].append(flat_fragment(n, model.shapes[n], rank, grp.key, length,
                                                           a - offset, b - offset, a - lo, "ZeRO-1/2 partition"))
                grp.slices[n] = (b - a, a - lo)
            offset += model.numel(n)
        out.append(grp)
    return out


def zero3_subgroups(model: Model, dp: int, sub_group_size: int) -> list[tuple[int, list[str]]]:
    """(param group, members) of every ZeRO-3 sub-group (stage3.py ``_create_fp16_sub_groups``)."""
    out = []
    for g, names in enumerate(model.groups):
        sizes = [zero3_partition(model.numel(n), dp) for n in names]
        if sub_group_size >= sum(sizes):
            out.append((g, list(names)))
            continue
        cur, acc = [], 0
        for n, size in zip(names, sizes):
            cur.append(n)
            acc += size
            if acc >= sub_group_size or n == names[-1]:
                out.append((g, cur))
                cur, acc = [], 0
    return out


def zero3_groups(model: Model, dp: int, rank: int, subgroups) -> list[FlatGroup]:
    """Rank ``rank``'s fp32 buffer of every sub-group: its members' partitions, concatenated."""
    out = []
    for i, (_, names) in enumerate(subgroups):
        length, frags = zero3_buffer([(n, model.shapes[n]) for n in names], dp, rank, f"sub{i}", "ZeRO-3 partition")
        states = ["param", *model.states]
        out.append(FlatGroup(f"sub{i}", {st: length for st in states}, {st: list(frags) for st in states}))
    return out


def frozen3_fragments(model: Model, dp: int, rank: int) -> list:
    return [zero3_buffer([(n, model.shapes[n])], dp, rank, f"frozen:{n}", "ZeRO-3 frozen partition")[1][0]
            for n in model.frozen]


# ------------------------------------------------------------------ the target
#: names DeepSpeed itself uses beside the tag folders
_RESERVED_TAGS = ("latest", "latest_universal", "zero_to_fp32.py")


def bad_tag(tag: str, raise_as: str | None = None) -> str:
    """Why ``tag`` cannot name a tag folder ("" when it can): it must be one folder name inside
    the destination (``../x`` wrote beside it), without surrounding spaces (DeepSpeed strips
    ``latest``'s text, so ``"gs3 "`` never loads), and none of the names DeepSpeed writes beside
    its tags. ``raise_as``: raise a ``DeepSpeedTargetError`` naming that option instead."""
    why = ("it is empty" if not tag else
           "it is '.' or '..'" if tag in (".", "..") else
           "it holds '/' or '\\'" if any(c in tag for c in "/\\") else
           "it starts or ends with white space" if tag != tag.strip() else
           f"DeepSpeed writes {tag!r} beside its tags" if tag in _RESERVED_TAGS or tag.endswith(".tmp") else "")
    if why and raise_as:
        raise DeepSpeedTargetError(f"{raise_as} {tag!r}: a tag is one folder name inside the destination; {why}")
    return why


class DeepSpeedTarget(Target):
    """Options: ``zero_stage`` (1-3, required), ``dtype`` (model dtype; default the recorded
    DeepSpeed config's, else fp32), ``sub_group_size`` (ZeRO-3; default the recorded config's,
    else DeepSpeed's 1e9), ``tag`` (default: the source run's tag where recorded, else
    ``global_step<iteration>``)."""
    name = "deepspeed"
    description = "DeepSpeed ZeRO 1/2/3 checkpoint for --dp N --zero-stage S (engine.load_checkpoint)"

    def __init__(self, dst, *, degrees=None, spec=None, storage_options=None, **options):
        super().__init__(dst, degrees=degrees, spec=spec, storage_options=storage_options, **options)
        self.reject_options(allowed=("zero_stage", "dtype", "sub_group_size", "tag"))
        stage, sub = options.get("zero_stage"), options.get("sub_group_size")
        if not is_count(stage) or stage > 3:
            raise DeepSpeedTargetError(f"--to {self.name} needs --zero-stage 1, 2 or 3 (zero_stage=; got {stage!r})")
        if sub is not None and not is_count(sub):
            raise DeepSpeedTargetError(f"--sub-group-size (sub_group_size=) is a whole number of at least 1, got {sub!r}")
        self.stage = stage
        other = {a: d for a, d in self.degrees.items() if a != "dp" and d > 1}
        if other:
            raise DeepSpeedTargetError(f"--to {self.name} writes data-parallel ZeRO only; cannot take {other}")
        self.dp = self.degrees.get("dp", 1)
        if options.get("tag") is not None:
            bad_tag(str(options["tag"]), raise_as="--tag")
        self._written: list[Path] = []

    # -- planning
    def plan(self, checkpoint) -> list[TargetUnit]:
        import torch

        self.check_destination()
        self.model = Model.of(checkpoint)
        self.md = checkpoint.metadata if isinstance(checkpoint.metadata, dict) else {}
        self.config = self._config()
        self.dtype = getattr(torch, DTYPES[self._dtype_name()])
        recorded = (self.md.get("deepspeed") or {}).get("tag")
        if recorded is not None and bad_tag(str(recorded)):
            recorded = None     # converted from a path such as ".." (its folder name is no tag)
        self.tag = str(self.options.get("tag") or recorded or f"global_step{self.md.get('iteration') or 0}")
        self._check_degree()
        if self.stage == 3:
            sub = self.options.get("sub_group_size") or (self.config["zero_optimization"].get("sub_group_size"))
            self.subgroups = zero3_subgroups(self.model, self.dp, int(sub or 1_000_000_000))
        return self._model_units() + self._optim_units()  # folders are made when written (torchrun-safe)

    def _check_degree(self) -> None:
        """Refuse a data-parallel degree the model cannot be spread over before any per-rank work
        (``--dp 10000000`` ran for minutes and took gigabytes before the last rank's check): at
        ZeRO-1/2 the last rank's partition of a group must not be all padding, at ZeRO-3 there must
        be at least one trainable element per rank."""
        if self.stage < 3:
            zero12_groups(self.model, self.dp, self.dp - 1)
            return
        total = sum(self.model.numel(n) for names in self.model.groups for n in names)
        if self.dp > total:
            raise DeepSpeedTargetError(f"--dp {self.dp}: the model has {total} trainable elements, fewer than ranks")

    def _dtype_name(self) -> str:
        given = self.options.get("dtype")
        if given:
            if given not in DTYPES:
                raise DeepSpeedTargetError(f"--dtype {given!r}: expected one of {', '.join(DTYPES)}")
            return given
        cfg = self.config
        return "bf16" if (cfg.get("bf16") or {}).get("enabled") else "fp16" if (cfg.get("fp16") or {}).get("enabled") \
            else "fp32"

    def _config(self) -> dict:
        """The recorded DeepSpeed config with this target's stage (and dtype, when given)."""
        recorded = (self.md.get("deepspeed") or {}).get("ds_config") or {}
        cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in recorded.items()}
        cfg["zero_optimization"] = {**(cfg.get("zero_optimization") or {}), "stage": self.stage}
        given = self.options.get("dtype")
        if given:
            cfg["bf16"], cfg["fp16"] = {"enabled": given == "bf16"}, {"enabled": given == "fp16"}
        if self.options.get("sub_group_size"):
            cfg["zero_optimization"]["sub_group_size"] = int(self.options["sub_group_size"])
        return cfg

    def _clip_grad(self) -> float:
        """The gradient clipping the ZeRO-1/2 optimizer files carry: DeepSpeed's load takes it from
        them over the loading run's config. The source run's own value where recorded, else the
        config's, else DeepSpeed's default (1.0 in 0.19: a config that leaves it out still clips)."""
        from deepspeed.runtime.constants import GRADIENT_CLIPPING_DEFAULT

        recorded = (self.md.get("deepspeed") or {}).get("clip_grad")
        if recorded is None:
            recorded = self.config.get("gradient_clipping")
        return float(GRADIENT_CLIPPING_DEFAULT if recorded is None else recorded)

    def _model_units(self) -> list[TargetUnit]:
        m = self.model
        if self.stage < 3:
            frags = [whole_fragment(n, m.shapes[n], "module") for n in m.names if n not in m.tied]
            return [TargetUnit(key="mp_rank_00_model_states.pt", coords={}, fragments=frags, states=["param"])]
        return [TargetUnit(key=model_file(r), coords={"dp": r}, fragments=frozen3_fragments(m, self.dp, r),
                           states=["param"]) for r in range(self.dp)]

    def _optim_units(self) -> list[TargetUnit]:
        units = []
        for r in range(self.dp):
            groups = self._groups(r)
            frags = {st: [f for g in groups for f in g.fragments[st]] for st in ["param", *self.model.states]}
            units.append(TargetUnit(key=self._optim_file(r), coords={"dp": r}, fragments=frags["param"],
                                    state_fragments=frags, states=list(frags)))
        return units

    def _groups(self, rank: int) -> list[FlatGroup]:
        if self.stage == 3:
            return zero3_groups(self.model, self.dp, rank, self.subgroups)
        return zero12_groups(self.model, self.dp, rank)

    def _optim_file(self, rank: int) -> str:
        import torch

        return f"{'bf16_' if self.dtype == torch.bfloat16 else ''}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"

    # -- writing
    def write_unit(self, unit: TargetUnit, tensors: Mapping[str, Mapping[str, Any]]) -> None:
        if unit.key.endswith("_optim_states.pt"):
            rank = unit.coords["dp"]
            body = self._optim_states(rank, self._groups(rank), tensors)
        else:
            body = self._model_states(unit.coords.get("dp", 0), tensors.get("param", {}))
        self._save(body, self.dst / self.tag / unit.key)

    def _save(self, obj, path: Path) -> None:
        import torch

        path.parent.mkdir(parents=True, exist_ok=True)
        self._written.append(path)
        torch.save(obj, path)

    def _model_states(self, rank: int, params: Mapping[str, torch.Tensor]) -> dict:
        import torch
        from deepspeed import __version__

        m = self.model
        module, frozen_parts = OrderedDict(), OrderedDict()
        for n in m.names:
            if self.stage == 3:
                module[n] = torch.empty(0, dtype=self.dtype)
                continue
            held = params[m.tied.get(n, n)]
            module[n] = held if n in m.frozen else held.to(self.dtype)
        for n in m.frozen:
            frozen_parts[n] = params[f"frozen:{n}"] if self.stage == 3 else module[n]
        shapes = ([OrderedDict((n, torch.Size(m.shapes[n])) for n in names) for _, names in self.subgroups]
                  if self.stage == 3 else [OrderedDict((n, torch.Size(m.shapes[n])) for n in g) for g in m.groups])
        keep_frozen = self.stage >= 2
        ds = self.md.get("deepspeed") or {}
        state = {
            "module": module, "buffer_names": [], "optimizer": None, "param_shapes": shapes,
            "frozen_param_shapes": OrderedDict((n, torch.Size(m.shapes[n])) for n in m.frozen) if keep_frozen else None,
            "shared_params": dict(m.tied) if rank == 0 else {},
            "frozen_param_fragments": frozen_parts if keep_frozen else None,
            "lr_scheduler": self.md.get("lr_scheduler"), "data_sampler": None, "random_ltd": None,
            "sparse_tensor_module_names": set(),
            "skipped_steps": ds.get("skipped_steps") or 0, "global_steps": self.md.get("iteration") or 0,
            "global_samples": ds.get("global_samples") or 0, "dp_world_size": self.dp, "mp_world_size": 1,
            "ds_config": self.config, "ds_version": __version__,
        }
        state.update(self.md.get("client_state") or {})
        return state

    def _optim_states(self, rank: int, groups: list[FlatGroup], tensors) -> dict:
        from deepspeed import __version__
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        fp32 = [buffer(tensors, "param", g) for g in groups]
        base = {"state": self._adam_state(groups, tensors), "param_groups": self._param_groups()}
        common = {"loss_scaler": self._loss_scaler(), "dynamic_loss_scale": self._dynamic(), "overflow": False}
        if self.stage == 3:
            sd = {"zero_stage": ZeroStageEnum.weights, **common, "partition_count": self.dp,
                  "optimizer_state_dict": base, "fp32_flat_groups": fp32}
        else:
            sd = {**common, "clip_grad": self._clip_grad(),
                  "base_optimizer_state": base, "single_partition_of_fp32_groups": fp32,
                  "zero_stage": ZeroStageEnum.gradients if self.stage == 2 else ZeroStageEnum.optimizer_states,
                  "group_paddings": [g.padding for g in groups],
                  "param_alignment_paddings": [[0] * len(names) for names in self.model.groups],
                  "partition_count": [self.dp] * len(groups), "ds_version": __version__,
                  "param_slice_mappings": [OrderedDict((n, fragment_address(numel=k, start=s))
                                                       for n, (k, s) in g.slices.items()) for g in groups]}
        return {"optimizer_state_dict": sd, "ds_config": self.config, "ds_version": __version__}

    def _group_index(self, i: int) -> int:
        return self.subgroups[i][0] if self.stage == 3 else i

    def _adam_state(self, groups: list[FlatGroup], tensors) -> dict:
        """Torch optimizer state per flat buffer (skipped when the checkpoint has no moments)."""
        import torch

        from ucp.format.dtypes import scalar_dtype

        out = {}
        if not self.model.states:
            return out
        for i, g in enumerate(groups):
            gi = self._group_index(i)
            scalars = self.model.scalars[gi] if gi < len(self.model.scalars) else {}
            out[i] = {"step": torch.tensor(float(self.model.steps[gi] or 0)),
                      **{st: torch.tensor(v, dtype=scalar_dtype(v, dt)) for st, (v, dt) in scalars.items()},
                      **{st: buffer(tensors, st, g) for st in self.model.states}}
        return out

    def _param_groups(self) -> list[dict]:
        """Hyper-parameters per torch group; ``params`` = the flat buffers of the group."""
        out = []
        for g in range(len(self.model.groups)):
            hyper = dict(self.model.hyper[g]) if g < len(self.model.hyper) else {}
            if isinstance(hyper.get("betas"), list):
                hyper["betas"] = tuple(hyper["betas"])
            members = ([i for i, (grp, _) in enumerate(self.subgroups) if grp == g] if self.stage == 3 else [g])
            out.append({**hyper, "params": members})
        return out

    def _dynamic(self) -> bool:
        import torch

        return self.dtype == torch.float16 and (self.config.get("fp16") or {}).get("loss_scale", 0) == 0

    def _loss_scaler(self):
        """The recorded scaler when the run's dtype is kept, else DeepSpeed's initial one."""
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        recorded = (self.md.get("deepspeed") or {}).get("loss_scaler")
        was_dynamic = bool(recorded and recorded.get("dynamic"))
        if recorded and was_dynamic == self._dynamic():
            cls = DynamicLossScaler if was_dynamic else LossScaler
            scaler = cls.__new__(cls)
            scaler.__dict__.update(recorded)
            return scaler
        if self._dynamic():
            fp16 = self.config.get("fp16") or {}
            return DynamicLossScaler(init_scale=2 ** fp16.get("initial_scale_power", 16),
                                     scale_window=fp16.get("loss_scale_window", 1000),
                                     min_scale=fp16.get("min_loss_scale", 1), delayed_shift=fp16.get("hysteresis", 2),
                                     consecutive_hysteresis=fp16.get("consecutive_hysteresis", False))
        return LossScaler(scale=1.0)

    def finish(self, checkpoint) -> None:
        tmp = self.dst / "latest.tmp"
        self.dst.mkdir(parents=True, exist_ok=True)
        self._written.append(tmp)
        tmp.write_text(self.tag)
        os.replace(tmp, self.dst / "latest")

    def abort(self) -> None:
        tag = getattr(self, "tag", None)
        self.remove_written(self._written, [self.dst / tag] if tag else [])


def buffer(tensors, state: str, group: FlatGroup) -> torch.Tensor:
    """The rank's buffer of ``group`` for ``state``; zeros where the rank holds only padding."""
    import torch

    got = tensors.get(state, {}).get(group.key)
    return got if got is not None else torch.zeros(group.lengths[state], dtype=torch.float32)


def model_file(rank: int) -> str:
    return f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"


# ------------------------------------------------------------------ DeepSpeed's universal layout
class DeepSpeedUniversalTarget(DeepSpeedTarget):
    """``--to deepspeed-universal --dp N --zero-stage S``: the layout ``ds_to_universal`` writes
    and ``checkpoint.load_universal`` reads: ``<tag>/zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt``
    (``{"param": full tensor, "cat_dim": 0}``; ``step.pt`` at stages 1/2), the stage's
    ``zero/optimizer_state.pt``, the model states N ranks load at stage S, ``latest_universal``.
    DeepSpeed's universal loader does not restore frozen weights (it skips the module)."""
    name = "deepspeed-universal"
    description = "DeepSpeed universal checkpoint (checkpoint.load_universal) for --dp N --zero-stage S"

    def plan(self, checkpoint) -> list[TargetUnit]:
        units = super().plan(checkpoint)
        models = [u for u in units if not u.key.endswith("_optim_states.pt")]
        m = self.model
        params = [TargetUnit(key=f"zero/{n}", coords={}, fragments=[whole_fragment(n, m.shapes[n], "universal")],
                             states=["param", *m.states]) for grp in m.groups for n in grp]
        return models + params

    def write_unit(self, unit: TargetUnit, tensors: Mapping[str, Mapping[str, Any]]) -> None:
        import torch

        if not unit.key.startswith("zero/"):
            return super().write_unit(unit, tensors)
        name = unit.key[len("zero/"):]
        folder = self.dst / self.tag / "zero" / name
        for state, held in tensors.items():
            self._save({"param": held[name], "cat_dim": 0}, folder / f"{'fp32' if state == 'param' else state}.pt")
        if self.stage < 3 and self.model.states:
            self._save(torch.tensor(float(self._step_of(name) or 0)), folder / "step.pt")

    def _step_of(self, name: str):
        return next(self.model.steps[g] for g, grp in enumerate(self.model.groups) if name in grp)

    def finish(self, checkpoint) -> None:
        self._save(self._universal_optimizer_state(), self.dst / self.tag / "zero" / "optimizer_state.pt")
        tmp = self.dst / "latest_universal.tmp"
        self.dst.mkdir(parents=True, exist_ok=True)
        self._written.append(tmp)
        tmp.write_text(self.tag)
        os.replace(tmp, self.dst / "latest_universal")

    def _universal_optimizer_state(self) -> dict:
        """What ``ds_to_universal`` keeps of rank 0's optimizer file: the global state and the
        param groups (ZeRO-3 also reads ``state[0]["step"]``)."""
        import torch
        from deepspeed import __version__
        from deepspeed.runtime.zero.config import ZeroStageEnum

        groups = self._param_groups()
        common = {"loss_scaler": self._loss_scaler(), "dynamic_loss_scale": self._dynamic(), "overflow": False}
        if self.stage == 3:
            step = torch.tensor(float(self.model.steps[0] or 0))
            return {"zero_stage": ZeroStageEnum.weights, **common, "partition_count": self.dp,
                    "optimizer_state_dict": {"state": {0: {"step": step}}, "param_groups": groups},
                    "param_groups": groups}
        return {**common, "clip_grad": self._clip_grad(),
                "zero_stage": ZeroStageEnum.gradients if self.stage == 2 else ZeroStageEnum.optimizer_states,
                "partition_count": [self.dp] * len(groups), "ds_version": __version__, "param_groups": groups}

    def abort(self) -> None:
        zero = self.dst / getattr(self, "tag", "") / "zero"
        if getattr(self, "tag", None):
            shutil.rmtree(zero, ignore_errors=True)   # every process of a job removes it at once
        super().abort()
