"""Target plug-in for the *rank-files* layout (see ``ucp.sources.ranks``): one ``torch.save``
file per rank of any mesh a spec declares, plus ``layout.json`` (written last: a directory
without it is not a rank-files checkpoint) and ``meta.pt`` for the non-tensor state.

``ucp export --to ranks --tp N --dp M [--spec S]``: the spec defaults to the one the universal
checkpoint records (``metadata["source"]["spec_text"]``). :func:`save_ranks` writes the same
files straight from in-memory tensors (what a hand-rolled training loop saves), through the
same engine.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, TYPE_CHECKING

from ucp.sources.ranks import FORMAT_NAME, LAYOUT_FILE, META_FILE, RanksError, rank_file_name
from ucp.targets import Target, TargetUnit

if TYPE_CHECKING:
    import torch


class RanksTarget(Target):
    """Rank files for ``degrees`` under a spec; option ``constants`` ({name: int}) binds the
    spec's ``config`` values (default: the ones the checkpoint records)."""
    name = "ranks"
    description = "one torch.save file per rank + layout.json, for any mesh a spec declares"

    def __init__(self, dst, *, degrees=None, spec=None, storage_options=None, **options):
        super().__init__(dst, degrees=degrees, spec=spec, storage_options=storage_options, **options)
        self.reject_options(allowed=("constants",))
        self._bound = None
        self._states: list[str] = []
        self._written: list[Path] = []

    def plan(self, checkpoint) -> list[TargetUnit]:
        from ucp.engine import bind_layout

        self.check_destination()
        spec, constants = self._spec_of(checkpoint)
        names = list(checkpoint.params)
        shapes = {n: tuple(checkpoint.array_info(n, "param").shape) for n in names}
        self._bound = bind_layout(spec, shapes, self.degrees, constants)
        found = {st for n in names for st in checkpoint.states(n)}
        self._states = sorted(found, key=lambda s: (s != "param", s))
        own = self._bound.own_states(names)
        units = [TargetUnit(key=rank_file_name(c), coords=c, fragments=self._bound.rank_fragments(shapes, c),
                            state_fragments={st: self._bound.rank_fragments(shapes, c, st) for st in own})
                 for c in self._bound.mesh()]
        self.dst.mkdir(parents=True, exist_ok=True)
        return units

    def _spec_of(self, checkpoint):
        """(spec, constants): the ones given, else the ones the checkpoint records."""
        from ucp.engine import load_spec, parse_spec

        md = checkpoint.metadata if isinstance(checkpoint.metadata, dict) else {}
        recorded = md.get("source", {}) if isinstance(md.get("source"), dict) else {}
        constants = self.options.get("constants")
        if constants is None:
            constants = recorded.get("constants", {})
        if self.spec is not None:
            return load_spec(self.spec), constants
        if not recorded.get("spec_text"):
            raise RanksError(f"{getattr(checkpoint, 'path', checkpoint)}: no --spec given and the checkpoint "
                             "records none")
        return parse_spec(recorded["spec_text"], recorded.get("spec") or "<recorded spec>"), constants

    def write_unit(self, unit: TargetUnit, tensors: Mapping[str, Mapping[str, Any]]) -> None:
        import torch

        out = {st: dict(tensors.get(st, {})) for st in self._states}  # every state, "param" first
        path = self.dst / unit.key
        self._written.append(path)
        torch.save(out, path)

    def finish(self, checkpoint) -> None:
        import torch

        from ucp.format.dtypes import dtype_name

        bound = self._bound
        md = checkpoint.metadata if isinstance(checkpoint.metadata, dict) else {}
        extra = {k: v for k, v in md.items() if k != "source"}
        params = []
        for n in checkpoint.params:
            entry = {"name": n, "shape": list(checkpoint.array_info(n, "param").shape),
                     "dtypes": {st: dtype_name(checkpoint.array_info(n, st).dtype) for st in checkpoint.states(n)}}
            scalars = checkpoint.param_meta(n).get("scalars")
            if scalars:
                entry["scalars"] = scalars
            params.append(entry)
        layout = {"format": FORMAT_NAME, "version": 1, "spec_name": bound.spec_name, "spec": bound.spec.text,
                  "degrees": bound.axis_degrees(), "constants": dict(bound.constants), "params": params,
                  "ranks": [{"coords": c, "file": rank_file_name(c)} for c in bound.mesh()]}
        if extra:
            # Non-tensor state may hold tensors (RNG states): a weights-only torch file, not JSON.
            self._written.append(self.dst / META_FILE)
            torch.save(extra, self.dst / META_FILE)
            layout["metadata_file"] = META_FILE
        tmp = self.dst / (LAYOUT_FILE + ".tmp")
        self._written.append(tmp)
        tmp.write_text(json.dumps(layout, indent=1))
        os.replace(tmp, self.dst / LAYOUT_FILE)

    def abort(self) -> None:
        self.remove_written(self._written)


def save_ranks(states: Mapping[str, Mapping[str, torch.Tensor]], dst, *, spec_text: str,
               spec_name: str = "<spec>", degrees: Mapping[str, int],
               constants: Optional[Mapping[str, int]] = None,
               scalars: Optional[Mapping[str, Mapping[str, Any]]] = None,
               metadata: Optional[Mapping[str, Any]] = None, progress: bool = False) -> Path:
    """Write every rank's local tensors for ``degrees`` (what each rank of a run would save)
    from full tensors ``{state: {name: tensor}}`` ("param" holds every parameter, in model
    order), through the same engine and target as ``ucp export --to ranks``."""
    from ucp.engine import MemoryCheckpoint, export, parse_spec

    ck = MemoryCheckpoint(states, scalars=scalars, metadata=metadata)
    target = RanksTarget(dst, degrees=degrees, spec=parse_spec(spec_text, spec_name),
                         constants=dict(constants or {}))
    return export(ck, target, progress=progress)
