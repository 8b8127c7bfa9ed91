"""Load one rank's local tensors straight from a universal checkpoint, for any layout a spec
declares: what a training job does when it resumes on a different number of GPUs.

Only the boxes the rank needs are read (``Checkpoint.read_box``), each straight into its place
in the local tensor when that place is contiguous. Grouped flat layouts (ZeRO-1/2) come back as
the rank's flat buffer under the group key, exactly as the framework holds it. ``ucp.export``
builds every target file's tensors with the same :func:`read_locals`.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

from ucp.errors import UcpError


def fill_locals(frags, state_dtypes, read, read_into=None) -> dict[str, dict[str, torch.Tensor]]:
    """Build one rank's local tensors ``{state: {local_name: tensor}}`` from universal boxes.

    ``state_dtypes(name)`` gives ``{state: dtype}`` of a parameter; ``read(name, state, start,
    stop)`` returns a box; ``read_into(name, state, start, stop, out)``, when given, fills a
    contiguous ``out`` in place (no intermediate tensor). Local positions no piece covers stay
    zero (padding); the tensors of a flat group share one buffer, hence one dtype.
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    for f in frags:
        for st, dt in state_dtypes(f.name).items():
            bucket = out.setdefault(st, {})
            buf = bucket.get(f.local_name)
            if buf is None:
                buf = bucket[f.local_name] = torch.zeros(f.local_shape, dtype=dt)
            elif buf.dtype != dt:
                raise UcpError(f"{f.local_name}: the tensors of one flat group must share a dtype "
                               f"({f.name}/{st} is {dt}, the group is {buf.dtype})")
            for pc in f.pieces:
                view = buf[pc.dst.slices()]
                if read_into is not None and view.is_contiguous() and tuple(view.shape) == tuple(pc.src.shape):
                    read_into(f.name, st, pc.src.start, pc.src.stop, view)
                else:
                    view.copy_(read(f.name, st, pc.src.start, pc.src.stop).reshape(view.shape))
    return out


def read_locals(ck, frags: Sequence, *, states: Iterable[str] | None = None,
                dtype: torch.dtype | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """:func:`fill_locals` over a universal checkpoint reader ``ck``: the local tensors of
    ``frags`` for ``states`` (None: every state each parameter has), reading each box straight
    into place. ``dtype`` casts (only when asked: ucp never casts on its own)."""
    wanted_states = None if states is None else list(states)

    def state_dtypes(name):
        have = ck.states(name)
        wanted = have if wanted_states is None else [s for s in wanted_states if s in have]
        return {st: dtype or ck.array_info(name, st).dtype for st in wanted}

    def read(name, st, start, stop):
        t = ck.read_box(name, st, tuple(start), tuple(stop))
        return t if dtype is None else t.to(dtype)

    def read_into(name, st, start, stop, out):
        ck.read_box(name, st, tuple(start), tuple(stop), out=out)

    return fill_locals(frags, state_dtypes, read, read_into if dtype is None else None)


def load_rank(path, spec, degrees: Mapping[str, int], coords: Mapping[str, int], *,
              states: Iterable[str] | None = ("param",), constants: Mapping[str, int] | None = None,
              names: Iterable[str] | None = None, storage_options=None,
              dtype: torch.dtype | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """``{state: {local_name: tensor}}`` of the rank at ``coords`` of a ``degrees`` layout.

    ``spec``: a ``ucp.lang.Spec``, a converters/ name or a spec file. ``states=None`` loads every
    state each parameter has. ``names`` restricts the parameters (default: all). ``dtype`` casts
    (only when asked: ucp never casts on its own).
    """
    from ucp.engine import bind_layout, open_universal

    ck = open_universal(path, storage_options)
    params = list(names) if names is not None else list(ck.params)
    bound = bind_layout(spec, params, degrees, constants)
    shapes = {n: tuple(ck.array_info(n, "param").shape) for n in params}
    main = bound.rank_fragments(shapes, coords)
    own = set(bound.own_states(params))
    if states is None:
        states = sorted({st for n in params for st in ck.states(n)}, key=lambda s: (s != "param", s))
    out: dict[str, dict[str, torch.Tensor]] = {}
    for state in states:  # a state with a layout of its own (``state exp_avg = ...``) has its own fragments
        frags = bound.rank_fragments(shapes, coords, state) if state in own else main
        out.update(read_locals(ck, frags, states=[state], dtype=dtype))
    return out
