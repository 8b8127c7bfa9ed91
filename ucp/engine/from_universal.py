"""Universal checkpoint -> framework files, for any :class:`ucp.targets.Target`.

The target plans its units (files, or ranks' shares) and the fragments each holds; the
engine reads exactly those boxes from the universal checkpoint, one unit at a time (memory
bounded by the largest unit, never the model), builds the unit's local tensors with
``ucp.loading.read_locals`` — the same reads ``ucp.load_rank`` does — and hands them to the
target. On any failure the target's ``abort`` runs, so nothing that looks complete is left.
"""
from __future__ import annotations

from typing import Any, Mapping

from ucp.errors import UcpError
from ucp.targets import EXPORT_LOCK, remove_if_empty


def open_universal(checkpoint, storage_options: Mapping[str, Any] | None = None):
    """``checkpoint`` itself when it is already a reader (anything with ``read_box``), else
    ``ucp.open(checkpoint)``."""
    if hasattr(checkpoint, "read_box"):
        return checkpoint
    from ucp.format import open_checkpoint

    return open_checkpoint(checkpoint, storage_options=storage_options)


def export(checkpoint, target, *, progress: bool = False,
           storage_options: Mapping[str, Any] | None = None, distributed: bool | None = None):
    """Write the universal ``checkpoint`` (a path, URL or open reader) through ``target``
    (a :class:`ucp.targets.Target`): ``plan`` -> ``write_unit`` per unit -> ``finish``.

    In a job (``distributed``: see ``ucp.engine.jobs.torchrun_rank``) every process opens the
    checkpoint and plans, writes its share of the units (by size) and process 0 finishes
    once every unit is written; a failure anywhere makes every process abort and raise.
    Returns the target's destination."""
    from ucp.engine.jobs import torchrun_rank
    from ucp.plugins import lies_within

    where = getattr(checkpoint, "path", checkpoint)
    if lies_within(target.dst, where):
        raise UcpError(f"{target.dst}: the destination lies inside the universal checkpoint {where} it is "
                       "exported from; export into another folder")
    new = not target.dst.exists()   # before a job's roll call, so every process sees the same
    job = torchrun_rank(distributed)
    if job is None:
        _export_alone(open_universal(checkpoint, storage_options), target, progress, new)
    else:
        _export_shared(lambda: open_universal(checkpoint, storage_options), target, job, progress, new)
    return target.dst


class ExportLock:
    """One export at a time per destination: the lock file :data:`EXPORT_LOCK` in it while an export
    writes (``ucp.format.lock``'s, so that one left by a killed export is taken over). Two exports
    into one folder each found it empty, mixed their files, and the one that failed removed the
    other's. Released with the folder itself when it was ``new`` (the export made it) and is left
    empty."""

    closed = False    # the lock's owner, live while the export runs (``WriterLock``'s staleness test)

    def __init__(self, dst, new: bool):
        from ucp.format.lock import WriterLock, WriterLockedError, describe
        from ucp.format.store import make_store

        self.dst = dst
        self.made = new
        dst.mkdir(parents=True, exist_ok=True)
        self.lock = WriterLock(make_store(str(dst)), EXPORT_LOCK, dst, self)
        try:
            self.lock.acquire()
        except WriterLockedError:
            holder = self.lock.holder()
            self.release()
            raise UcpError(f"{dst}: another export is writing into this folder: {describe(holder or {})} "
                           f"({dst / EXPORT_LOCK}); wait for it to end, or export into another folder") from None

    def release(self) -> None:
        self.closed = True
        self.lock.release()
        if self.made:
            remove_if_empty(self.dst)


def _export_alone(ck, target, progress: bool, new: bool) -> None:
    lock = ExportLock(target.dst, new)
    try:
        units = list(target.plan(ck))
        try:
            write_units(ck, target, units, progress)
            target.finish(ck)
        except BaseException as e:
            abort_after(target, e)
            raise
    finally:
        lock.release()


def abort_after(target, failure: BaseException) -> None:
    """Run ``target.abort()`` after ``failure``; a cleanup that fails too (in a job another
    process may be removing the same folder) is noted on ``failure``, which is what the user
    must read, never raised in its place."""
    from ucp.engine.jobs import failure_text

    try:
        target.abort()
    except Exception as e:
        failure.add_note(f"(cleaning up after it also failed: {failure_text(e)})")


def write_units(ck, target, units, progress: bool = False) -> None:
    """Fill and hand over ``units`` one at a time (memory: one unit's tensors)."""
    from ucp.progress import bar

    with bar(total=len(units), desc=f"export {target.name}", unit="file",
             enabled=None if progress else False) as pb:
        for unit in units:
            tensors = unit_tensors(ck, unit)
            try:
                target.write_unit(unit, tensors)
            except (UcpError, OSError):   # an OSError names its file (the CLI prints it as an error)
                raise
            except Exception as e:   # a full disk, a file-size limit, as a target's file writer says it
                full = " (torch's zip writer says this when the disk is full or a file-size limit is hit)" \
                    if "unexpected pos" in str(e) else ""
                raise UcpError(f"{target.dst}: writing {unit.key} failed ({type(e).__name__}: {e}){full}; nothing "
                               "complete is left there") from e
            pb.update(1)


def _unit_volume(unit) -> int:
    frags = [*unit.fragments, *[f for fs in unit.state_fragments.values() for f in fs]]
    return sum(f.numel for f in frags)


def _export_shared(opened, target, job, progress: bool, new: bool) -> None:
    """One process of a job's export: open the checkpoint (``opened()``) and plan everywhere
    (every plan checked before anything is written), write this process's share of the
    units, then finish on process 0. After each step the processes agree; on any failure
    every process aborts and raises. A target with ``split_under_torchrun = False`` is run
    whole by process 0 (the others wait)."""
    from ucp.engine.jobs import agree, failure_text
    from ucp.plan.assign import assign_by_size

    rank, world = job
    split = bool(getattr(target, "split_under_torchrun", True))
    ck, planned, locked = None, [], []

    def lock():
        if rank == 0:
            locked.append(ExportLock(target.dst, new))

    def plan():
        nonlocal ck
        ck = opened()
        if split or rank == 0:
            planned.extend(target.plan(ck))

    def write():
        share = (assign_by_size({str(i): _unit_volume(u) for i, u in enumerate(planned)}, world)[rank]
                 if split else [str(i) for i in range(len(planned))])
        write_units(ck, target, [planned[int(i)] for i in share], progress and rank == 0)

    def finish():
        if rank == 0:
            target.finish(ck)

    try:
        for step, run in (("locking", lock), ("planning", plan), ("writing", write), ("finishing", finish)):
            failure = None
            try:
                try:
                    run()
                except Exception as e:     # told to the others; Ctrl-C or SIGTERM: this process goes now
                    failure = failure_text(e)
                agree(failure, f"export to {target.name} ({step})")
            except BaseException as e:
                if _cleans_up(step, rank, e):
                    abort_after(target, e)
                raise
    except BaseException:
        if new and step != "locking":   # a folder the job made: whichever process cleans up last removes it
            remove_if_empty(target.dst)
        raise
    finally:
        for held in locked:
            held.release()


def _cleans_up(step: str, rank: int, e: BaseException) -> bool:
    """Whether a process of a job's export removes what it wrote after ``e`` ended ``step`` (its
    work or its agreement). Not after the locking step: refused, nothing there is this export's.
    In the finishing step a process other than 0 does only when process 0 said its finish failed:
    interrupted, or with process 0 gone, it cannot tell whether the checkpoint was completed, and
    removing its files from a complete one (it happened) is worse than leaving them beside an
    incomplete one, which no framework takes (its index is what process 0 writes last)."""
    from ucp.format.distributed import PartnerLostError

    if step == "locking":
        return False
    if step == "finishing" and rank != 0:
        return isinstance(e, UcpError) and not isinstance(e, PartnerLostError)
    return True


def unit_states(ck, unit) -> list[str]:
    """The states to fill for ``unit``: the ones it names, else every state its parameters
    have in the checkpoint (``param`` first, then by name)."""
    if unit.states is not None:
        return list(unit.states)
    names = {f.name for f in unit.fragments}
    for frags in unit.state_fragments.values():
        names.update(f.name for f in frags)
    found = {st for n in names for st in ck.states(n)}
    return sorted(found, key=lambda s: (s != "param", s))


def unit_tensors(ck, unit) -> dict[str, dict[str, Any]]:
    """``{state: {local_name: tensor}}`` of one unit, read box by box from ``ck``. States a
    unit's parameters lack (e.g. no optimizer state for a frozen weight) are left out."""
    from ucp.loading import read_locals

    out: dict[str, dict[str, Any]] = {}
    for state in unit_states(ck, unit):
        got = read_locals(ck, unit.fragments_of(state), states=[state])
        if state in got:
            out[state] = got[state]
    return out
