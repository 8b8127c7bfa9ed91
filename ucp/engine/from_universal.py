"""Universal checkpoint -> framework files, for any :class:`ucp.targets.Target`.

The target plans its units (files, or ranks' shares) and the fragments each holds; the
engine reads exactly those boxes from the universal checkpoint, one unit at a time (memory
bounded by the largest unit, never the model), builds the unit's local tensors with
``ucp.loading.read_locals`` — the same reads ``ucp.load_rank`` does — and hands them to the
target. On any failure the target's ``abort`` runs, so nothing that looks complete is left.
"""
from __future__ import annotations

from typing import Any, Mapping


def open_universal(checkpoint, storage_options: Mapping[str, Any] | None = None):
    """``checkpoint`` itself when it is already a reader (anything with ``read_box``), else
    ``ucp.open(checkpoint)``."""
    if hasattr(checkpoint, "read_box"):
        return checkpoint
    from ucp.format import open_checkpoint

    return open_checkpoint(checkpoint, storage_options=storage_options)


def export(checkpoint, target, *, progress: bool = False,
           storage_options: Mapping[str, Any] | None = None):
    """Write the universal ``checkpoint`` (a path, URL or open reader) through ``target``
    (a :class:`ucp.targets.Target`): ``plan`` -> ``write_unit`` per unit -> ``finish``.
    Returns the target's destination."""
    from ucp.progress import bar

    ck = open_universal(checkpoint, storage_options)
    units = list(target.plan(ck))
    try:
        with bar(total=len(units), desc=f"export {target.name}", unit="file",
                 enabled=None if progress else False) as pb:
            for unit in units:
                target.write_unit(unit, unit_tensors(ck, unit))
                pb.update(1)
        target.finish(ck)
    except BaseException:
        target.abort()
        raise
    return target.dst


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
