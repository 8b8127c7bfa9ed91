"""Binding a spec to a mesh: the part of planning every spec-driven source and target shares.

A spec-driven layout (rank files, and any framework declared in ``converters/``) is a spec
plus degrees and constants. Bound to the parameter names, it tells for every rank of the mesh
which fragments that rank holds; sources use it to describe their files, targets to plan
theirs, ``ucp.load_rank`` to read one rank. Sources whose files record their own fragments (offsets and shapes in an index) do not
need it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ucp.errors import UcpError


def load_spec(spec: Any):
    """A ``ucp.lang.Spec`` from a Spec, a spec file path or a bundled converters/ name."""
    from ucp.lang import Spec, load, parse

    if isinstance(spec, Spec):
        return spec
    if spec is None:
        raise UcpError("no spec given")
    p = Path(spec)
    if p.is_file():
        return parse(p.read_text(), filename=str(p))
    return load(spec)


def parse_spec(text: str, name: str):
    """A ``ucp.lang.Spec`` from spec text embedded in a checkpoint (``name`` for messages)."""
    from ucp.lang import parse

    return parse(text, filename=name)


def mesh_of(axes: Sequence[str], degrees: Mapping[str, int]) -> list[dict[str, int]]:
    """Every rank of the mesh a spec declares, row-major in the spec's axis order; axes of
    degree 1 are left out of the coordinates (rank files are named from them)."""
    from ucp.plan import mesh_coords

    return mesh_coords({a: int(degrees.get(a, 1)) for a in axes if int(degrees.get(a, 1)) > 1})


@dataclass(frozen=True)
class BoundLayout:
    """A spec bound to degrees, constants and parameter names (every name matched)."""
    spec: Any                     # ucp.lang.Spec
    bound: Any                    # ucp.lang.BoundSpec
    matches: Mapping[str, Any]    # name -> ucp.lang.Match
    degrees: Mapping[str, int]
    constants: Mapping[str, int]

    @property
    def spec_name(self) -> str:
        """The spec's file name (or the name given with its text), for metadata and messages."""
        return self.spec.filename

    def mesh(self) -> list[dict[str, int]]:
        """Coordinates of every rank, in rank order (see :func:`mesh_of`)."""
        return mesh_of(self.spec.axes, self.degrees)

    def axis_degrees(self) -> dict[str, int]:
        """The degree of every axis the spec declares (1 where not given)."""
        return {a: int(self.degrees.get(a, 1)) for a in self.spec.axes}

    def rank_fragments(self, shapes: Mapping[str, Sequence[int]], coords: Mapping[str, int],
                       state: str | None = None) -> list:
        """Every fragment (``ucp.plan.Fragment``) the rank at ``coords`` holds of ``state``
        (None: the rules' main pipelines), in ``shapes`` order (``BoundSpec.fragments``)."""
        return self.bound.fragments(shapes, dict(coords), state=state)

    def fragments_by_param(self, shapes: Mapping[str, Sequence[int]], state: str | None = None) -> dict[str, list]:
        """The fragments of every rank of the mesh, grouped by parameter (rank order)."""
        out: dict[str, list] = {n: [] for n in shapes}
        for coords in self.mesh():
            for f in self.rank_fragments(shapes, coords, state):
                out[f.name].append(f)
        return out

    def own_states(self, names: Sequence[str]) -> list[str]:
        """The states some rule of ``names`` lays out with a pipeline of their own
        (``state exp_avg, exp_avg_sq = ...``); every other state follows the main one."""
        return sorted({st for n in names for st, _ in self.matches[n].rule.states})

    def param_meta(self, name: str, shape: Sequence[int]) -> dict:
        """Per-parameter metadata the rule implies: its origin, parts, padding, frozen, tied."""
        from ucp.plan.meta import rule_metadata

        rule = self.matches[name].rule
        return {"rule": rule.origin, **rule_metadata(rule, shape)}


def bind_layout(spec, names: Sequence[str], degrees: Mapping[str, int],
                constants: Mapping[str, int] | None = None) -> BoundLayout:
    """Bind ``spec`` (anything :func:`load_spec` takes) and match every name; an error lists
    every parameter no rule matches."""
    spec = load_spec(spec)
    degrees, constants = dict(degrees), dict(constants or {})
    bound = spec.bind(degrees=degrees, constants=constants)
    return BoundLayout(spec, bound, bound.resolve(list(names)), degrees, constants)
