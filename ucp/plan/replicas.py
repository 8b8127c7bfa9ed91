"""How replicas that a layout says to *average* become one universal value.

The rule, written once for every path (convert, export, ``load_rank``, ``assemble``,
``apply_reads``; LANGUAGE.md states it): the weighted sum is taken in float64; for integer
and bool dtypes it is rounded half to even (``torch.round``) before the cast, so replicas
``[0, 1, 2]`` give 1, never a truncated 0; floating dtypes are cast directly.
"""
from __future__ import annotations

from typing import Iterable


def cast_average(total, dtype):
    """``total`` (float64, already weighted) cast to ``dtype`` by the averaging rule."""
    if not (dtype.is_floating_point or dtype.is_complex):
        total = total.round()
    return total.to(dtype)


def average_replicas(values: Iterable, weights: Iterable[float], dtype):
    """The average of replica tensors of equal shape: ``sum(w * v)`` in float64, then
    :func:`cast_average`."""
    import torch

    total = None
    for v, w in zip(values, weights):
        term = v.to(torch.float64) * w
        total = term if total is None else total + term
    if total is None:
        raise ValueError("average_replicas: no replicas")
    return cast_average(total, dtype)
