"""``ucp export``: a universal checkpoint -> a framework layout at any parallelism."""
from __future__ import annotations


TARGETS = {
    "ranks": "ucp.layout_ranks:export_ranks",
    "hf": None, "dcp": None, "deepspeed": None, "deepspeed-universal": None,
    "megatron": None, "torch": None,
}


def export(src, dst, to, degrees=None, spec=None, **kwargs):
    from ucp.registry import resolve

    fn = resolve(TARGETS, to, "target")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return fn(src, dst, degrees=degrees or {}, spec=spec, **kwargs)
