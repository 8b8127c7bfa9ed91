"""What a bound rule says about a tensor, as per-parameter metadata of the universal format
(``parts``, ``padding``, ``frozen``, ``tied_to``), so that a reader can unfuse or unpad a
tensor without the spec that produced it."""
from __future__ import annotations

from typing import Sequence

from ucp.plan.errors import PlanError
from ucp.plan.ops import BoundRule, Pad, Parts


def _parts(op: Parts, shape: list[int], rule: BoundRule) -> list[dict]:
    try:
        sizes = op.part_sizes(shape[op.dim])           # THE parts-size rule
    except ValueError as e:
        raise PlanError(f"{rule.pattern} (rule {rule.origin}): {e}") from None
    out, start = [], 0
    for name, size in zip(op.names, sizes):
        out.append({"name": name, "dim": op.dim, "start": start, "stop": start + size,
                    **({"groups": op.groups} if op.groups > 1 else {})})
        start += size
    return out


def _padding(op: Pad, shape: list[int]) -> dict:
    n = shape[op.dim]
    padded = -(-n // op.multiple) * op.multiple
    return {"dim": op.dim, "size": padded - n, "multiple": op.multiple,
            **({"kept": True} if op.keep else {})}


def rule_metadata(rule: BoundRule, global_shape: Sequence[int]) -> dict:
    """``parts`` / ``padding`` / ``frozen`` / ``tied_to`` of the tensor a rule lays out
    (``padding.kept``: the universal tensor holds the source's padding rows)."""
    out: dict = {}
    shape = [int(s) for s in global_shape]
    for op in rule.ops:
        if isinstance(op, Parts):
            out["parts"] = _parts(op, shape, rule)
        elif isinstance(op, Pad):
            out["padding"] = _padding(op, shape)
    if rule.frozen:
        out["frozen"] = True
    if rule.tied or rule.copy_of:
        out["tied_to"] = str(rule.tied or rule.copy_of)
    return out
