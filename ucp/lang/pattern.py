"""Name patterns: literal text with captures and wildcards.

- ``{name}``         captures one dotted segment's worth of text: ``[^.]+``
- ``{name:int}``     captures digits only: ``[0-9]+``
- ``{name:a|b|c}``   captures one of the listed alternatives
- ``*``              matches ``[^.]+`` without a name (anonymous capture ``*0``, ``*1``, ...)
- ``**``             matches ``.+`` (any text, dots included; anonymous capture likewise)

Anonymous wildcards are numbered left to right over the pattern, ``*`` and ``**`` together,
and appear in match captures under the keys ``"*0"``, ``"*1"``, ... A ``local`` pattern
repeats the same wildcards in the same order.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional

from ucp.lang.errors import Pos, SpecError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class Capture:
    name: str               # "i", or "*0" / "*1" for anonymous wildcards
    kind: str               # "seg" | "int" | "alt" | "star" | "starstar"
    alts: tuple[str, ...] = ()
    offset: int = 0         # column offset of the capture inside the pattern text


@dataclass(frozen=True)
class Pattern:
    text: str
    pieces: tuple[object, ...]   # str literals and Capture objects in order
    pos: Pos

    @property
    def captures(self) -> tuple[Capture, ...]:
        return tuple(p for p in self.pieces if isinstance(p, Capture))

    @property
    def capture_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.captures)

    @property
    def named(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.captures if not c.name.startswith("*"))

    def regex(self, digits: frozenset[str] = frozenset(), like: Optional["Pattern"] = None
              ) -> "re.Pattern[str]":
        """Compile; captures named in ``digits`` match ``[0-9]+`` (renumbered indices).
        ``like``: the pattern whose capture types an untyped (local) pattern shares, so that
        ``{m}`` of a local pattern matches the same alternatives (dots included)."""
        typed = {c.name: c for c in like.captures} if like is not None else {}
        out = []
        for p in self.pieces:
            if isinstance(p, str):
                out.append(re.escape(p))
                continue
            if p.kind == "seg" and p.name in typed and typed[p.name].kind in ("int", "alt"):
                p = typed[p.name]
            g = _group(p.name)
            if p.kind == "int" or p.name in digits:
                body = "[0-9]+"
            elif p.kind == "seg" or p.kind == "star":
                body = "[^.]+"
            elif p.kind == "starstar":
                body = ".+"
            else:
                body = "|".join(re.escape(a) for a in p.alts)
            out.append(f"(?P<{g}>{body})")
        return re.compile("".join(out))

    def samples(self, digits: frozenset[str] = frozenset()) -> list[str]:
        """A few names this pattern matches (every capture filled with two kinds of value,
        every alternative once): enough to tell that another pattern shadows it."""
        fills = {"seg": ("0", "zz"), "int": ("0", "17"), "star": ("a", "zz"),
                 "starstar": ("a", "b.c")}
        caps = self.captures
        variants = [{c.name: (c.alts[0] if c.kind == "alt" else fills[c.kind][v]) for c in caps}
                    for v in (0, 1)]
        for c in caps:
            for alt in c.alts[1:]:
                variants.append({**variants[0], c.name: alt})
        rx = self.regex(digits)
        return [n for n in dict.fromkeys(self.format(v) for v in variants) if rx.fullmatch(n)]

    def format(self, values: Mapping[str, str]) -> str:
        out = []
        for p in self.pieces:
            out.append(p if isinstance(p, str) else str(values[p.name]))
        return "".join(out)


def _group(name: str) -> str:
    return "_w" + name[1:] if name.startswith("*") else "c_" + name


def groupdict(m: "re.Match[str]") -> dict[str, str]:
    out = {}
    for k, v in m.groupdict().items():
        out["*" + k[2:] if k.startswith("_w") else k[2:]] = v
    return out


def parse_pattern(text: str, pos: Pos, source: Optional[str], *, typed: bool = True) -> Pattern:
    """Parse the inside of a quoted pattern; ``pos`` is the position of the opening quote."""

    def err(offset: int, msg: str) -> SpecError:
        return SpecError(Pos(pos.filename, pos.line, pos.column + 1 + offset), msg, source)

    if not text:
        raise err(0, "empty name pattern")
    pieces: list[object] = []
    lit: list[str] = []
    seen: set[str] = set()
    nstar = 0
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "{":
            close = text.find("}", i)
            if close < 0:
                raise err(i, "unclosed '{' in pattern: expected '}'")
            body = text[i + 1:close]
            name, _, kind = body.partition(":")
            name = name.strip()
            if not _NAME.match(name):
                raise err(i + 1, f"bad capture name {name!r}: expected an identifier like {{i}}")
            if name in seen:
                raise err(i + 1, f"duplicate capture {{{name}}} in pattern")
            seen.add(name)
            alts: tuple[str, ...] = ()
            if not _:
                k = "seg"
            else:
                if not typed:
                    raise err(i + 1, f"capture {{{body}}}: a local pattern names captures only "
                                     f"(the type belongs in the param pattern): expected {{{name}}}")
                kind = kind.strip()
                if kind == "int":
                    k = "int"
                elif "|" in kind and all(a.strip() and "{" not in a and "*" not in a
                                         for a in kind.split("|")):
                    k = "alt"
                    alts = tuple(a.strip() for a in kind.split("|"))
                else:
                    raise err(i + 1 + len(name) + 1, f"bad capture type {kind!r}: expected 'int' "
                                                     f"or alternatives like 'q|k|v'")
            if lit:
                pieces.append("".join(lit))
                lit = []
            pieces.append(Capture(name, k, alts, i))
            i = close + 1
        elif ch == "}":
            raise err(i, "unmatched '}' in pattern")
        elif ch == "*":
            double = text.startswith("**", i)
            if text.startswith("***", i):
                raise err(i, "'***' in pattern: expected '*' (one segment) or '**' (any text)")
            if lit:
                pieces.append("".join(lit))
                lit = []
            pieces.append(Capture(f"*{nstar}", "starstar" if double else "star", (), i))
            nstar += 1
            i += 2 if double else 1
        else:
            if ch.isspace():
                raise err(i, "whitespace in name pattern")
            lit.append(ch)
            i += 1
    if lit:
        pieces.append("".join(lit))
    for a, b in zip(pieces, pieces[1:]):
        if isinstance(a, Capture) and isinstance(b, Capture):
            raise err(b.offset, "two captures/wildcards next to each other are ambiguous: "
                                "expected literal text between them")
    return Pattern(text, tuple(pieces), pos)
