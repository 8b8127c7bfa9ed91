"""The one conversion engine: runs any source (framework -> universal) and any target
(universal -> framework), so that adding a framework is one source file, one target file and
one spec.

    ucp.engine.convert(source, dst, workers=None, resume=False, overwrite=False,
                       progress=False, storage_options=None, distributed=None)
    ucp.engine.export(checkpoint_or_path, target, progress=False, storage_options=None,
                      distributed=None)

``ucp.convert`` / ``ucp.export`` pick the plug-in by name from the registries
(``ucp.sources``, ``ucp.targets``) and call these. Spec-driven plug-ins bind their spec with
:func:`bind_layout`. No framework names appear in this package.
"""
from ucp.engine.from_universal import export, open_universal, unit_tensors
from ucp.engine.jobs import torchrun_rank
from ucp.engine.memory import MemoryCheckpoint
from ucp.engine.specs import BoundLayout, bind_layout, load_spec, mesh_of, parse_spec
from ucp.engine.to_universal import MAX_LISTED_FRAGMENTS, check_layout, convert

__all__ = ["convert", "export", "check_layout", "open_universal", "unit_tensors", "torchrun_rank",
           "MemoryCheckpoint", "BoundLayout", "bind_layout", "load_spec", "mesh_of", "parse_spec",
           "MAX_LISTED_FRAGMENTS"]
