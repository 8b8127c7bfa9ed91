"""Errors raised by the planner. Every message names the parameter it is about."""
from __future__ import annotations

from ucp.errors import UcpError


class PlanError(UcpError):
    """A layout that cannot be planned: an even split that does not divide, parts sizes that
    do not add up, groups not divisible by the degree, an op in an impossible place, ..."""


class CoverageError(UcpError):
    """Fragments that do not tile a universal tensor exactly: a region no fragment covers
    (``holes``) or one covered by two fragments that are not replicas (``overlaps``)."""

    def __init__(self, message: str, name: str = "", holes=(), overlaps=()):
        super().__init__(message)
        self.name = name
        self.holes = tuple(holes)        # tuple[Box, ...] of the universal tensor
        self.overlaps = tuple(overlaps)  # tuple[Box, ...] covered twice
