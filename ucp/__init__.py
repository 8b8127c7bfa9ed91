"""ucp: universal, reshardable checkpoints for distributed training.

The public names are thin: ``ucp.open`` gives a read-only view of a universal checkpoint,
``ucp.convert`` turns a framework checkpoint into one and ``ucp.export`` writes one out as a
framework's files at any parallelism, both through the one engine (``ucp.engine``) with the
source or target picked by name from the registries (``ucp.sources``, ``ucp.targets``).
Imports are lazy so that ``import ucp`` stays cheap for the CLI.
"""
from ucp.errors import UcpError

__version__ = "0.1.0"

#: keyword arguments of ``ucp.convert`` / ``ucp.export`` that the engine takes; every other
#: keyword goes to the source or target, which rejects the ones it does not know
_CONVERT_ENGINE_OPTIONS = ("workers", "resume", "overwrite", "progress")


def open(path, **kwargs):  # noqa: A001 - mirrors zarr.open / builtins.open on purpose
    """Open a committed universal checkpoint (local path or fsspec URL) read-only.

    Example: ``ck = ucp.open("ckpt"); ck.read(ck.params[0], "param")``."""
    from ucp.format import open_checkpoint

    return open_checkpoint(path, **kwargs)


def convert(src, dst, source="auto", spec=None, *, storage_options=None, distributed=None, **options):
    """Convert the framework checkpoint at ``src`` into a universal checkpoint at ``dst``.

    Args:
        source: a registered source name (``ucp.sources.sources()``) or ``"auto"`` (detected
            from file names and small index files only, never by unpickling).
        spec: a spec file or bundled converters/ name, for sources that take one.
        storage_options: fsspec options for ``dst`` (and ``src`` where the source reads URLs).
        distributed: who converts. ``True``: every process of the job calls this, and each
            converts a share (in the caller's process group, or one made from the torchrun
            environment). ``False``: this process alone, whatever the environment or process
            group (e.g. under ``if rank == 0:``). ``None``: a job when started by torchrun
            (``torchrun -m ucp convert``), else alone; refused when the caller already made a
            process group of several processes, since ucp cannot tell who calls.
        options: ``workers``, ``resume``, ``overwrite``, ``progress`` go to the engine
            (``ucp.engine.convert``); any other option to the source, which refuses unknown ones.

    Example: ``ucp.convert("ds_ckpt/global_step10", "universal", source="deepspeed")``.
    """
    from ucp import engine
    from ucp.sources import get_source

    name = _detected(src) if source in (None, "auto") else source
    engine_opts = {k: options.pop(k) for k in _CONVERT_ENGINE_OPTIONS if options.get(k) is not None}
    plugin = get_source(name)(src, spec=spec, storage_options=storage_options, **options)
    return engine.convert(plugin, dst, storage_options=storage_options, distributed=distributed, **engine_opts)


def _detected(src) -> str:
    from ucp.plugins import local_path
    from ucp.sources import detect

    path = local_path(src, "framework checkpoints are read from")
    if not path.exists():
        raise UcpError(f"{src}: no such file or directory")
    return detect(path)


def export(src, dst, target, degrees=None, spec=None, *, storage_options=None, progress=False, distributed=None,
           **options):
    """Write the universal checkpoint ``src`` as ``target``'s files at ``dst``.

    Args:
        target: a registered target name (``ucp.targets.targets()``).
        degrees: the parallelism to write, e.g. ``{"tp": 2, "dp": 4}``.
        spec: a spec file or converters/ name, for targets that take one.
        storage_options: fsspec options for reading ``src``.
        distributed: who writes: ``True`` every process of the job (each a share), ``False``
            this process alone, ``None`` as torchrun started it; as in :func:`convert`.
        options: target options (``zero_stage``, ``max_shard_size``, ...); the target refuses
            unknown ones. ``None`` values count as not given.

    Example: ``ucp.export("universal", "tp4", "ranks", degrees={"tp": 4})``.
    """
    from ucp import engine
    from ucp.targets import get_target

    plugin = get_target(target)(dst, degrees=degrees or {}, spec=spec, storage_options=storage_options,
                                **{k: v for k, v in options.items() if v is not None})
    return engine.export(src, plugin, progress=progress, storage_options=storage_options, distributed=distributed)


def load_rank(path, spec, degrees, coords, **kwargs):
    """One rank's local tensors ``{state: {local_name: tensor}}`` for any layout a spec declares,
    reading only the boxes that rank needs."""
    from ucp.loading import load_rank as _load_rank

    return _load_rank(path, spec, degrees, coords, **kwargs)


__all__ = ["open", "convert", "export", "load_rank", "UcpError", "__version__"]
