"""Several writers under torch.distributed: every rank commits its part, one rank the manifest.

The part protocol itself (``create_part`` / ``commit_parts``, FORMAT.md §13) needs no
communication; this module adds the two collective steps a torchrun job needs around it: a
barrier so the coordinator starts only after every part is durable, and the propagation of any
rank's failure to every rank, so that no rank believes in a checkpoint that was not committed.
"""
from __future__ import annotations

from contextlib import contextmanager

from ucp.errors import UcpError


class PartnerLostError(UcpError):
    """A collective of a job failed because another process is gone (killed, interrupted, out of
    memory): the transport's error, in one line."""


@contextmanager
def partners(what: str):
    """Around a job's collectives: a process that stopped shows in the others as the transport's
    ``RuntimeError`` (gloo: "Connection closed by peer ... GLHF!"), which the command line took for
    a bug and printed with its traceback; it is :class:`PartnerLostError`, naming ``what`` failed."""
    try:
        yield
    except RuntimeError as e:    # DistBackendError and gloo's own errors are RuntimeErrors
        words = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if words.startswith("[") and "] " in words:      # gloo's "[.../pair.cc:537] Read error ..."
            words = words.split("] ", 1)[1]
        words = words.split(". This is typically")[0]
        raise PartnerLostError(f"{what}: another process of the job stopped or cannot be reached "
                               f"({words})") from e


def _dist():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise UcpError("torch.distributed is not initialized: call init_process_group first, "
                       "or use create_checkpoint(path, rank=..., world_size=...) and commit_parts")
    return dist


def create_distributed(path, group=None, **kwargs):
    """The part writer of this process's rank in ``group`` (default: the whole world)."""
    from ucp.format.create import create_checkpoint

    dist = _dist()
    return create_checkpoint(path, rank=dist.get_rank(group), world_size=dist.get_world_size(group), **kwargs)


def commit_distributed(writer, metadata=None, group=None, coordinator=0, failure=None,
                       **commit_kwargs) -> dict | None:
    """Collective: commit this rank's part, then (on ``coordinator``) the manifest.

    Every rank returns only once the checkpoint is committed, and every rank raises the same
    ``UcpError`` if any rank's part or the final commit failed (no manifest is written then).
    ``failure``: this rank already failed (the text says how); it still takes part in the
    collectives, so the other ranks fail cleanly instead of waiting forever.
    Returns ``commit_parts``' counts on the coordinator, None elsewhere.
    """
    from ucp.format.parts import commit_parts

    dist = _dist()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    status = f"rank {rank}: {failure}" if failure else None
    try:
        if status:
            writer.abort()
        else:
            writer.commit()
    except Exception as e:  # report every rank's failure, not only the first one seen
        status = f"rank {rank}: {type(e).__name__}: {e}"
        try:
            writer.abort()
        except Exception:
            pass
    statuses = [None] * world
    with partners("checkpoint not committed"):
        dist.all_gather_object(statuses, status, group=group)
    failed = [s for s in statuses if s]
    if failed:
        raise UcpError("checkpoint not committed, ranks failed:\n  " + "\n  ".join(failed))
    result, msg = None, None
    if rank == coordinator:
        try:
            result = commit_parts(writer.path, world, metadata=metadata,
                                  storage_options=writer.storage_options, **commit_kwargs)
        except Exception as e:
            msg = f"coordinator rank {rank}: {type(e).__name__}: {e}"
    box = [msg]
    with partners("checkpoint not committed" if rank != coordinator else "commit not confirmed to every process"):
        dist.broadcast_object_list(box, src=coordinator, group=group)
    if box[0]:
        raise UcpError("checkpoint not committed: " + box[0])
    return result
