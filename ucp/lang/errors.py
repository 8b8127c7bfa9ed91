"""Errors of the specification language.

Every ``SpecError`` message starts with ``file:line:column:`` and, where the source is known,
ends with the offending source line and a caret under the column.
"""
from __future__ import annotations

from typing import Iterable

from ucp.errors import UcpError
from ucp.plan.errors import Pos, PlanSpecError, SpecError, caret_snippet

__all__ = ["Pos", "SpecError", "PlanSpecError", "SpecWarning", "UnmatchedError", "caret_snippet"]


class SpecWarning(UserWarning):
    """A spec that is valid but probably not what was meant (e.g. a rule that an earlier
    rule shadows). The message has the same ``file:line:column:`` form and caret."""


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
