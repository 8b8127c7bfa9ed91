"""What a bound rule says about a tensor, as per-parameter metadata of the universal format
(``parts``, ``padding``, ``frozen``, ``tied_to``), so that a reader can unfuse or unpad a
tensor without the spec that produced it."""
from __future__ import annotations

from typing import Sequence

from ucp.plan.ops import BoundRule, Pad, Parts
from ucp.plan.errors import PlanError


def rule_metadata(rule: BoundRule, global_shape: Sequence[int]) -> dict:
    out: dict = {}
    shape = [int(s) for s in global_shape]
    for op in rule.ops:
        if isinstance(op, Parts):
            n = shape[op.dim]
            sizes = list(op.sizes) if op.sizes is not None else (
                [n // len(op.names)] * len(op.names) if n % len(op.names) == 0 else None)
            if sizes is None or sum(sizes) != n:
                raise PlanError(f"{rule.pattern} (rule {rule.origin}): parts {list(op.names)} do not "
                                f"divide dim {op.dim} of size {n}")
            start, parts = 0, []
            for name, size in zip(op.names, sizes):
                parts.append({"name": name, "dim": op.dim, "start": start, "stop": start + size,
                              **({"groups": op.groups} if op.groups > 1 else {})})
                start += size
            out["parts"] = parts
        elif isinstance(op, Pad):
            n = shape[op.dim]
            padded = -(-n // op.multiple) * op.multiple
            out["padding"] = {"dim": op.dim, "size": padded - n, "multiple": op.multiple}
    for key, value in rule.attrs:
        if key == "frozen" and value:
            out["frozen"] = True
        elif key == "tied":
            out["tied_to"] = str(value)
    return out
