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
* Pipeline checkpoints (``PipelineModule``, the layout Megatron-DeepSpeed writes):
  ``layer_XX[-model_YY]-model_states.pt`` per layer (and tensor-parallel rank YY), and the files
  above once per model-parallel rank ``mp_rank_MM``, MM = stage * tp + YY. Which stage holds a
  layer comes from the files; how each tensor-parallel block lies in the universal tensor from a
  spec (``--spec``, default ``converters/deepspeed_pipe_tp.ucp``), the only part of the layout
  DeepSpeed does not record.

The fragments come from that saved metadata (``param_slice_mappings``, ``param_shapes``), so
the layout is exactly what DeepSpeed recorded, whatever its alignment or ordering options. The
pickles are read without torch (``ucp.sources.torchfile``: the weights-only rules of
``torch.load(weights_only=True)``) with :data:`ALLOWED_GLOBALS`: stand-in classes under
DeepSpeed's qualified names, so neither DeepSpeed nor any pickled code is needed, and a pickle
naming any other global is refused with the global's name. Boxes are numpy arrays in the
storage dtype (bfloat16 as ``uint16``); the conversion never imports torch.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import os
import re
import threading
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Optional

from ucp.engine.buffers import ReadBuffers  # noqa: F401  (the pool TorchFile reads into)
from ucp.errors import UcpError
from ucp.format import dtypes
from ucp.sources import Source, SourceLayout, SourceParam
from ucp.sources.torchfile import RefusedGlobal, SavedTensor, TorchFile, TorchFileError, flat_span, materialise

#: the master weights and Adam moments of every ZeRO partition
FLOAT32 = dtypes.Dtype("float32")


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
        return {k: v for k, v in vars(self).items()
                if isinstance(v, (int, float, bool, str, type(None))) or dtypes.is_dtype(v)}


#: (stand-in, DeepSpeed's qualified name): every non-torch global a DeepSpeed 0.x checkpoint
#: pickles (torch's own tensor globals: ``ucp.sources.torchfile.TORCH_GLOBALS``).
ALLOWED_GLOBALS = [
    (FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address"),
    (ZeroStage, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (LossScalerState, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (LossScalerState, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
]


#: ``module.name`` -> stand-in, as :class:`ucp.sources.torchfile.TorchFile` takes them
ALLOWED = {name: cls for cls, name in ALLOWED_GLOBALS}


def open_file(path: Path, buffers: Optional["ReadBuffers"] = None) -> TorchFile:
    """A DeepSpeed file read without torch (:class:`ucp.sources.torchfile.TorchFile`): its
    pickle with only :data:`ALLOWED_GLOBALS` beyond torch's weights-only set, tensors as
    :class:`SavedTensor` read box by box; every failure names the file (and the refused global)."""
    try:
        return TorchFile(path, ALLOWED, buffers)
    except RefusedGlobal as e:
        raise DeepSpeedError(f"{path}: refuses to unpickle global {e.global_name} (not in the "
                             f"DeepSpeed allow-list; see docs/deepspeed.md)") from None
    except TorchFileError as e:
        raise DeepSpeedError(str(e)) from None
    except OSError as e:
        raise DeepSpeedError(f"{path}: cannot be read ({e.strerror or e})") from None


# ------------------------------------------------------------------ finding the files
OPTIM_RE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
MODEL_RE = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
#: a pipeline layer's weights (``PipelineModule.ckpt_layer_path``; ``-model_XX`` under tensor parallelism)
LAYER_RE = re.compile(r"^layer_(\d+)(?:-model_(\d+))?-model_states\.pt$")


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
    """The rank files of one model-parallel rank (``mp_rank_XX``: a pipeline stage) of one tag
    folder."""
    folder: Path
    model: dict[int, Path]        # dp rank -> model states (ZeRO-1/2: only rank 0)
    optim: dict[int, Path]        # dp rank -> optimizer states
    mp: int = 0

    @staticmethod
    def model_ranks(folder: Path) -> list[int]:
        """The model-parallel ranks (``mp_rank_XX``) that any rank file of ``folder`` names."""
        found = set()
        for f in folder.iterdir():
            m, o = MODEL_RE.match(f.name), OPTIM_RE.match(f.name)
            if m or o:
                found.add(int(m.group(2)) if m else int(o.group(3)))
        return sorted(found)

    @staticmethod
    def scan(folder: Path, mp: int = 0) -> "RankFiles":
        model, optim = {}, {}
        for f in sorted(folder.iterdir()):
            m, o = MODEL_RE.match(f.name), OPTIM_RE.match(f.name)
            if o and int(o.group(3)) == mp:
                optim[int(o.group(2))] = f
            elif m and int(m.group(2)) == mp:
                model[int(m.group(1) or 0)] = f
        if not model:
            raise DeepSpeedError(f"{folder / f'mp_rank_{mp:02d}_model_states.pt'}: file is missing (no model "
                                 f"states of model-parallel rank {mp})")
        return RankFiles(folder, model, optim, mp)

    def check_world(self, dp: int, stage: int, prefix: str) -> None:
        """Every rank file the saved world size implies is there, and no other."""
        want = set(range(dp))
        for kind, have, name in (("optimizer", self.optim, lambda r: self.optim_name(r, prefix)),
                                 ("model", self.model if stage == 3 else None, self.model_name)):
            if have is None:
                continue
            missing, extra = sorted(want - set(have)), sorted(set(have) - want)
            if missing:
                raise DeepSpeedError(f"{self.folder / name(missing[0])}: {kind} states file is missing "
                                     f"(the checkpoint was saved by {dp} data-parallel ranks)")
            if extra:
                raise DeepSpeedError(f"{have[extra[0]]}: world size mismatch: the checkpoint records "
                                     f"dp_world_size={dp} but this is rank {extra[0]}'s file")

    def model_name(self, rank: int) -> str:
        return f"zero_pp_rank_{rank}_mp_rank_{self.mp:02d}_model_states.pt"

    def optim_name(self, rank: int, prefix: str = "") -> str:
        return f"{prefix}zero_pp_rank_{rank}_mp_rank_{self.mp:02d}_optim_states.pt"


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


def whole_fragment(name, shape, origin, local_name=None):
    from ucp.plan import Box, Fragment, Piece

    box = Box((0,) * len(shape), tuple(shape))
    return Fragment(name=name, local_name=local_name or name, coords=(("dp", 0),), local_shape=tuple(shape),
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
    #: ``read`` may run on several threads at once: files are unpickled under a lock, and boxes
    #: are read with ``pread`` (no shared file position)
    concurrent_reads = True

    @classmethod
    def detect(cls, path) -> bool:
        p = Path(path)
        if not p.is_dir():
            return False
        # a ``latest`` file is DeepSpeed's alone (Megatron writes latest_checkpointed_iteration.txt,
        # ds_to_universal latest_universal): one naming a missing tag is DeepSpeed's to report
        return any(p.glob("*model_states.pt")) or (p / "latest").is_file()

    def __init__(self, path, **kw):
        super().__init__(path, **kw)
        self.reject_options()
        self.folder = tag_dir(self.path)
        self.files = RankFiles.scan(self.folder)
        self._open_files()

    # -- file access
    def _open_files(self) -> None:
        self._stages: dict[int, DeepSpeedSource] = {0: self}  # model-parallel rank -> its files' reader
        self._tp, self._tp_rank = 1, 0   # tensor-parallel degree (pipelines), rank of these files
        self._loaded: dict[Path, Any] = {}
        self._readers: dict[Path, TorchFile] = {}
        self._buffers = ReadBuffers()
        self._lock = threading.Lock()

    def _file(self, path: Path):
        """What the file pickled, tensors as :class:`SavedTensor`: read box by box (:meth:`read`)."""
        with self._lock:
            if path not in self._loaded:
                reader = self._readers[path] = open_file(path, self._buffers)
                self._loaded[path] = reader.obj
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
        sd = self._optim(min(self.files.optim))
        stage = sd.get("zero_stage")
        if stage is None and BF16_OPTIMIZER_KEYS <= set(sd):
            return 0  # bf16 without ZeRO: BF16_Optimizer, which partitions like ZeRO-1 and records no stage
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
        ranks = RankFiles.model_ranks(self.folder)
        return self._stage_layout() if ranks == [0] else self._pipeline_layout(ranks)

    def _stage_layout(self) -> SourceLayout:
        """The layout of one model-parallel rank's files (the whole checkpoint without pipeline)."""
        files, dp, stage = self.files, self.dp, self.stage
        prefix = "bf16_" if any(p.name.startswith("bf16_") for p in files.optim.values()) else ""
        files.check_world(dp, stage, prefix)
        self._check_same_save()
        build = self._zero3_params if stage == 3 else self._zero12_params
        trainable = build()
        if not trainable:
            raise DeepSpeedError(f"{files.optim[min(files.optim)]}: no trainable parameter found in the optimizer "
                                 f"states")
        params = self._ordered(trainable)
        return SourceLayout(params=params, metadata=self._metadata(),
                            degrees={"dp": dp}, constants={"zero_stage": stage})

    # -- pipeline parallelism
    def _pipeline_layout(self, ranks: list[int]) -> SourceLayout:
        """Pipeline parallelism (DeepSpeed's ``PipelineModule``, the layout Megatron-DeepSpeed
        writes): model-parallel rank ``mp_rank_MM`` is pipeline stage ``MM // tp`` and
        tensor-parallel rank ``MM % tp`` (DeepSpeed's model-parallel group spans the topology's
        pipe and model axes), its files a ZeRO-1/2 checkpoint of that rank's block of the
        stage's layers, named as the pipeline module names them (``{layer}.{name}``,
        ``tied_modules.{key}.{name}``). A tied module is held by every stage that uses it,
        identical (DeepSpeed all-reduces its gradients): converted from the first stage, the
        others recorded. Frozen weights are in the layer files (``layer_XX[-model_YY]``) only.
        With tp > 1 the blocks become universal tensors through the spec's tensor-parallel
        layout (:meth:`_tensor_parallel`)."""
        pp, tp = self._check_pipeline(ranks)
        self._tp = tp
        self._stages.update({m: self._for_model_rank(m) for m in ranks[1:]})
        blocks = [self._rank_params(t) for t in range(tp)]
        params, bound = (list(blocks[0].values()), None) if tp == 1 else self._tensor_parallel(blocks)
        metadata = self._metadata()
        metadata["deepspeed"]["pipeline"] = {"pp_degree": pp, "tp_degree": tp}
        degrees = {"pp": pp, **({"tp": tp} if tp > 1 else {}), "dp": self.dp}
        return SourceLayout(params=params, metadata=metadata, degrees=degrees, constants={"zero_stage": self.stage},
                            spec_name=bound.spec_name if bound else None, spec_text=bound.spec.text if bound else None)

    def _rank_params(self, t: int) -> dict[str, SourceParam]:
        """Every parameter as tensor-parallel rank ``t`` holds it (its block), in model order; each
        fragment tagged with its stage ``pp``."""
        params, holders = {}, {}
        for m, part in sorted(self._stages.items()):
            if m % self._tp != t:
                continue
            for p in part._stage_layout().params:
                holders.setdefault(p.name, []).append(m // self._tp)
                if p.name not in params:
                    params[p.name] = _on_stage(p, m // self._tp)
                elif not p.name.startswith("tied_modules."):
                    raise DeepSpeedError(f"{part.files.model[0]}: parameter {p.name} is also held by pipeline stage "
                                         f"{holders[p.name][0]}, but the checkpoint records tp_degree={self._tp} "
                                         f"(checkpoint_parallel_dimensions): the files disagree with it")
        frozen, order = self._pipeline_frozen(params, t)
        params.update(frozen)
        order = list(dict.fromkeys(n for n in order if n in params)) + [n for n in params if n not in order]
        return {n: dataclasses.replace(params[n], meta={**params[n].meta, "pipeline_stages": holders[n]})
                if n in holders else params[n] for n in order}

    def _tensor_parallel(self, blocks: list[dict[str, SourceParam]]) -> tuple[list[SourceParam], Any]:
        """Each parameter's tensor-parallel blocks (``blocks[t]``: rank t's) as one universal
        tensor. The spec (``--spec``, default :data:`PIPE_TP_SPEC`) says how rank t's block lies in
        the universal tensor (its ``tp`` fragment); every fragment DeepSpeed's records give over
        the block (flat ZeRO ranges, whole layer weights) is carried through it."""
        from ucp.engine.specs import bind_layout
        from ucp.lang import UnmatchedError

        tp, where = len(blocks), self.files.model[0]
        for t, held in enumerate(blocks[1:], 1):
            odd = sorted(set(held) ^ set(blocks[0]))
            if odd:
                raise DeepSpeedError(f"{self.folder / f'mp_rank_{t:02d}_model_states.pt'}: tensor-parallel ranks 0 "
                                     f"and {t} hold different parameters (e.g. {odd[0]})")
        try:
            bound = bind_layout(self.spec or PIPE_TP_SPEC, {n: p.shape for n, p in blocks[0].items()}, {"tp": tp})
        except UnmatchedError as e:
            raise DeepSpeedError(f"{where}: tensor parallelism (tp_degree={tp}) needs a spec declaring how each "
                                 f"parameter is split (--spec FILE; the default is converters/{PIPE_TP_SPEC}.ucp, "
                                 f"Megatron-DeepSpeed's GPTModelPipe): {e}") from None
        out = []
        for n, p in blocks[0].items():
            shape, tp_frags = _tp_blocks(bound, n, [b[n] for b in blocks], self.folder)

            def through(state):
                return [_through_tp(f, tp_frags[t]) for t, b in enumerate(blocks) for f in b[n].fragments_of(state)]

            out.append(dataclasses.replace(p, shape=shape, fragments=through("param"),
                                           state_fragments={st: through(st) for st in p.state_fragments},
                                           meta={**p.meta, **bound.param_meta(n, shape)}))
        return out, bound

    def _check_pipeline(self, ranks: list[int]) -> tuple[int, int]:
        """(pipeline degree, tensor-parallel degree) as the checkpoint records them, checked
        against the files present. DeepSpeed before ``checkpoint_parallel_dimensions`` (as most
        Megatron-DeepSpeed runs used) records neither: tp is then the number of tensor-parallel
        ranks the layer files name, pp = mp_world_size / tp."""
        path, world = self.files.model[0], int(self.model0.get("mp_world_size") or 0)
        dims = self.model0.get("checkpoint_parallel_dimensions") or {}
        tp = int(dims["tp_degree"]) if "tp_degree" in dims else 1 + max(
            (int(hit.group(2) or 0) for hit in map(LAYER_RE.match, os.listdir(self.folder)) if hit), default=0)
        pp = int(dims.get("pp_degree", world // tp if tp > 0 else 0))
        if tp < 1 or pp * tp != world:
            raise DeepSpeedError(f"{path}: checkpoint_parallel_dimensions pp_degree={pp}, tp_degree={tp} do not "
                                 f"multiply to the recorded mp_world_size={world}")
        if self.stage == 3:
            raise DeepSpeedError(f"{path}: ZeRO-3 files of several model-parallel ranks (tensor parallelism) "
                                 f"are not supported by the deepspeed source")
        missing = sorted(set(range(world)) - set(ranks))
        if missing:
            raise DeepSpeedError(f"{self.folder / f'mp_rank_{missing[0]:02d}_model_states.pt'}: file is missing "
                                 f"(the checkpoint records mp_world_size={world})")
        if ranks != list(range(world)):
            raise DeepSpeedError(f"{self.folder}: files of model-parallel ranks {ranks} but the checkpoint records "
                                 f"mp_world_size={world}")
        self._check_layer_files(ranks, tp)
        return pp, tp

    def _check_layer_files(self, ranks: list[int], tp: int) -> None:
        """Every pipeline layer has one file per tensor-parallel rank (``layer_XX-model_YY``), and
        no file names a rank the recorded tp degree does not have."""
        held: dict[int, dict[int, Path]] = {}
        for f in self.folder.iterdir():
            hit = LAYER_RE.match(f.name)
            if hit:
                held.setdefault(int(hit.group(1)), {})[int(hit.group(2) or 0)] = f
        if not held:
            raise DeepSpeedError(f"{self.folder}: files of model-parallel ranks {ranks} but no pipeline layer files "
                                 f"(layer_XX-model_states.pt): tensor parallelism without a PipelineModule is not "
                                 f"supported by the deepspeed source")
        for layer, files in sorted(held.items()):
            extra, missing = sorted(set(files) - set(range(tp))), sorted(set(range(tp)) - set(files))
            if extra:
                raise DeepSpeedError(f"{files[extra[0]]}: a file of tensor-parallel rank {extra[0]}, but "
                                     f"{self.files.model[0].name} records tp_degree={tp}")
            if missing:
                gone = self.folder / f"layer_{layer:02d}-model_{missing[0]:02d}-model_states.pt"
                raise DeepSpeedError(f"{gone}: file is missing (the checkpoint records tp_degree={tp}; layer {layer} "
                                     f"has files of tensor-parallel ranks {sorted(files)})")

    def _for_model_rank(self, mp: int) -> "DeepSpeedSource":
        """This checkpoint's reader for the files of model-parallel rank ``mp`` (one pipeline stage's
        block on one tensor-parallel rank)."""
        part = object.__new__(type(self))
        Source.__init__(part, self.path)
        part.folder, part.files = self.folder, RankFiles.scan(self.folder, mp)
        part._open_files()
        part._buffers = self._buffers   # one pool of read buffers for the whole conversion
        part._tp, part._tp_rank = self._tp, mp % self._tp
        if part.model0.get("global_steps") != self.model0.get("global_steps"):
            raise DeepSpeedError(f"{part.files.model[0]}: global_steps {part.model0.get('global_steps')} differs "
                                 f"from {self.model0.get('global_steps')} in {self.files.model[0].name}: files "
                                 f"of different saves are mixed")
        return part

    def _pipeline_frozen(self, trainable, t: int = 0) -> tuple[dict[str, SourceParam], list[str]]:
        """(frozen parameters, model order) from tensor-parallel rank ``t``'s layer files: their
        weights that no stage's optimizer holds are frozen. A layer none of whose weights is ``{layer}.{key}`` but whose
        keys and shapes all match one tied module's is that module's copy (the checkpoint does
        not record which layers are tied)."""
        frozen, order = {}, []
        for f, idx, weights in self._layer_files(t):
            names = {k: f"{idx}.{k}" for k in weights}
            tie = None if any(n in trainable for n in names.values()) else _tied_module(weights, trainable)
            if tie is not None:
                order += [f"tied_modules.{tie}.{k}" for k in weights]
                continue
            order += names.values()
            for k, t in weights.items():
                if names[k] not in trainable:
                    n, shape = names[k], tuple(t.shape)
                    frozen[n] = SourceParam(name=n, shape=shape, dtypes={"param": t.dtype},
                                            fragments=[whole_fragment(n, shape, f.name, f"{f.name}:{k}")],
                                            meta={"frozen": True, "zero_stage": self.stage})
        return frozen, order

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

    def _group_shapes(self) -> list[Mapping[str, tuple]]:
        """Per optimizer group, its parameters' names and shapes in flat order: ``param_shapes``
        (ZeRO); for BF16_Optimizer, which records none, the names of ``param_slice_mappings``
        (every rank's, in rank order) with the shapes of the weights the model files hold."""
        shapes = self.model0.get("param_shapes")
        if shapes is not None:
            return shapes
        if self.stage != 0:
            raise DeepSpeedError(f"{self.files.model[0]}: no param_shapes recorded")
        out = []
        for g in range(len(self._optim(0)["param_slice_mappings"])):
            numels: dict[str, int] = {}
            for r in range(self.dp):
                for n, addr in self._optim(r)["param_slice_mappings"][g].items():
                    numels[n] = numels.get(n, 0) + addr.numel
            out.append({n: self._weight_shape(n, numel) for n, numel in numels.items()})
        return out

    def _weight_shape(self, name: str, numel: int) -> tuple:
        """The shape of trainable parameter ``name`` (``numel`` elements in the optimizer's
        partitions) from the module weights: the model states' ``module``, or the pipeline layer
        files (``{layer}.{key}``; a tied module's ``tied_modules.{tie}.{key}`` is the layer weight
        ``key`` of that many elements, which must be unambiguous)."""
        module = self.model0.get("module")
        if module is not None:
            found = [module[name]] if name in module else []
        else:
            layers = self._layer_weights()
            found = [layers[name]] if name in layers else []
            if not found and name.startswith("tied_modules."):
                key = name.split(".", 2)[2]
                found = [t for n, t in layers.items() if n.split(".", 1)[1] == key and t.numel() == numel]
        shapes = {tuple(t.shape) for t in found}
        if len(shapes) != 1 or math.prod(next(iter(shapes))) != numel:
            raise DeepSpeedError(f"{self.files.optim[0]}: cannot tell the shape of {name} ({numel} elements) "
                                 f"from the model's weights (candidates: {sorted(shapes) or 'none'})")
        return next(iter(shapes))

    def _layer_files(self, model: int) -> list[tuple[Path, int, dict[str, Any]]]:
        """Tensor-parallel rank ``model``'s pipeline layer files in layer order: (file, layer
        index, weights by key)."""
        out = []
        for f in sorted(self.folder.iterdir()):
            hit = LAYER_RE.match(f.name)
            if hit and int(hit.group(2) or 0) == model:
                out.append((f, int(hit.group(1)), {k: t for k, t in self._file(f).items() if _is_tensor(t)}))
        return sorted(out, key=lambda x: x[1])

    def _layer_weights(self) -> dict[str, Any]:
        """Every pipeline layer file's weights as ``{layer}.{key}``."""
        return {f"{idx}.{k}": t for _, idx, weights in self._layer_files(self._tp_rank) for k, t in weights.items()}

    def _zero12_params(self) -> dict[str, SourceParam]:
        """ZeRO-1/2: each rank's slice of each parameter, where ``param_slice_mappings`` puts it
        in the rank's partition of the group; ranks hold consecutive slices. The fp32 partition
        is saved with the group padding stripped, the Adam moments with it: the same pieces in
        local tensors of two lengths."""
        shapes = self._group_shapes()
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
                                     dtypes={"param": FLOAT32, **{s: FLOAT32 for s in states}},
                                     fragments=frags[n]["param"], state_fragments=frags[n], scalars=scalars,
                                     meta={"optimizer_group": group_of.get(g, g), "zero_stage": self.stage})
        return out

    def _zero3_params(self) -> dict[str, SourceParam]:
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
                                     dtypes={"param": FLOAT32, **{s: FLOAT32 for s in states}},
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
        return materialise({   # a tensor anywhere in DeepSpeed's records (an lr as a tensor) is read
            "iteration": m.get("global_steps"),
            "lr_scheduler": m.get("lr_scheduler"),
            "client_state": client,
            "optimizer": {"param_groups": groups},
            "deepspeed": {
                "zero_stage": self.stage, "dp_world_size": self.dp, "ds_version": m.get("ds_version"),
                "tag": self.folder.resolve().name,   # the folder's own name, also when given as ".."
                "ds_config": m.get("ds_config"), "global_steps": m.get("global_steps"),
                "global_samples": m.get("global_samples"), "skipped_steps": m.get("skipped_steps"),
                "loss_scaler": scaler.to_json() if isinstance(scaler, LossScalerState) else None,
                "dynamic_loss_scale": opt0.get("dynamic_loss_scale"), "overflow": opt0.get("overflow"),
                "clip_grad": opt0.get("clip_grad"),
                "bf16_files": any(p.name.startswith("bf16_") for p in self.files.optim.values()),
            },
        })

    # -- tensors
    def _part(self, fragment) -> "DeepSpeedSource":
        """The reader of the model-parallel rank whose files hold ``fragment``."""
        return self._stages[fragment.coord("pp") * self._tp + fragment.coord("tp")]

    def local(self, fragment, state: str):
        """The local tensor as numpy in its storage dtype (bfloat16 as ``uint16``)."""
        part = self._part(fragment)
        path, t = part._locate(fragment, state)
        return part._readers[path].box(t, (0,) * t.ndim, tuple(t.shape))

    def read(self, fragment, state: str, piece):
        """Only the piece's bytes are read (see :class:`TorchFile`), as numpy in the storage dtype."""
        part = self._part(fragment)
        path, t = part._locate(fragment, state)
        return part._readers[path].box(t, piece.dst.start, piece.dst.stop).reshape(piece.src.shape)

    def read_into(self, fragment, state: str, piece, out) -> bool:
        """Read the piece straight into ``out`` (contiguous numpy, shape ``piece.src.shape``) when
        the file holds it as one flat span in ``out``'s (storage) dtype: the engine gathers a
        whole state this way with one copy (file -> ``out``). False, with ``out`` untouched,
        otherwise (the engine then calls :meth:`read`, which checks the dtype)."""
        part = self._part(fragment)
        path, t = part._locate(fragment, state)
        if t.dtype.storage != out.dtype or not t.is_contiguous():
            return False
        return part._readers[path].read_into(t, piece.dst.start, piece.dst.stop, out)

    def view(self, fragment, state: str, piece):
        """The piece (shape ``piece.src.shape``) over a private map of the file's bytes, with
        no copy (:meth:`TorchFile.view`), when the file holds it as one flat span; None
        otherwise (the engine then reads it with :meth:`read_into` or :meth:`read`)."""
        part = self._part(fragment)
        path, t = part._locate(fragment, state)
        if not t.is_contiguous() or not piece.numel:
            return None
        span = flat_span(t, piece.dst.start, piece.dst.stop)
        if span is None:
            return None
        return part._readers[path].view(t, *span).reshape(piece.src.shape)

    def _locate(self, fragment, state: str):
        """(file, :class:`SavedTensor`) holding ``state`` of ``fragment``; its shape
        checked against the one DeepSpeed's metadata implies."""
        rank = fragment.coord("dp")
        ln = fragment.local_name
        if ln.startswith("frozen:"):
            path = self.files.model[rank]
            t = self._file(path)["frozen_param_fragments"][ln[len("frozen:"):]]
            t = t.reshape(-1) if self.stage == 3 else t
        elif ln.startswith("group") or ln.startswith("sub"):
            index = int(ln.removeprefix("group").removeprefix("sub"))
            path, t = self.files.optim[rank], self._local_state(rank, index, state)
        elif LAYER_RE.match(ln.partition(":")[0]):
            path = self.folder / ln.partition(":")[0]
            t = self._file(path)[ln.partition(":")[2]]
        else:
            path, t = self.files.model[0], self.model0["module"][ln]
        if tuple(t.shape) != tuple(fragment.local_shape):
            raise DeepSpeedError(f"{self.describe(fragment, state)}: shape {tuple(t.shape)}, DeepSpeed's "
                                 f"metadata implies {tuple(fragment.local_shape)}")
        return path, t

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
        for part in self._stages.values():
            if part is not self:
                part.close()
        with self._lock:
            for reader in self._readers.values():
                reader.close()
            self._readers.clear()
            self._loaded.clear()


#: what DeepSpeed's BF16_Optimizer (bf16 at ZeRO stage 0; Megatron-DeepSpeed's usual setting) saves
BF16_OPTIMIZER_KEYS = frozenset({"base_optimizer_state", "single_partition_of_fp32_groups", "param_slice_mappings"})

#: keys DeepSpeed itself writes into model states; every other key is the user's client state
MODEL_KEYS = frozenset({
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
    "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
    "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config",
    "ds_version", "checkpoint_parallel_dimensions", "mp_world_size",
})


#: the tensor-parallel layout of pipeline checkpoints when no ``--spec`` is given (Megatron-DeepSpeed's names)
PIPE_TP_SPEC = "deepspeed_pipe_tp"


def _tp_blocks(bound, name: str, held: list[SourceParam], folder: Path) -> tuple[tuple, list]:
    """(universal shape, the spec's fragment of each tensor-parallel rank's block) of ``name``,
    whose blocks ``held`` (rank order) have the shapes DeepSpeed saved: the universal shape is
    the block's, or the block's with one dimension summed over the ranks, whichever the spec
    splits into exactly these blocks. None does: the spec disagrees with the files."""
    from ucp.plan import PlanError

    shapes = [tuple(p.shape) for p in held]
    candidates = [shapes[0]] + [tuple(sum(s[d] for s in shapes) if i == d else n for i, n in enumerate(shapes[0]))
                                for d in range(len(shapes[0]))]
    for shape in dict.fromkeys(candidates):
        try:
            frags = [bound.rank_fragments({name: shape}, {"tp": t}) for t in range(len(held))]
        except PlanError:
            continue
        if all(len(f) == 1 and tuple(f[0].local_shape) == s for f, s in zip(frags, shapes)):
            return shape, [f[0] for f in frags]
    origin = held[0].fragments[0].origin.partition(":")[0] if held[0].fragments else ""
    rule = bound.matches[name].rule
    raise DeepSpeedError(f"{folder / origin}: {name}: tensor-parallel ranks 0..{len(held) - 1} hold blocks of shapes "
                         f"{shapes}, which rule {rule.origin} of spec {bound.spec_name} ({rule.pattern}) does not "
                         f"give at tp={len(held)} (checkpoint_parallel_dimensions) for any universal shape: the "
                         f"spec's tensor-parallel layout disagrees with the files")


def _through_tp(fragment, block):
    """``fragment``, whose pieces lie in a tensor-parallel rank's block, with pieces in the
    universal tensor instead, through ``block`` (the spec's fragment of that block: universal
    boxes <-> boxes of the block); it gains the block's ``tp`` coordinate and replication. A
    flat piece (1-D local range) is cut into runs contiguous in its box's row-major order."""
    from ucp.plan import Box, Piece, contiguous_runs, ravel

    pieces = []
    for piece in fragment.pieces:
        for b in block.pieces:
            common = piece.src.intersect(b.dst)
            if common.empty:
                continue
            shift = tuple(u - v for u, v in zip(b.src.start, b.dst.start))
            for run in [common] if piece.is_box else contiguous_runs(common, piece.src):
                if piece.is_box:
                    dst = run.translate(tuple(d - s for d, s in zip(piece.dst.start, piece.src.start)))
                else:
                    at = piece.dst.start[0] + ravel(run.relative_to(piece.src).start, piece.src.shape)
                    dst = Box((at,), (at + run.numel,))
                pieces.append(Piece(run.translate(shift), dst))
    return dataclasses.replace(fragment, pieces=tuple(pieces), global_shape=tuple(block.global_shape),
                               coords=(*fragment.coords, *block.coords), replica=fragment.replica or block.replica,
                               replicated=tuple(dict.fromkeys((*fragment.replicated, *block.replicated))),
                               averaged=tuple(dict.fromkeys((*fragment.averaged, *block.averaged))),
                               weight=fragment.weight * block.weight)


def _on_stage(p: SourceParam, stage: int) -> SourceParam:
    """``p`` as pipeline stage ``stage`` holds it: every fragment gains the coordinate ``pp``."""
    def tag(frags):
        return [dataclasses.replace(f, coords=(("pp", stage), *f.coords)) for f in frags]

    return dataclasses.replace(p, fragments=tag(p.fragments),
                               state_fragments={st: tag(fs) for st, fs in p.state_fragments.items()})


def _tied_module(weights: Mapping[str, Any], trainable: Mapping[str, SourceParam]) -> Optional[str]:
    """The key of the tied module whose weights a layer file holds (every name
    ``tied_modules.{key}.{name}`` trainable with the same shape), or None."""
    def matches(key: str) -> bool:
        held = [(trainable.get(f"tied_modules.{key}.{k}"), t) for k, t in weights.items()]
        return bool(held) and all(p is not None and tuple(p.shape) == tuple(t.shape) for p, t in held)

    keys = dict.fromkeys(n.split(".")[1] for n in trainable if n.startswith("tied_modules."))
    return next((key for key in keys if matches(key)), None)


def _is_tensor(v) -> bool:
    return isinstance(v, SavedTensor)


def _scalar(v):
    """A 0-d tensor (Adam ``step``) as a Python number: int when integral."""
    if isinstance(v, SavedTensor):
        v = v.item()
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v
