"""Targets: writers of framework layouts, as plug-ins of the one export engine.

A target says which files it will write and which fragments (``ucp.plan.Fragment``) of the
universal tensors each file holds; the engine (``ucp.engine.export``) reads exactly those
boxes from the universal checkpoint, builds each file's local tensors and hands them over,
one unit at a time (memory is bounded by the largest unit, never the model). The target
turns them into the framework's files and, at the end, writes the non-tensor files
(``latest``, indexes, configs).

A *unit* is whatever the framework writes as one piece: a rank's file (rank files,
DeepSpeed ``*_optim_states.pt``), one safetensors shard (HF), one rank's share of a
``dcp.save`` (DCP, Megatron ``torch_dist``). Adding a framework = one module here defining a
:class:`Target` subclass (registered on import; the registry imports this package's modules
lazily), one module in ``ucp.sources`` and one spec in ``ucp/converters/``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Sequence

from ucp.errors import UcpError
from ucp.plugins import Plugin, Registry, local_path


@dataclass(frozen=True)
class TargetUnit:
    """One file (or one rank's share) the target writes, and the fragments it holds."""
    key: str                                   # e.g. "rank-tp0-dp1.pt", "model-00001-of-00003"
    coords: Mapping[str, int]
    fragments: Sequence[Any]                   # ucp.plan.Fragment, for every state ...
    state_fragments: Mapping[str, Sequence[Any]] = field(default_factory=dict)  # ... unless overridden
    states: Optional[Sequence[str]] = None     # states to fill (None: every state the checkpoint has)

    def fragments_of(self, state: str) -> Sequence[Any]:
        """The fragments of this unit that hold ``state``."""
        return self.state_fragments.get(state, self.fragments)


#: the lock an export holds in its destination while it writes (``ucp.engine.from_universal``)
EXPORT_LOCK = ".ucp-export.lock"


def remove_if_empty(folder: Path) -> None:
    """Remove ``folder`` if it is empty: no check first, since a job's processes clean up the same
    folders at the same moment (checking, then removing, raced)."""
    try:
        folder.rmdir()
    except OSError:   # not empty (an export's files, another process's still), gone, or no folder
        pass


class Target(Plugin):
    """Base class of every target. Subclasses set ``name`` / ``description`` and implement
    :meth:`plan`, :meth:`write_unit` and :meth:`finish`.

    Order of calls by the engine: ``__init__``, ``plan(checkpoint)`` once (refuse degrees
    the model cannot take here, before anything is written), ``write_unit`` once per unit in
    plan order, ``finish(checkpoint)`` once. On any error the engine calls ``abort`` and the
    destination holds nothing that looks like a complete checkpoint. Under torchrun (see
    :attr:`split_under_torchrun`) every process plans, writes its share of the units and
    aborts what it wrote on failure; only process 0 calls ``finish``.
    """
    #: under torchrun, every process plans and writes a share of the units, process 0 then
    #: calls ``finish``; False: process 0 runs the whole export while the others wait
    split_under_torchrun: ClassVar[bool] = True

    def __init__(self, dst, *, degrees: Mapping[str, int] | None = None, spec: Optional[str] = None,
                 storage_options=None, **options):
        self.dst = local_path(dst, f"the {self.name} target writes")
        self.degrees = checked_degrees(degrees)
        self.spec = spec
        self.storage_options = storage_options
        self.options = options

    def plan(self, checkpoint) -> Sequence[TargetUnit]:
        """The units to write, for the universal ``checkpoint`` (a ``ucp.format`` reader)."""
        raise NotImplementedError

    def check_destination(self) -> None:
        """Refuse a destination that holds anything, before anything is written: an export never
        mixes its files with others' (a framework would read them as one checkpoint), and
        :meth:`abort` can then remove exactly what it wrote."""
        if self.dst.exists() and (not self.dst.is_dir() or any(p.name != EXPORT_LOCK for p in self.dst.iterdir())):
            raise UcpError(f"{self.dst}: destination is not empty; export writes into a new or empty folder")

    def remove_written(self, paths: Sequence[Path], folders: Sequence[Path] = ()) -> None:
        """What :meth:`abort` does: unlink ``paths``, then remove each of ``folders`` left empty (the
        destination itself is the engine's: it made it, and removes it). Under torchrun every process
        removes the same folders at the same moment, so a folder gone or not empty is no error. A
        file that cannot be removed (a folder turned read-only) does not stop the others' removal;
        the first such error is raised after them."""
        failed = None
        for path in paths:
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                failed = failed or e
        for folder in folders:
            remove_if_empty(folder)
        if failed:
            raise failed

    def write_unit(self, unit: TargetUnit, tensors: Mapping[str, Mapping[str, Any]]) -> None:
        """Write one unit; ``tensors`` is ``{state: {local_name: tensor}}`` as
        ``ucp.loading.fill_locals`` builds it (padding positions zero)."""
        raise NotImplementedError

    def finish(self, checkpoint) -> None:
        """Write the non-tensor files (metadata, indexes, ``latest``) that make it complete."""

    def abort(self) -> None:
        """Called after a failure: leave nothing that a framework would take as complete."""


Target.registry = Registry(__name__, "target")


def is_count(value) -> bool:
    """Whether ``value`` is a whole number of at least 1 (an ``int``, not a ``bool``): what a degree or
    a size given from Python must be, as the command line's ``_positive`` makes them."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def checked_degrees(degrees: Mapping[str, Any] | None) -> dict[str, int]:
    """The degrees to write (``None`` values: not given), each a whole number of at least 1: the
    one check for every target, those that bind no spec included."""
    out = {}
    for axis, d in (degrees or {}).items():
        if d is None:
            continue
        if not is_count(d):
            raise UcpError(f"degree {axis}={d!r}: a degree is a whole number of at least 1 (1: no split along {axis})")
        out[axis] = d
    return out


def check_states_shaped_as_params(ck, names, why: str) -> None:
    """Every state of parameters ``names`` has its parameter's shape, for targets whose files lay
    every state out as its parameter (``why`` says how); a state an optimizer keeps in another
    shape (Adafactor's factored ``row_var`` / ``col_var``) is refused by name, before anything is
    written."""
    for name in names:
        shape = tuple(ck.array_info(name, "param").shape)
        for state in ck.states(name):
            other = tuple(ck.array_info(name, state).shape)
            if other != shape:
                raise UcpError(f"{getattr(ck, 'path', ck)}: state {state!r} of {name!r} has shape {list(other)}, "
                               f"not the parameter's {list(shape)} (a factored optimizer state, as Adafactor's): "
                               f"{why}")


def targets() -> dict[str, type[Target]]:
    """Every registered target by name."""
    return Target.registry.all()


def get_target(name: str) -> type[Target]:
    """The target class called ``name``; a clear error lists the known names."""
    return Target.registry.get(name)
