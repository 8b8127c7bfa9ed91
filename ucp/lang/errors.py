"""Errors of the specification language.

Every ``SpecError`` message starts with ``file:line:column:`` and, where the source is known,
ends with the offending source line and a caret under the column.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from ucp.errors import UcpError


@dataclass(frozen=True)
class Pos:
    """A position in a spec source: 1-based line and column."""
    filename: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.filename}:{self.line}:{self.column}"


class SpecError(UcpError):
    """A syntax or semantic error in a spec, or a bind-time error of one of its rules.

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
        snippet = _snippet(source, pos.line, pos.column)
        if snippet:
            msg += "\n" + snippet
        super().__init__(msg)


class UnmatchedError(UcpError, LookupError):
    """Names that no rule of a spec matches. ``names`` lists every one of them."""

    def __init__(self, names: Iterable[str], spec_name: str = "", what: str = "rule"):
        self.names = list(names)
        n = len(self.names)
        where = f" of spec {spec_name!r}" if spec_name else ""
        listing = "\n".join(f"  {x}" for x in self.names)
        super().__init__(
            f"{n} name{'s' if n != 1 else ''} matched by no {what}{where} "
            f"(add a rule for each; there is no default):\n{listing}")


def _snippet(source: Optional[str], line: int, column: int) -> str:
    if not source or line < 1:
        return ""
    lines = source.splitlines()
    if line > len(lines):
        return ""
    text = lines[line - 1].expandtabs(1)
    col = max(1, min(column, len(text) + 1))
    return f"    {text}\n    {' ' * (col - 1)}^"
