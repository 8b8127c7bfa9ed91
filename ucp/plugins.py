"""What sources and targets share as plug-ins: a registry filled by subclassing, found by
importing every public module of the plug-in package once, and the refusal of options a
plug-in does not take. ``ucp.sources`` and ``ucp.targets`` each keep one :class:`Registry`.
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import ClassVar

from ucp.errors import UcpError


class Registry:
    """Plug-in classes of one kind by name. Modules of ``package`` whose names do not start
    with ``_`` are imported the first time the registry is read (each registers its classes
    as they are defined), so that ``import ucp`` stays cheap."""

    def __init__(self, package: str, kind: str):
        self.package, self.kind = package, kind
        self._classes: dict[str, type] = {}
        self._loaded = False

    def add(self, cls: type) -> None:
        """Register ``cls`` under ``cls.name``."""
        self._classes[cls.name] = cls

    def all(self) -> dict[str, type]:
        """Every registered class by name."""
        if not self._loaded:
            path = importlib.import_module(self.package).__path__
            for mod in pkgutil.iter_modules(path):
                if not mod.name.startswith("_"):
                    importlib.import_module(f"{self.package}.{mod.name}")
            self._loaded = True
        return dict(self._classes)

    def get(self, name: str) -> type:
        """The class called ``name``; a clear error lists the known names."""
        known = self.all()
        if name not in known:
            raise UcpError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(known))}")
        return known[name]


class Plugin:
    """Base of sources and targets: subclasses with a ``name`` join their kind's registry
    (``registry``), unless declared with ``register=False`` (plug-ins made for one test)."""
    #: the ``--from`` / ``--to`` name
    name: ClassVar[str] = ""
    #: one line for ``--help``
    description: ClassVar[str] = ""
    registry: ClassVar[Registry]

    def __init_subclass__(cls, register: bool = True, **kw):
        super().__init_subclass__(**kw)
        if cls.name and register:
            cls.registry.add(cls)

    def reject_options(self, allowed=()) -> None:
        """Raise a clear error naming every option this plug-in was given but does not take
        (``None`` values count as not given); call it from ``__init__``."""
        extra = sorted(k for k, v in self.options.items() if v is not None and k not in allowed)
        if extra:
            flags = ", ".join(f"{k} (--{k.replace('_', '-')})" for k in extra)
            takes = ", ".join(sorted(allowed)) or "no other options"
            raise UcpError(f"{self.registry.kind} {self.name!r} does not take {flags}; it takes {takes}")


def lies_within(inner, outer) -> bool:
    """Whether the local path ``inner`` is ``outer`` or lies inside it (links resolved); False
    where either is a URL of another store."""
    from ucp.format.store import local_root

    a, b = local_root(inner), local_root(outer)
    if a is None or b is None:
        return False
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or b in a.parents


def local_path(path, role: str) -> Path:
    """``path`` as a local ``Path`` for a plug-in that reads or writes local files only (``role``
    names it in the error). A ``file://`` URL is its path; any other URL is refused: ``Path``
    would quietly turn ``s3://bucket/x`` into the local folder ``s3:/bucket/x``, and an export
    there reported success while writing nothing to the bucket."""
    from ucp.format.store import local_root

    root = local_root(path)
    if root is not None:
        return Path(root)
    raise UcpError(f"{path}: {role} local files only; copy the checkpoint between the store and a local "
                   "folder with the store's own tools (only universal checkpoints are read and written "
                   "at URLs)")
