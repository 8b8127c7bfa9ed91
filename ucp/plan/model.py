"""The plan as plain data: :class:`Piece` (a universal box and where it lies in a local
tensor), :class:`Fragment` (one rank's share of one universal tensor) and :class:`Read` (one
copy of a resharding plan)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

from ucp.plan.boxes import Box

Shape = tuple[int, ...]


# ==================================================================== data model
@dataclass(frozen=True)
class Piece:
    """``universal[src]`` in row-major order equals ``local[dst]`` in row-major order.

    Same shapes: a plain box copy. Flat partitions: ``dst`` is a 1-D range of the local
    buffer and ``src`` a box of the universal tensor.
    """
    src: Box
    dst: Box

    def __post_init__(self):
        if self.src.numel != self.dst.numel:
            raise ValueError(f"piece {self.src} -> {self.dst}: sizes differ")

    @property
    def is_box(self) -> bool:
        return self.src.shape == self.dst.shape

    @property
    def numel(self) -> int:
        return self.src.numel


@dataclass(frozen=True)
class Fragment:
    """One rank's share of one universal tensor.

    ``local_shape`` is the whole local tensor (for grouped ``Flat``: the rank's partition of
    the group buffer ``local_name``); positions no piece covers are padding. ``replica``:
    a Replicate / Average / unmentioned axis has a coordinate other than 0. ``weight`` is
    ``1 / n`` over the Average axes (1.0 otherwise). ``tied_from``: the fragment is the
    copy of ``name`` that a tied parameter (``with tied(name)``) holds under its own local
    name; reading it gives ``name``'s values (on convert it is one more replica).
    """
    name: str
    local_name: str
    coords: tuple[tuple[str, int], ...]
    local_shape: Shape
    pieces: tuple[Piece, ...]
    replica: bool = False
    weight: float = 1.0
    global_shape: Shape = ()
    replicated: tuple[str, ...] = ()   # axes whose ranks hold the same data
    averaged: tuple[str, ...] = ()     # axes whose ranks hold data to be averaged
    group: Optional[str] = None        # Flat group key (== local_name) or None
    origin: str = ""                   # the rule that produced it ("file:line:col")
    tied_from: Optional[str] = None    # a tied parameter's copy of ``name``: the tied name

    def coord(self, axis: str) -> int:
        return dict(self.coords).get(axis, 0)

    @property
    def numel(self) -> int:
        """Universal elements held (padding excluded)."""
        return sum(p.numel for p in self.pieces)

    @property
    def local_numel(self) -> int:
        return math.prod(self.local_shape)

    @property
    def partition_key(self) -> tuple:
        """Identifies the data held up to replication: name and partitioning coordinates."""
        skip = set(self.replicated) | set(self.averaged)
        return (self.name, tuple((a, c) for a, c in self.coords if a not in skip))

    def describe(self) -> str:
        cs = ", ".join(f"{a}={c}" for a, c in self.coords)
        return f"{self.local_name} ({cs or 'single rank'})"

    def to_dict(self) -> dict:
        """JSON-ready form (metadata of the source fragmentation); :meth:`from_dict` inverts it."""
        return {"name": self.name, "local_name": self.local_name, "coords": dict(self.coords),
                "local_shape": list(self.local_shape),
                "pieces": [[list(p.src.start), list(p.src.stop), list(p.dst.start), list(p.dst.stop)]
                           for p in self.pieces],
                "replica": self.replica, "weight": self.weight, "global_shape": list(self.global_shape),
                "replicated": list(self.replicated), "averaged": list(self.averaged),
                "group": self.group, "origin": self.origin,
                **({"tied_from": self.tied_from} if self.tied_from else {})}

    @staticmethod
    def from_dict(d: Mapping) -> "Fragment":
        return Fragment(name=d["name"], local_name=d.get("local_name", d["name"]),
                        coords=tuple((str(a), int(c)) for a, c in dict(d.get("coords", {})).items()),
                        local_shape=tuple(d["local_shape"]),
                        pieces=tuple(Piece(Box(tuple(a), tuple(b)), Box(tuple(c), tuple(e)))
                                     for a, b, c, e in d.get("pieces", ())),
                        replica=bool(d.get("replica", False)), weight=float(d.get("weight", 1.0)),
                        global_shape=tuple(d.get("global_shape", ())),
                        replicated=tuple(d.get("replicated", ())), averaged=tuple(d.get("averaged", ())),
                        group=d.get("group"), origin=d.get("origin", ""),
                        tied_from=d.get("tied_from"))


@dataclass(frozen=True)
class Read:
    """Copy ``saved[saved_index][saved_dst]`` into ``want[want_dst]`` (row-major order,
    equal sizes); both hold the universal region ``src``. ``weight != 1`` for Average
    replicas: accumulate ``want[want_dst] += weight * saved[...]``. ``saved_index == -1``
    reads the universal tensor itself (``saved_dst == src``)."""
    saved_index: int
    saved_dst: Box
    want_dst: Box
    src: Box
    weight: float = 1.0

    @property
    def numel(self) -> int:
        return self.src.numel
