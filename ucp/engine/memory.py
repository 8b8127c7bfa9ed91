"""Full tensors in memory, seen through the read-only interface of a universal checkpoint.

``ucp.engine.export`` reads any object with this interface, so the same targets that export a
universal checkpoint also write a framework layout straight from a training job's tensors
(``ucp.targets.ranks.save_ranks`` does, and tests use it to build fixtures at any degree).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ucp.errors import UcpError


@dataclass(frozen=True)
class MemoryArrayInfo:
    """The part of ``ucp.format.ArrayInfo`` that planning needs."""
    name: str
    state: str
    shape: tuple
    dtype: Any


class MemoryCheckpoint:
    """``states`` = ``{state: {name: full tensor}}`` ("param" holds every parameter, in model
    order); ``scalars`` = ``{name: {key: number}}``; ``metadata``: non-tensor state."""

    def __init__(self, states: Mapping[str, Mapping[str, Any]], *,
                 scalars: Optional[Mapping[str, Mapping[str, Any]]] = None,
                 metadata: Optional[Mapping[str, Any]] = None,
                 param_meta: Optional[Mapping[str, Mapping[str, Any]]] = None):
        if "param" not in states:
            raise UcpError("in-memory states need a 'param' entry holding every parameter")
        self._states = states
        self._scalars = dict(scalars or {})
        self._param_meta = dict(param_meta or {})
        self.metadata = dict(metadata or {})
        self.params = list(states["param"])
        self.path = "<memory>"

    def states(self, name: str) -> list[str]:
        """The states ``name`` has, ``param`` first."""
        return [st for st in self._states if name in self._states[st]]

    def _tensor(self, name: str, state: str):
        try:
            return self._states[state][name]
        except KeyError:
            raise UcpError(f"in-memory checkpoint: no state {state!r} of parameter {name!r}") from None

    def array_info(self, name: str, state: str = "param") -> MemoryArrayInfo:
        """Shape and dtype of one state of one parameter."""
        t = self._tensor(name, state)
        return MemoryArrayInfo(name, state, tuple(t.shape), t.dtype)

    def holder(self, name: str) -> str:
        """Every parameter here holds its own tensors (``ucp.format``'s reader: an alias stored
        once is held by its ``tied_to``)."""
        return name

    def param_meta(self, name: str) -> dict:
        """Per-parameter metadata given for ``name``, with its scalars."""
        meta = dict(self._param_meta.get(name, {}))
        if name in self._scalars:
            meta["scalars"] = dict(self._scalars[name])
        return meta

    def read_box(self, name: str, state: str, start, stop, out=None):
        """The box ``[start, stop)`` of one state (a view; copied into ``out`` when given)."""
        box = self._tensor(name, state)[tuple(slice(int(a), int(b)) for a, b in zip(start, stop))]
        if out is None:
            return box
        out.copy_(box)
        return out
