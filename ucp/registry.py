"""Name -> implementation tables for sources and targets, resolved lazily.

An entry of ``None`` is a layout that is planned but not in this version: asking for it is
a clear error, never a guess.
"""
from __future__ import annotations

import importlib

from ucp.errors import UcpError


def resolve(table: dict, name: str, kind: str):
    if name not in table:
        raise UcpError(f"unknown {kind} {name!r}; known: {', '.join(table)}")
    target = table[name]
    if target is None:
        raise UcpError(f"{kind} {name!r} is not supported by this version of ucp yet "
                       f"(supported: {', '.join(k for k, v in table.items() if v)})")
    mod, fn = target.split(":")
    return getattr(importlib.import_module(mod), fn)
