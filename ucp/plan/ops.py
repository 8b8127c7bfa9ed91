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

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence, Union

#: Split conventions for dividing ``n`` items into ``k`` ranks.
#: ``chunk``: torch.chunk / DTensor Shard: ceil(n/k) each, the last ranks may get fewer or none.
#: ``tensor_split``: torch.tensor_split / numpy.array_split: the first n % k ranks get one more.
#: ``even``: must divide exactly, otherwise an error.
#: ``sizes``: explicit per-rank sizes (uneven boxes as saved by the framework).
SPLITS = ("chunk", "tensor_split", "even", "sizes")

#: How a grouped ``Flat`` partitions its members (``Flat.partition``).
#: ``buffer``: the members are concatenated and the buffer (or each bucket of it) is split
#: into ``degree`` equal partitions (ZeRO-1/2, Megatron's distributed optimizer, FSDP1).
#: ``each``: every member is partitioned on its own and rank r concatenates its own
#: partitions of the members (ZeRO-3's fp32 partition).
PARTITIONS = ("buffer", "each")

#: The order of a group's members (``Flat.order``): ``model`` (parameter order),
#: ``reverse`` (Megatron's buffers: backward order), ``round_robin`` (DeepSpeed's
#: ``round_robin_gradients``: members ``i % degree == 0`` first, then ``== 1``, ...).
ORDERS = ("model", "reverse", "round_robin")


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

    ``partition="each"``: every member is padded to a multiple of ``align * degree`` and
    split into ``degree`` equal partitions on its own; rank r's local tensor is the
    concatenation of its partitions of the members (ZeRO-3's ``fp32_partitioned_groups_flat``).

    ``bucket > 0`` cuts the concatenation into buckets: a bucket ends after the member that
    brings it to at least ``bucket`` elements (of the buffer for ``buffer``, of the rank's
    partitions for ``each``). ``buffer`` buckets are padded to ``align * degree`` and
    partitioned one by one (Megatron-Core's ``_ParamAndGradBuffer``); ``each`` buckets are
    ZeRO-3's sub-groups (``sub_group_size``). Each bucket is a local tensor of its own,
    named ``"{group}.{bucket index}"``.

    ``order`` is the order of the members in the buffer (``ORDERS``). ``strip``: the saved
    partitions have their trailing padding cut off (DeepSpeed ZeRO-1/2 saves
    ``single_partition_of_fp32_groups`` and the Adam moments so), so the last partitions
    are shorter.
    """
    axis: str
    group: Optional[str] = None
    align: int = 1
    param_align: int = 1
    partition: str = "buffer"
    bucket: int = 0
    order: str = "model"
    strip: bool = False


@dataclass(frozen=True)
class Pad:
    """The framework's tensor has ``dim`` padded up to a multiple of ``multiple``
    (vocabulary padding). Without ``keep`` the padding is not part of the universal tensor
    (dropped on convert, zeros on export). With ``keep`` the source's padding rows are part
    of the universal tensor (Megatron trains the padded rows of the output layer): its dim
    is the saved padded size, a layout that pads further appends zero rows, one that pads
    less keeps the saved rows (they hold trained values)."""
    dim: int
    multiple: int
    keep: bool = False


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

    def part_sizes(self, n: int) -> tuple[int, ...]:
        """The sizes of the parts of a dimension of size ``n``: THE parts-size rule (explicit
        ``sizes`` must add up to ``n``; without them ``n`` splits into equal parts; with
        ``groups > 1`` every part must split into ``groups`` blocks). ``ValueError`` says
        what does not fit."""
        m = len(self.names)
        if m == 0:
            raise ValueError("parts needs at least one name")
        if self.sizes is None:
            if n % m:
                raise ValueError(f"parts {', '.join(self.names)}: dim {self.dim} of size {n} does "
                                 f"not split into {m} equal parts: expected sizes=[...]")
            sizes = (n // m,) * m
        else:
            sizes = tuple(int(s) for s in self.sizes)
            if len(sizes) != m or any(s < 0 for s in sizes) or sum(sizes) != n:
                raise ValueError(f"parts {', '.join(self.names)}: sizes {list(sizes)} sum to "
                                 f"{sum(sizes)}, but dim {self.dim} is of size {n}")
        if self.groups < 1:
            raise ValueError(f"parts groups must be >= 1, got {self.groups}")
        bad = [f"{nm}={s}" for nm, s in zip(self.names, sizes) if s % self.groups]
        if bad:
            raise ValueError(f"parts {', '.join(bad)} not divisible by groups={self.groups}")
        return sizes

    def part_range(self, part: str, n: int) -> tuple[int, int]:
        """``(start, stop)`` of ``part`` along ``dim`` of the universal (part-major) tensor."""
        sizes = self.part_sizes(n)
        i = self.names.index(part)
        start = sum(sizes[:i])
        return start, start + sizes[i]


@dataclass(frozen=True)
class Renumber:
    """A name capture (a layer or expert index) is split over an axis: global item ``i``
    lives on the rank whose range contains it, under local index ``i - start(rank)``.
    Pipeline stages (``over=pp``) and expert parallelism (``over=ep``) both use it.
    With ``chunks = V > 1`` (interleaved virtual pipeline stages) the ``count`` items are
    split into ``V * degree`` consecutive chunks; chunk ``c`` lives on rank ``c % degree``
    as its model chunk ``c // degree`` (its index goes to the local capture ``chunk``), and
    item ``i`` is local item ``i - start(c)`` of its chunk. ``sizes`` then has one entry per
    chunk.
    """
    capture: str
    axis: str
    count: int
    split: str = "tensor_split"
    sizes: Optional[tuple[int, ...]] = None
    chunks: int = 1
    chunk: Optional[str] = None


TensorOp = Union[Shard, Replicate, Average, Flat, Pad, Parts]


@dataclass(frozen=True)
class BoundRule:
    """One rule of a spec with every expression evaluated.

    ``states`` gives states their own pipelines (``state exp_avg, exp_avg_sq = ...``):
    ``ops`` is the layout of every state not listed there. ``axes``, when not empty, are
    the mesh axes this rule's ranks are indexed by (a spec with two decompositions of the
    same ranks: dense tp x dp, experts etp x ep x edp); axes outside it are ignored, not
    replicated. ``positions`` holds the source position of every op (``ops`` order, then
    each state's ops in ``states`` order; ``ucp.plan.errors.Pos``), so that errors found
    while planning point at the op.
    """
    pattern: str                      # universal name, e.g. "layers.{i}.mlp.fc1.weight"
    local: str                        # framework-local name pattern; same captures
    ops: tuple[TensorOp, ...] = ()
    renumber: tuple[Renumber, ...] = ()
    origin: str = ""                  # "file:line:col" of the rule, recorded in metadata
    attrs: tuple[tuple[str, object], ...] = field(default=())  # e.g. (("frozen", True),)
    states: tuple[tuple[str, tuple[TensorOp, ...]], ...] = ()
    axes: tuple[str, ...] = ()
    positions: tuple = field(default=(), compare=False, repr=False)
    renumber_positions: tuple = field(default=(), compare=False, repr=False)

    def attr(self, key: str, default=None):
        """The value of attribute ``key`` (``with key(...)``), or ``default``."""
        return next((v for k, v in self.attrs if k == key), default)

    @property
    def skip(self) -> bool:
        """``with skip``: known and deliberately not converted (no fragments anywhere)."""
        return bool(self.attr("skip"))

    @property
    def tied(self) -> Optional[str]:
        """``with tied("x")``: the universal tensor is ``x``'s. Where this rule's layout has
        no ``flat``, the framework holds a copy of ``x`` under this rule's local name
        (fragments named ``x``); a flat layout (optimizer state, ZeRO-3 partitions) holds
        ``x`` once, so the tied name has no fragments there."""
        return self.attr("tied")

    @property
    def copy_of(self) -> Optional[str]:
        """``with copy_of("x")``: a parameter of its own that the framework keeps equal to
        ``x`` (Megatron's shared output layer on the last stage): fragments named ``x`` in
        every layout, flat ones included (its optimizer state is a replica of ``x``'s)."""
        return self.attr("copy_of")

    @property
    def frozen(self) -> bool:
        """``with frozen``: no optimizer state; in no flat group."""
        return bool(self.attr("frozen"))

    def ops_for(self, state: Optional[str]) -> tuple[TensorOp, ...]:
        """The pipeline of ``state`` (``None`` or a state without its own: ``ops``)."""
        return dict(self.states).get(state, self.ops) if state is not None else self.ops

    def positions_for(self, state: Optional[str]) -> Sequence:
        """Source positions of ``ops_for(state)``, aligned with it (empty when unknown)."""
        if not self.positions:
            return ()
        start = len(self.ops)
        for name, ops in self.states:
            if name == state:
                return self.positions[start:start + len(ops)]
            start += len(ops)
        return self.positions[:len(self.ops)]

    def for_state(self, state: Optional[str], *, frozen: bool = False) -> "BoundRule":
        """This rule as one pipeline: the layout of ``state``, and for a frozen parameter
        the layout outside every flat group (a ``buffer`` group is dropped, an ``each``
        group becomes the member's own partition)."""
        ops = self.ops_for(state)
        pos = tuple(self.positions_for(state))
        if frozen or self.frozen:
            keep = [i for i, op in enumerate(ops)
                    if not (isinstance(op, Flat) and op.group is not None and op.partition == "buffer")]
            ops = tuple(replace(op, group=None, partition="buffer", bucket=0)
                        if isinstance(op, Flat) and op.group is not None else op
                        for op in (ops[i] for i in keep))
            pos = tuple(pos[i] for i in keep) if pos else ()
        return replace(self, ops=ops, states=(), positions=pos)
