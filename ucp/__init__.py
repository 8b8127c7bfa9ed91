"""ucp: universal, reshardable checkpoints for distributed training.

The public names are thin: ``ucp.open`` gives a read-only view of a universal checkpoint,
``ucp.convert`` turns a framework checkpoint into one. Imports are lazy so that ``import
ucp`` stays cheap for the CLI.
"""
from ucp.errors import UcpError

__version__ = "0.1.0"


def open(path, **kwargs):  # noqa: A001 - mirrors zarr.open / builtins.open on purpose
    """Open a committed universal checkpoint (local path or fsspec URL) read-only."""
    from ucp.format import open_checkpoint

    return open_checkpoint(path, **kwargs)


def convert(src, dst, source="auto", spec=None, **kwargs):
    """Convert a framework checkpoint at ``src`` into a universal checkpoint at ``dst``."""
    from ucp.conversion import convert as _convert

    return _convert(src, dst, source=source, spec=spec, **kwargs)


def load_rank(path, spec, degrees, coords, **kwargs):
    """One rank's local tensors ``{state: {local_name: tensor}}`` for any layout a spec declares,
    reading only the boxes that rank needs."""
    from ucp.loading import load_rank as _load_rank

    return _load_rank(path, spec, degrees, coords, **kwargs)


__all__ = ["open", "convert", "load_rank", "UcpError", "__version__"]
