"""Load one rank's local tensors straight from a universal checkpoint, for any layout a spec
declares: what a training job does when it resumes on a different number of GPUs.

Only the boxes the rank needs are read (``Checkpoint.read_box``), each straight into its place
in the local tensor when that place is contiguous. Grouped flat layouts (ZeRO-1/2) come back as
the rank's flat buffer under the group key, exactly as the framework holds it.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

from ucp.errors import UcpError


def load_rank(path, spec, degrees: Mapping[str, int], coords: Mapping[str, int], *,
              states: Iterable[str] | None = ("param",), constants: Mapping[str, int] | None = None,
              names: Iterable[str] | None = None, storage_options=None,
              dtype: torch.dtype | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """``{state: {local_name: tensor}}`` of the rank at ``coords`` of a ``degrees`` layout.

    ``spec``: a ``ucp.lang.Spec``, a converters/ name or a spec file. ``states=None`` loads every
    state each parameter has. ``names`` restricts the parameters (default: all). ``dtype`` casts
    (only when asked: ucp never casts on its own).
    """
    import ucp
    from ucp.lang import Spec, load
    from ucp.plan import rank_fragments

    ck = ucp.open(path, storage_options=storage_options) if not hasattr(path, "read_box") else path
    spec_obj = spec if isinstance(spec, Spec) else load(spec)
    params = list(names) if names is not None else list(ck.params)
    bound = spec_obj.bind(degrees=dict(degrees), constants=dict(constants or {}))
    matches = bound.resolve(params)
    shapes = {n: tuple(ck.array_info(n, "param").shape) for n in params}
    frags = rank_fragments({n: m.rule for n, m in matches.items()}, shapes, dict(degrees), dict(coords),
                           local_name=bound.local_name, captures=lambda n: matches[n].captures)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for f in frags:
        have = ck.states(f.name)
        wanted = have if states is None else [s for s in states if s in have]
        for st in wanted:
            info = ck.array_info(f.name, st)
            dt = info.dtype if dtype is None else dtype
            bucket = out.setdefault(st, {})
            buf = bucket.get(f.local_name)
            if buf is None:
                buf = bucket[f.local_name] = torch.zeros(f.local_shape, dtype=dt)
            elif buf.dtype != dt:
                raise UcpError(f"{f.local_name}: the tensors of one flat group must share a dtype "
                               f"({f.name}/{st} is {dt}, the group is {buf.dtype}); pass dtype= to cast")
            for pc in f.pieces:
                view = buf[pc.dst.slices()]
                if dt == info.dtype and view.is_contiguous() and tuple(view.shape) == tuple(pc.src.shape):
                    ck.read_box(f.name, st, pc.src.start, pc.src.stop, out=view)
                else:
                    t = ck.read_box(f.name, st, pc.src.start, pc.src.stop)
                    view.copy_(t.reshape(view.shape).to(dt))
    return out
