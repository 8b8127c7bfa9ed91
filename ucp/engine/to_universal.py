"""Framework checkpoint -> universal checkpoint, for any :class:`ucp.sources.Source`.

The source describes its files (``Source.layout``) and hands out boxes (``Source.read``);
everything else happens here once: the coverage check of every state, the torchrun split by
size with one collective commit, replica dedupe and averaging (``ucp.plan.replicas``, the
one rule), streaming boxes to the writer, the next few read while earlier ones are written
(``ucp.engine.pipeline``: memory bounded by the boxes in flight, never the model), resume,
worker threads, progress, per-parameter and non-tensor metadata, commit.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import numpy as np

from ucp.engine.pipeline import BUDGET_BYTES
from ucp.errors import UcpError
from ucp.plugins import lies_within

#: Per-parameter metadata lists each fragment's boxes up to this many fragments; beyond it
#: the spec (kept in the checkpoint's metadata) and the degrees reproduce them through the
#: planner, so a 512-way run does not put 512 entries per parameter into the manifest.
MAX_LISTED_FRAGMENTS = 64


def convert(source, dst, *, workers: int | None = None, resume: bool = False, overwrite: bool = False,
            progress: bool = False, storage_options: Mapping[str, Any] | None = None,
            distributed: bool | None = None) -> None:
    """Convert what ``source`` (a :class:`ucp.sources.Source`) describes into a committed
    universal checkpoint at ``dst`` (local path or fsspec URL).

    In a job (``distributed``: see ``ucp.engine.jobs.torchrun_rank``) every process converts
    a share of the parameters (by size) and the job commits once; a failure on any process
    leaves no manifest. ``resume`` finishes an interrupted conversion into ``dst`` (chunks
    already written and checked are kept); ``overwrite`` replaces an existing ``dst``. The
    source is closed at the end.
    """
    from ucp.engine.jobs import failure_text, torchrun_rank
    from ucp.format.manifest import gc_paused

    try:
        job = torchrun_rank(distributed)
        # no cyclic GC while the layout's many small acyclic objects (fragments, boxes, pieces)
        # are built and the boxes stream: its collections cost more than building them
        with gc_paused():
            if overwrite and lies_within(getattr(source, "path", ""), dst):
                raise UcpError(f"{dst}: overwrite would delete the source {source.path}, which lies inside it; "
                               "convert into another folder")
            layout = _describe(source, job)
            mine = _my_params(layout, job)
            writer = _open_writer(dst, job, workers=workers, resume=resume, overwrite=overwrite,
                                  storage_options=storage_options, fingerprint=source.fingerprint())
            failure = None
            try:
                shown = progress and (job is None or job[0] == 0)  # one bar per job, not per process
                write_params(writer, source, layout, [p for p in layout.params if p.name in mine], shown)
            except Exception as e:
                if job is None:
                    writer.abort()
                    raise
                failure = failure_text(e)
        _commit(writer, job, conversion_metadata(source, layout), failure, [p.name for p in layout.params])
    finally:
        source.close()


def _describe(source, job):
    """The source's checked layout; under torchrun the processes agree on it first, so that
    one process failing here (a file only it cannot read) fails them all instead of leaving
    the others waiting at the commit."""
    from ucp.engine.jobs import agree, failure_text

    if job is None:
        layout = source.layout()
        check_layout(layout)
        return layout
    layout, failure = None, None
    try:
        layout = source.layout()
        check_layout(layout)
    except Exception as e:
        failure = failure_text(e)
    agree(failure, f"convert from {source.name} (reading the layout)")
    return layout


def check_layout(layout) -> None:
    """Raise unless, for every parameter and state, the fragments tile the tensor exactly
    (``ucp.plan.check_coverage``), and every parameter has a ``param`` state."""
    from ucp.plan import check_coverage

    seen = set()
    holders = {p.name for p in layout.params if "param" in p.dtypes}
    for p in layout.params:
        if p.name in seen:
            raise UcpError(f"parameter {p.name!r} is described twice by the source")
        seen.add(p.name)
        if not p.dtypes and p.meta.get("tied_to") in holders:
            continue   # a tied alias stored once, as the parameter it is tied to (FORMAT.md §6.1)
        if "param" not in p.dtypes:
            raise UcpError(f"{p.name}: the source gives no 'param' state (states: {', '.join(p.dtypes)})")
        checked = set()
        for state in p.dtypes:
            frags = p.fragments_of(state)
            if (id(frags), p.shape_of(state)) not in checked:
                check_coverage(p.name, p.shape_of(state), frags)
                checked.add((id(frags), p.shape_of(state)))


def _volume(p) -> int:
    return sum(math.prod(p.shape_of(state)) for state in p.dtypes)


def _my_params(layout, job) -> set[str]:
    """Names this process converts: all of them, or its share of a torchrun job by size."""
    sizes = {p.name: _volume(p) for p in layout.params}
    if job is None:
        return set(sizes)
    from ucp.plan.assign import assign_by_size

    rank, world = job
    return set(assign_by_size(sizes, world)[rank])


def _open_writer(dst, job, *, workers, resume, overwrite, storage_options, fingerprint):
    options = {"workers": workers} if workers else {}
    options["fingerprint"] = fingerprint
    if job is None:
        from ucp.format import create_checkpoint

        return create_checkpoint(dst, overwrite=overwrite, storage_options=storage_options, resume=resume,
                                 **options)
    from ucp.format import create_distributed

    if overwrite:
        raise UcpError(f"{dst}: overwrite cannot be used under torchrun (the processes would race to "
                       "clear it); remove it once before starting the job")
    return create_distributed(dst, storage_options=storage_options, resume=resume, **options)


def _commit(writer, job, metadata, failure, order) -> None:
    if job is None:
        writer.set_metadata(metadata)
        writer.commit()
        return
    from ucp.format import commit_distributed

    commit_distributed(writer, metadata=metadata, failure=failure, param_order=order)


def write_params(writer, source, layout, params, progress: bool = False) -> None:
    """Declare and write ``params`` (``SourceParam`` s of ``layout``): boxes are read a few
    ahead of the one being written (``ucp.engine.pipeline``: memory bounded by the boxes in
    flight, errors raised in box order)."""
    from ucp.engine.buffers import ReadBuffers
    from ucp.engine.pipeline import BoxPipeline
    from ucp.progress import bar

    with bar(total=sum(_volume(p) for p in params), desc="convert", unit="el",
             enabled=None if progress else False) as pb, \
            BoxPipeline(concurrent_reads=bool(getattr(source, "concurrent_reads", False))) as pipe:
        buffers = ReadBuffers(keep=GATHER_KEEP_BYTES)
        for p in params:
            writer.add_param(p.name, meta=param_metadata(p, layout, source.name))
            for state, dtype in p.dtypes.items():
                array = writer.add_array(p.name, state, p.shape_of(state), dtype)
                write_state(array, source, p, state, dtype, pipe, buffers)
                pb.update(math.prod(p.shape_of(state)))


#: A state is gathered (:func:`_gather`) in row bands of about this many bytes, each whole outer
#: chunks (shards) of the array, so that the first band is written while the next is read: whole,
#: the first shard of a 221 MB embedding state waited for all of it to be read (0.7 s at the
#: start of the 4 GiB DeepSpeed bench with no write under way), and its buffer set the memory.
GATHER_BAND_BYTES = 32 << 20
#: A gather buffer (one band, or a whole state when the array's chunks are unknown) holds at most
#: this many bytes; a larger one is written box by box. In flight, a band counts against the
#: pipeline's budget like a box (one larger than the budget runs alone).
GATHER_MAX_BYTES = 256 << 20
#: Freed gather buffers kept for the next bands (the rest go back to the system): room for a
#: band beside a pipeline budget of smaller states' buffers, the working set of the conversion;
#: fewer kept, the next states read into fresh memory (a page fault and a page clear per page).
GATHER_KEEP_BYTES = GATHER_BAND_BYTES + BUDGET_BYTES


def write_state(array, source, p, state: str, dtype, pipe=None, buffers=None) -> None:
    """Write one state of one parameter: per distinct partition the one replica that holds
    it, or the average of the replicas an ``average`` axis declares (one rule:
    ``ucp.plan.replicas.average_replicas``). With ``pipe`` (a ``BoxPipeline``) each box is
    read and written as one of its tasks; with ``buffers`` too (a ``ReadBuffers``), a state
    no replica averages is gathered band by band (:func:`gather_bands`, :func:`_gather`), each
    band written as one box, when the source can read pieces straight into place
    (``read_into``; without it, gathering would add a copy of boxes the writer may take whole
    as they are)."""
    from ucp.plan import dedupe

    partitions = dedupe(p.fragments_of(state))
    if buffers is not None and pipe is not None and hasattr(source, "read_into") \
            and all(len(r) == 1 for r in partitions):
        bands = gather_bands(p.shape_of(state), dtype.itemsize, getattr(array, "chunks", None))
        if bands is not None:
            fragments = [r[0][0] for r in partitions]
            for band in bands:
                read = functools.partial(_gather, source, fragments, state, band, dtype, buffers)
                pipe.submit(band.numel * dtype.itemsize, read, functools.partial(array.write, band.start))
            return
    for replicas in partitions:
        for i, piece in enumerate(replicas[0][0].pieces):
            read = functools.partial(_read_piece, source, replicas, i, state, dtype)
            write = functools.partial(array.write, tuple(piece.src.start))
            if pipe is None:
                write(read())
            else:
                pipe.submit(len(replicas) * math.prod(piece.src.shape) * dtype.itemsize, read, write)


def gather_bands(shape, itemsize: int, chunks=None):
    """The boxes a state of ``shape`` is gathered in: row bands spanning the trailing
    dimensions, each a whole number of the array's outer chunk rows (``chunks``: its outer
    chunk shape, so that the writer takes every chunk whole), of about
    :data:`GATHER_BAND_BYTES`; the whole state when it is no larger, or when ``chunks`` is
    None. None when a band would exceed :data:`GATHER_MAX_BYTES` (written box by box)."""
    from ucp.plan import Box

    full = Box.full(shape)
    nbytes = full.numel * itemsize
    if nbytes <= GATHER_BAND_BYTES or chunks is None or not shape:
        return [full] if nbytes <= GATHER_MAX_BYTES else None
    row = math.prod(shape[1:]) * itemsize
    step = chunks[0] * max(1, GATHER_BAND_BYTES // max(1, chunks[0] * row))
    if min(step, shape[0]) * row > GATHER_MAX_BYTES:
        return [full] if nbytes <= GATHER_MAX_BYTES else None
    rest = tuple(shape[1:])
    return [Box((r,) + (0,) * len(rest), (min(r + step, shape[0]),) + rest) for r in range(0, shape[0], step)]


def _gather(source, fragments, state, band, dtype, buffers):
    """The box ``band`` of the state in one buffer, each piece of it read where it belongs:
    straight from the file when the source can (``source.read_into``: one copy, and the writer
    then takes every chunk whole, with no staging copy), else copied from :meth:`Source.read`'s
    box. The fragments tile the tensor (``check_layout``), so every element is written. A band
    that one piece covers comes from ``source.view`` where the source has one and can: the
    file's bytes with no copy (the writer copies them once, into the file it builds)."""
    from ucp.plan import pieces_within

    parts = [(f, sub) for f in fragments for piece in f.pieces for sub in pieces_within(piece, band)]
    if sum(sub.src.numel for _, sub in parts) != band.numel:  # check_layout's rule, kept
        raise UcpError(f"{fragments[0].name if fragments else band}: the source's pieces of {state!r} do not "
                       f"cover the {band.numel} elements of {band} exactly")
    view = getattr(source, "view", None)
    if len(parts) == 1 and view is not None:  # one piece: the source's bytes as they are, if it can
        box = view(parts[0][0], state, parts[0][1])
        if box is not None:
            return _checked(source, parts[0][0], state, box, dtype)
    whole = buffers.take(band.numel * dtype.itemsize).view(_storage(dtype)).reshape(band.shape)
    read_into = getattr(source, "read_into", None)
    for f, sub in parts:
        region = whole[sub.src.relative_to(band).slices()]
        if region.flags.c_contiguous and read_into is not None and read_into(f, state, sub, region):
            continue
        region[...] = _as_storage(_read(source, f, state, sub, dtype))
    return whole


def _read_piece(source, replicas, i, state, dtype):
    """Piece ``i`` of one partition: the replica's box, or the average of every replica's."""
    from ucp.format import dtypes
    from ucp.plan.replicas import average_replicas

    first = replicas[0][0]
    if len(replicas) == 1:
        return _read(source, first, state, first.pieces[i], dtype)
    boxes = [_read(source, f, state, f.pieces[i], dtype) for f, _ in replicas]
    name = dtypes.dtype_name(dtype)
    boxes = [dtypes.to_torch(b, name) if isinstance(b, np.ndarray) else b for b in boxes]
    return average_replicas(boxes, [w for _, w in replicas], dtypes.torch_dtype(name))


def _read(source, fragment, state, piece, dtype):
    return _checked(source, fragment, state, source.read(fragment, state, piece), dtype)


def _storage(dtype) -> np.dtype:
    """The numpy dtype a box of logical ``dtype`` (torch's, or ``dtypes.Dtype``) is held in."""
    from ucp.format import dtypes

    return dtypes.numpy_storage_dtype(dtypes.dtype_name(dtype))


def _as_storage(box) -> np.ndarray:
    """A box as numpy in its storage dtype: as it is, or a torch tensor's bytes (no copy)."""
    from ucp.format import dtypes

    return box if isinstance(box, np.ndarray) else dtypes.to_storage_numpy(box)


def _checked(source, fragment, state, box, dtype):
    """``box``, unless its dtype is not the layout's: a torch tensor's own, a numpy array's its
    storage dtype (sources that read without torch give numpy: a bfloat16 box is ``uint16``)."""
    from ucp.format import dtypes

    if isinstance(box, np.ndarray):
        same = box.dtype == _storage(dtype)
    else:
        same = box.dtype == dtype or (dtypes.is_supported(box.dtype)
                                      and dtypes.dtype_name(box.dtype) == dtypes.dtype_name(dtype))
    if not same:
        raise UcpError(f"{source.describe(fragment, state)}: dtype {box.dtype}, but the source's layout "
                       f"says {dtype} (ucp never casts implicitly)")
    return box


def param_metadata(p, layout, source_name: str) -> dict:
    """Per-parameter metadata: what the source says (rule, parts, padding, frozen, tied_to),
    the fragmentation it had (boxes listed up to :data:`MAX_LISTED_FRAGMENTS` fragments) and
    scalar state such as Adam ``step``."""
    meta = dict(p.meta)
    held = [f for f in p.fragments if f.pieces]
    frag = {"layout": source_name, "degrees": dict(layout.degrees), "fragments": len(held)}
    if layout.spec_name:
        frag["spec"] = layout.spec_name
    if meta.get("rule"):
        frag["rule"] = meta["rule"]
    if len(held) <= MAX_LISTED_FRAGMENTS:
        frag["ranks"] = [{"coords": dict(f.coords), "local": f.local_name, "local_shape": list(f.local_shape),
                          "pieces": [[list(pc.src.start), list(pc.src.stop), list(pc.dst.start),
                                      list(pc.dst.stop)] for pc in f.pieces]}
                         for f in held]
    frag.update(meta.get("fragmentation") or {})
    meta["fragmentation"] = frag
    if p.scalars:
        meta["scalars"] = dict(p.scalars)
    return meta


def conversion_metadata(source, layout) -> dict:
    """Non-tensor metadata of the universal checkpoint: the source's non-tensor state plus a
    ``source`` record (format, path, degrees, spec and its text) from which ``export``
    reproduces the layout."""
    record = {"format": source.name, "path": str(source.path), "degrees": dict(layout.degrees),
              "constants": dict(layout.constants)}
    if layout.spec_name is not None:
        record["spec"] = layout.spec_name
    if layout.spec_text is not None:
        record["spec_text"] = layout.spec_text
    return {"source": record, **dict(layout.metadata)}
