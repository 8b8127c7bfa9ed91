"""``ucp export``: a universal checkpoint -> a framework layout at any parallelism."""
from __future__ import annotations

from ucp.errors import UcpError

TARGETS = {
    "ranks": "ucp.layout_ranks:export_ranks",
    "hf": None, "dcp": None, "deepspeed": None, "deepspeed-universal": None,
    "megatron": None, "torch": None,
}


def export(src, dst, to, degrees=None, spec=None, **kwargs):
    if to not in TARGETS:
        raise UcpError(f"unknown target {to!r}; known: {', '.join(TARGETS)}")
    target = TARGETS[to]
    if target is None:
        raise UcpError(f"target {to!r} is not supported by this version of ucp yet "
                       f"(supported: {', '.join(k for k, v in TARGETS.items() if v)})")
    mod, fn = target.split(":")
    import importlib

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return getattr(importlib.import_module(mod), fn)(src, dst, degrees=degrees or {}, spec=spec, **kwargs)
