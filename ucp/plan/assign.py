"""Sharing work among processes: which rank converts which parameters."""
from __future__ import annotations

from typing import Mapping


def assign_by_size(sizes: Mapping[str, int], k: int) -> list[list[str]]:
    """Greedy longest-processing-time split: largest first, each to the least-loaded rank
    (ties to the lowest rank), so every rank gets a share within one tensor of the mean.
    Deterministic: every rank computes the same answer without talking to the others.
    Each rank's names keep their order in ``sizes``."""
    if k < 1:
        raise ValueError(f"need at least one rank, got {k}")
    load = [0] * k
    owner: dict[str, int] = {}
    order = {n: i for i, n in enumerate(sizes)}
    for n in sorted(sizes, key=lambda n: (-int(sizes[n]), order[n])):
        r = min(range(k), key=lambda i: (load[i], i))
        owner[n] = r
        load[r] += int(sizes[n])
    out: list[list[str]] = [[] for _ in range(k)]
    for n in sizes:
        out[owner[n]].append(n)
    return out
