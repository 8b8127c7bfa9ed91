"""Source ``deepspeed-universal``: the folder DeepSpeed's ``ds_to_universal`` writes.

Layout: ``zero/<param>/fp32.pt`` (and ``exp_avg.pt``, ``exp_avg_sq.pt``, ...), each either
``{"param": tensor of the parameter's shape, "cat_dim": ...}`` (ZeRO-1/2) or a flat 1-D tensor
of the parameter's ``numel`` (ZeRO-3, as ``ds_to_universal`` writes it; ucp's own target writes the
parameter's shape there too, which DeepSpeed's loader also takes); ``step.pt`` per parameter at ZeRO-1/2 only (ZeRO-3 keeps
the step in ``zero/optimizer_state.pt``); ``zero/optimizer_state.pt`` with the param groups and
the loss scaler; and the original run's ``*model_states.pt`` files, copied, which give the shapes,
groups, tied and frozen parameters (``ds_to_universal`` drops frozen weights from ``zero/``; they
are recovered from those model states, as the ``deepspeed`` source does).
"""
from __future__ import annotations

import math
from functools import cached_property
from pathlib import Path

from ucp.sources import SourceParam
from ucp.sources.deepspeed import (FLOAT32, DeepSpeedError, DeepSpeedSource, LossScalerState, RankFiles, _scalar,
                                   flat_fragment, whole_fragment)
from ucp.sources.torchfile import materialise

STATE_FILES = {"fp32": "param"}  # file stem -> universal state name (others keep their name)


def universal_dir(path) -> Path:
    """The folder holding ``zero/``: ``path`` itself, or the tag ``latest_universal`` names."""
    p = Path(path)
    if (p / "zero").is_dir():
        return p
    latest = p / "latest_universal"
    if latest.is_file() and (p / latest.read_text().strip() / "zero").is_dir():
        return p / latest.read_text().strip()
    raise DeepSpeedError(f"{p}: no zero/ folder and no 'latest_universal': not a DeepSpeed universal checkpoint")


class DeepSpeedUniversalSource(DeepSpeedSource):
    name = "deepspeed-universal"
    description = "output of DeepSpeed's ds_to_universal (folder with zero/<param>/fp32.pt)"
    priority = 30  # before "deepspeed": the folder also holds *model_states.pt

    @classmethod
    def detect(cls, path) -> bool:
        try:
            return (universal_dir(path) / "zero" / "optimizer_state.pt").is_file()
        except DeepSpeedError:
            return False

    def __init__(self, path, **kw):
        super(DeepSpeedSource, self).__init__(path, **kw)
        self.reject_options()
        self.folder = universal_dir(self.path)
        self.zero = self.folder / "zero"
        self.files = RankFiles.scan(self.folder)
        self._open_files()

    @cached_property
    def optimizer_state(self) -> dict:
        return self._file(self.zero / "optimizer_state.pt")

    @cached_property
    def stage(self) -> int:
        stage = self.optimizer_state.get("zero_stage")
        if stage is None:
            raise DeepSpeedError(f"{self.zero / 'optimizer_state.pt'}: no 'zero_stage' recorded")
        return int(stage)

    def layout(self):
        from ucp.sources import SourceLayout

        params = self._ordered(self._trainable())
        return SourceLayout(params=params, metadata=self._metadata(), degrees={"dp": self.dp},
                            constants={"zero_stage": self.stage})

    def _param_groups(self) -> list[dict]:
        groups = self.optimizer_state.get("param_groups")
        if groups is None:
            groups = (self.optimizer_state.get("optimizer_state_dict") or {}).get("param_groups") or []
        return groups

    def _trainable(self) -> dict[str, SourceParam]:
        shapes = self._param_shapes
        group_of = {int(i): g for g, grp in enumerate(self._param_groups()) for i in grp.get("params", [])}
        out = {}
        for index, group_shapes in enumerate(shapes):
            for n, shape in group_shapes.items():
                folder = self.zero / n
                if not (folder / "fp32.pt").is_file():
                    raise DeepSpeedError(f"{folder / 'fp32.pt'}: file is missing (parameter {n})")
                states = ["param"] + sorted(STATE_FILES.get(p.stem, p.stem) for p in folder.glob("*.pt")
                                            if p.stem not in ("fp32", "step"))
                shape = tuple(shape)
                frag = (flat_fragment(n, shape, 0, n, math.prod(shape), 0, math.prod(shape), 0,
                                      f"zero/{n}") if self.stage == 3 else whole_fragment(n, shape, f"zero/{n}"))
                out[n] = SourceParam(name=n, shape=shape, dtypes={st: FLOAT32 for st in states},
                                     fragments=[frag], scalars=self._scalars(n, index),
                                     meta={"optimizer_group": group_of.get(index, index), "zero_stage": self.stage})
        return out

    def _scalars(self, name: str, index: int) -> dict:
        step_file = self.zero / name / "step.pt"
        if step_file.is_file():
            return {"step": _scalar(self._file(step_file))}
        state = (self.optimizer_state.get("optimizer_state_dict") or {}).get("state") or {}
        entry = state.get(index) or state.get(0) or {}
        return {"step": _scalar(entry["step"])} if "step" in entry else {}

    def _metadata(self) -> dict:
        m = self.model0
        from ucp.sources.deepspeed import MODEL_KEYS

        scaler = self.optimizer_state.get("loss_scaler")
        return materialise({
            "iteration": m.get("global_steps"),
            "lr_scheduler": m.get("lr_scheduler"),
            "client_state": {k: v for k, v in m.items() if k not in MODEL_KEYS},
            "optimizer": {"param_groups": [{k: v for k, v in g.items() if k != "params"}
                                           for g in self._param_groups()]},
            "deepspeed": {"zero_stage": self.stage, "dp_world_size": self.dp, "ds_version": m.get("ds_version"),
                          "ds_config": m.get("ds_config"), "global_steps": m.get("global_steps"),
                          "global_samples": m.get("global_samples"), "skipped_steps": m.get("skipped_steps"),
                          "loss_scaler": scaler.to_json() if isinstance(scaler, LossScalerState) else None,
                          "universal": True},
        })

    def _locate(self, fragment, state: str):
        if fragment.local_name.startswith("frozen:") or fragment.local_name not in self._trainable_names:
            return super()._locate(fragment, state)
        stem = next((k for k, v in STATE_FILES.items() if v == state), state)
        path = self.zero / fragment.local_name / f"{stem}.pt"  # a tied name reads its partner's files
        held = self._file(path)
        t = held["param"] if isinstance(held, dict) else held
        if len(fragment.local_shape) == 1 and t.ndim > 1 and math.prod(t.shape) == fragment.local_shape[0]:
            t = t.reshape(-1)    # ZeRO-3 reads it flat; ds_to_universal writes it so, ucp's target whole
        if tuple(t.shape) != tuple(fragment.local_shape):
            raise DeepSpeedError(f"{path}: shape {tuple(t.shape)}, the model states record "
                                 f"{tuple(fragment.local_shape)} for {fragment.name}")
        return path, t

    @cached_property
    def _trainable_names(self) -> set[str]:
        return {n for grp in self._param_shapes for n in grp}

    @cached_property
    def _param_shapes(self) -> list[dict]:
        """``param_shapes`` of the copied model states, per optimizer group index: of every
        model-parallel rank's file (pipeline stages; a tied module, in several stages, once)."""
        out: list[dict] = []
        for mp in RankFiles.model_ranks(self.folder):
            path = RankFiles.scan(self.folder, mp).model[0]
            for g, shapes in enumerate(self._file(path).get("param_shapes") or []):
                while len(out) <= g:
                    out.append({})
                out[g].update({n: s for n, s in shapes.items() if not any(n in o for o in out)})
        return out

    def describe(self, fragment, state: str) -> str:
        if fragment.local_name in self._trainable_names:
            return f"{self.zero / fragment.local_name}: {state} of {fragment.name}"
        return super().describe(fragment, state)
