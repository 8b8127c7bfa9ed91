"""Bound layout operations: the contract between the language and the planner.

A spec rule, once its expressions are evaluated against the run's degrees and constants
(``Spec.bind``), becomes a ``BoundRule``: a universal-name pattern, the framework's local
name pattern, and an ordered tuple of the operations below. The planner (``ucp.plan``)
consumes only these frozen dataclasses, so it stays pure and testable without a parser.

Reading a rule left to right describes how the *universal* tensor (the consolidated,
unpadded, part-major tensor stored in the checkpoint) becomes one rank's *local* tensor:

- ``Pad`` and ``Parts`` change the framework's view of the whole tensor (padding rows that
  the universal form does not store; fused sub-parameters and their interleaving);
- ``Shard`` picks this rank's block along a dimension for a parallel axis;
- ``Replicate`` / ``Average`` say that ranks along an axis hold the same (or averaged) data;
- ``Flat`` flattens the current local tensor and keeps this rank's contiguous flat range
  (ZeRO / FSDP1 flat partitions), alone or concatenated with the other tensors of a group.

Axes a rule does not mention are replicated. Degrees of axes that the layout does not give
are 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

#: Split conventions for dividing ``n`` items into ``k`` ranks.
#: ``chunk``: torch.chunk / DTensor Shard: ceil(n/k) each, the last ranks may get fewer or none.
#: ``tensor_split``: torch.tensor_split / numpy.array_split: the first n % k ranks get one more.
#: ``even``: must divide exactly, otherwise an error.
#: ``sizes``: explicit per-rank sizes (uneven boxes as saved by the framework).
SPLITS = ("chunk", "tensor_split", "even", "sizes")


@dataclass(frozen=True)
class Shard:
    dim: int
    axis: str
    split: str = "chunk"
    sizes: Optional[tuple[int, ...]] = None  # only with split == "sizes"; len == degree


@dataclass(frozen=True)
class Replicate:
    axis: str


@dataclass(frozen=True)
class Average:
    """Replicas along ``axis`` may differ (e.g. layer norms under sequence parallel);
    the universal tensor is their mean, and every replica gets it back on export."""
    axis: str


@dataclass(frozen=True)
class Flat:
    """Flatten the current local tensor and keep this rank's contiguous share.

    ``group is None``: the tensor alone is flattened, padded to a multiple of
    ``align * degree`` and split into ``degree`` equal contiguous partitions (ZeRO-3).
    Otherwise every tensor whose rule names the same ``group`` is concatenated, in parameter
    order, each starting at a multiple of ``param_align``; the whole buffer is padded to a
    multiple of ``align * degree`` and split into ``degree`` equal partitions (ZeRO-1/2,
    FSDP1 flat parameters). The local tensor is then the rank's 1-D partition of the group.
    """
    axis: str
    group: Optional[str] = None
    align: int = 1
    param_align: int = 1


@dataclass(frozen=True)
class Pad:
    """The framework's tensor has ``dim`` padded up to a multiple of ``multiple``
    (vocabulary padding). The padding is not part of the universal tensor."""
    dim: int
    multiple: int


@dataclass(frozen=True)
class Parts:
    """Dimension ``dim`` is a fusion of named sub-parameters.

    The universal tensor is part-major along ``dim``: [p0; p1; ...] with ``sizes``
    (``None``: equal sizes). With ``groups == 1`` the framework lays the parts out the same
    way, and a following ``Shard`` on ``dim`` splits *each part* separately, the local tensor
    being the concatenation of the rank's share of every part (Megatron SwiGLU fc1:
    [gate_r; up_r]). With ``groups == G > 1`` the framework interleaves them by group:
    for g in range(G): [p0 block g; p1 block g; ...] (each part holding sizes[p] / G per
    group; Megatron GQA QKV), and a following ``Shard`` on ``dim`` splits whole groups.
    """
    dim: int
    names: tuple[str, ...]
    sizes: Optional[tuple[int, ...]] = None
    groups: int = 1


@dataclass(frozen=True)
class Renumber:
    """A name capture (a layer or expert index) is split over an axis: global item ``i``
    lives on the rank whose range contains it, under local index ``i - start(rank)``.
    Pipeline stages (``over=pp``) and expert parallelism (``over=ep``) both use it."""
    capture: str
    axis: str
    count: int
    split: str = "tensor_split"
    sizes: Optional[tuple[int, ...]] = None


TensorOp = Union[Shard, Replicate, Average, Flat, Pad, Parts]


@dataclass(frozen=True)
class BoundRule:
    """One rule of a spec with every expression evaluated."""
    pattern: str                      # universal name, e.g. "layers.{i}.mlp.fc1.weight"
    local: str                        # framework-local name pattern; same captures
    ops: tuple[TensorOp, ...] = ()
    renumber: tuple[Renumber, ...] = ()
    origin: str = ""                  # "file:line:col" of the rule, recorded in metadata
    attrs: tuple[tuple[str, object], ...] = field(default=())  # e.g. (("frozen", True),)
