"""Sources: readers of framework checkpoints, as plug-ins of the one conversion engine.

A source only *describes* a checkpoint and hands out local tensors; the engine
(``ucp.engine.convert``) does everything else once for every framework: coverage checks,
the torchrun split, replica dedupe / averaging, streaming boxes to the writer, resume,
progress and commit.

Adding a framework = one module here that defines a :class:`Source` subclass (registered
when the module is imported: the registry below imports every module of this package
lazily, the first time a name is asked for), one module in ``ucp.targets`` and one spec in
``ucp/converters/``. Keep heavy imports (torch.distributed, the framework itself) inside
methods: the CLI imports every source to list their names.

The description is plain data:

* :class:`SourceParam` — one universal parameter: global shape, the logical dtype of each
  state, the fragments (``ucp.plan.Fragment``) that the source's ranks hold of it (one list
  for every state, or per state where states are laid out differently, e.g. ZeRO-1/2 whole
  bf16 weights next to flat-partitioned fp32 master and Adam moments), scalar per-parameter
  state (Adam ``step``) and metadata (``frozen``, ``tied``, the rule that produced it).
* :class:`SourceLayout` — every parameter in model order, the spec and degrees that
  produced it (recorded so that ``export`` can reproduce the layout), and the non-tensor
  state (iteration, lr scheduler, RNG, ...), JSON-like (tensors allowed: the writer stores
  them as small arrays).

A fragment's ``coords`` and ``local_name`` are all a source needs to find its tensor:
sources whose fragments do not come from a spec (DCP, Megatron ``torch_dist``) build
``Fragment`` objects from their own metadata and may put any coordinates they like in them
(e.g. ``{"file": 3}``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Optional, Sequence

from ucp.errors import UcpError
from ucp.plugins import Plugin, Registry, local_path


@dataclass(frozen=True)
class SourceParam:
    """One universal parameter as a source holds it."""
    name: str
    shape: tuple[int, ...]
    dtypes: Mapping[str, Any]                 # state -> torch.dtype ("param" first)
    fragments: Sequence[Any]                  # ucp.plan.Fragment, for every state ...
    state_fragments: Mapping[str, Sequence[Any]] = field(default_factory=dict)  # ... unless overridden
    scalars: Mapping[str, Any] = field(default_factory=dict)   # e.g. {"step": 3}
    meta: Mapping[str, Any] = field(default_factory=dict)      # FORMAT.md keys: rule, parts, padding,
    #     frozen, tied_to; other JSON keys are kept as given (the engine adds fragmentation and scalars)
    state_shapes: Mapping[str, tuple] = field(default_factory=dict)   # state -> shape, where not ``shape``

    def fragments_of(self, state: str) -> Sequence[Any]:
        """The fragments that hold ``state`` of this parameter."""
        return self.state_fragments.get(state, self.fragments)

    def shape_of(self, state: str) -> tuple[int, ...]:
        """The shape of ``state``: the parameter's, but for a state an optimizer keeps in another
        (Adafactor's factored ``row_var`` / ``col_var``)."""
        return tuple(self.state_shapes.get(state, self.shape))


@dataclass(frozen=True)
class SourceLayout:
    """Everything the engine needs to know about a framework checkpoint before reading data."""
    params: Sequence[SourceParam]             # model order (the manifest keeps it)
    metadata: Mapping[str, Any] = field(default_factory=dict)  # non-tensor state, JSON-like
    spec_name: Optional[str] = None           # the spec that produced the fragments, if any
    spec_text: Optional[str] = None
    degrees: Mapping[str, int] = field(default_factory=dict)
    constants: Mapping[str, int] = field(default_factory=dict)


class Source(Plugin):
    """Base class of every source. Subclasses set ``name`` / ``description`` and implement
    :meth:`detect`, :meth:`layout` and :meth:`local`.

    Order of calls by the engine: ``detect`` (only for ``--from auto``), ``__init__``,
    ``layout`` once, ``read`` (by default through ``local``) any number of times, ``close``
    (always, also after an error).

    Boxes (what ``read``, ``local`` and ``view`` return) are torch tensors, or numpy arrays in
    the storage dtype (``ucp.format.dtypes``: a bfloat16 box is ``uint16``) for a source that
    reads without torch, as the DeepSpeed source does; the layout's dtypes are then
    ``ucp.format.dtypes.Dtype`` s. The engine and the writer take both and never cast.

    Optional: ``read_into(fragment, state, piece, out) -> bool`` fills ``out``, a contiguous
    numpy array of shape ``piece.src.shape`` in the storage dtype (the engine's gather buffer),
    straight from the file and returns True, or returns
    False with ``out`` untouched when it cannot (then ``read`` is used). A source that has it
    lets the engine gather a whole state into one recycled buffer with one copy, so the writer
    takes every chunk whole; without it gathering would add a copy, so the engine streams boxes
    (see ``ucp.engine.to_universal.write_state``). The DeepSpeed source has one.

    Optional too: ``view(fragment, state, piece)`` returns the piece (shape
    ``piece.src.shape``) over the file's bytes with no copy (a private memory map), or None
    when it cannot; the engine writes a gathered band that one piece covers from it as it is.
    The DeepSpeed source has one.
    """
    #: ``--from auto`` tries sources in ascending priority (more specific layouts first)
    priority: ClassVar[int] = 100

    def __init__(self, path, *, spec: Optional[str] = None, storage_options=None, **options):
        self.path = local_path(path, f"the {self.name} source reads")
        self.spec = spec
        self.storage_options = storage_options
        self.options = options

    @classmethod
    def detect(cls, path) -> bool:
        """True when ``path`` looks like this source's checkpoint, from file names and small
        index files only (never by unpickling)."""
        return False

    def layout(self) -> SourceLayout:
        """Describe the checkpoint (shapes, dtypes, fragments, metadata). May read indexes and
        metadata files, never tensor data."""
        raise NotImplementedError

    def local(self, fragment, state: str):
        """The local tensor (shape ``fragment.local_shape``) that holds ``state`` of
        ``fragment``; memory-mapped where the files allow it, so only the bytes the engine
        touches are read. Errors name the file, the parameter and the problem."""
        raise NotImplementedError

    def read(self, fragment, state: str, piece):
        """The universal box ``piece.src`` of ``state``, as ``fragment`` holds it at ``piece.dst``
        of its local tensor (shape ``piece.src.shape``). The default slices :meth:`local` (and
        checks its shape); sources that can read a byte range directly (safetensors, ``.distcp``
        files) override this so that only the piece's bytes are read."""
        t = self.local(fragment, state)
        if tuple(t.shape) != tuple(fragment.local_shape):
            raise UcpError(f"{self.describe(fragment, state)}: local tensor has shape {tuple(t.shape)}, "
                           f"the layout implies {tuple(fragment.local_shape)}")
        return t[piece.dst.slices()].reshape(piece.src.shape)

    def describe(self, fragment, state: str) -> str:
        """Where ``state`` of ``fragment`` lives, for error messages (override to name the file)."""
        return f"{self.path}: {state} of {fragment.name} ({fragment.describe()})"

    def fingerprint(self):
        """A JSON value that changes when the source's files change; a resumed conversion
        refuses a source whose fingerprint differs from the interrupted run's. Default: the
        name, size and mtime of every file under a local ``path`` (None elsewhere)."""
        import os

        from ucp.format import source_fingerprint

        path = os.fspath(self.path) if isinstance(self.path, (str, os.PathLike)) else None
        return source_fingerprint(path) if path and os.path.exists(path) else None

    def close(self) -> None:
        """Release files and maps."""


Source.registry = Registry(__name__, "source")


def sources() -> dict[str, type[Source]]:
    """Every registered source by name."""
    return Source.registry.all()


def get_source(name: str) -> type[Source]:
    """The source class called ``name``; a clear error lists the known names."""
    return Source.registry.get(name)


def detect(path) -> str:
    """The name of the source that recognises ``path`` (``--from auto``)."""
    for cls in sorted(sources().values(), key=lambda c: (c.priority, c.name)):
        if cls.detect(path):
            return cls.name
    raise UcpError(f"{path}: cannot tell which framework wrote this checkpoint; pass --from "
                   f"({'|'.join(sorted(sources()))})")
