"""Errors raised by the planner. Every message names the parameter it is about.

``Pos`` and ``SpecError`` live here (the language re-exports them from ``ucp.lang``) because a
bound rule carries the source position of each of its ops: an error the planner finds in an
op (an explicit size that does not add up, a dim out of range, parts that do not fit) is a
``SpecError`` pointing at that op with a caret, as LANGUAGE.md §8 promises, and still a
``PlanError``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ucp.errors import UcpError


@dataclass(frozen=True)
class Pos:
    """A position in a spec source: 1-based line and column (``source``: the file's text,
    kept for the caret of error messages)."""
    filename: str
    line: int
    column: int
    source: Optional[str] = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return f"{self.filename}:{self.line}:{self.column}"


class PlanError(UcpError):
    """A layout that cannot be planned: an even split that does not divide, parts sizes that
    do not add up, groups not divisible by the degree, an op in an impossible place, ..."""


class SpecError(UcpError):
    """A syntax or semantic error in a spec, or a bind-time or plan-time error of one of its
    rules.

    ``str(err)`` is ``"file:line:column: message"`` followed by the source line and a caret.
    The parts are also attributes: ``filename``, ``line``, ``column``, ``detail``.
    """

    def __init__(self, pos: Pos, detail: str, source: Optional[str] = None):
        self.pos = pos
        self.filename = pos.filename
        self.line = pos.line
        self.column = pos.column
        self.detail = detail
        msg = f"{pos}: {detail}"
        snippet = caret_snippet(source if source is not None else pos.source, pos.line, pos.column)
        if snippet:
            msg += "\n" + snippet
        super().__init__(msg)


class PlanSpecError(SpecError, PlanError):
    """An error found while planning, located at the op of the spec that caused it."""


class CoverageError(UcpError):
    """Fragments that do not tile a universal tensor exactly: a region no fragment covers
    (``holes``) or one covered by two fragments that are not replicas (``overlaps``)."""

    def __init__(self, message: str, name: str = "", holes=(), overlaps=()):
        super().__init__(message)
        self.name = name
        self.holes = tuple(holes)        # tuple[Box, ...] of the universal tensor
        self.overlaps = tuple(overlaps)  # tuple[Box, ...] covered twice


def caret_snippet(source: Optional[str], line: int, column: int) -> str:
    """The source line and a caret under ``column`` (empty when the source is unknown)."""
    if not source or line < 1:
        return ""
    lines = source.splitlines()
    if line > len(lines):
        return ""
    text = lines[line - 1].expandtabs(1)
    col = max(1, min(column, len(text) + 1))
    return f"    {text}\n    {' ' * (col - 1)}^"
