"""Lark (LALR) parse of spec text -> typed AST, with every static check.

Static checks (all raise ``SpecError`` at the offending token): declarations before use,
unknown axis / variable / function / op / argument / attribute, duplicate or missing
captures, captures of ``local`` or renumbering ops that the pattern lacks, misplaced ops.
Checks that need numbers (divisibility, list lengths, ranges) happen in ``Spec.bind``.
"""
from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import importlib.resources

import lark
from lark import Token, Tree

from ucp.plan.ops import ORDERS, PARTITIONS, SPLITS
from ucp.lang import ast as A
from ucp.lang.errors import Pos, SpecError
from ucp.lang.pattern import Pattern, parse_pattern

#: The grammar and the bundled specs are package data (found the same way from a wheel or a checkout).
PACKAGE = Path(str(importlib.resources.files("ucp")))
GRAMMAR = PACKAGE / "grammar" / "ucp.lark"
CONVERTERS = PACKAGE / "converters"

RESERVED = ("spec", "axes", "config", "let", "include", "param", "local", "with",
            "rename", "from", "part", "state", "where", "and")


def did_you_mean(word: str, known) -> str:
    """`` (did you mean 'x'?)`` for the closest known spelling, or ``""``."""
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


@functools.lru_cache(maxsize=1)
def _lark() -> lark.Lark:
    return lark.Lark(GRAMMAR.read_text(), parser="lalr", propagate_positions=True,
                     maybe_placeholders=True)


# ----------------------------------------------------------------------------- syntax errors
_DESCR = {"NAME": "a name", "INT": "an integer", "STRING": 'a quoted name pattern "..."',
          "$END": "end of input"}


def _describe_terminal(name: str) -> str:
    if name in _DESCR:
        return _DESCR[name]
    try:
        pat = _lark().get_terminal(name).pattern
    except KeyError:
        return name
    if isinstance(pat, lark.lexer.PatternStr):
        return f"'{pat.value}'"
    return name


def _expected(names) -> str:
    descr = sorted({_describe_terminal(n) for n in names or ()},
                   key=lambda s: (not s.startswith("'"), s))
    if not descr:
        return ""
    if len(descr) == 1:
        return descr[0]
    return ", ".join(descr[:-1]) + " or " + descr[-1]


def _accepts(e) -> set:
    """The exact set of acceptable terminals (LALR state merging widens ``e.expected``)."""
    ip = getattr(e, "interactive_parser", None)
    if ip is None:
        return set()
    try:
        return set(ip.accepts())
    except Exception:  # pragma: no cover - best effort only
        return set()


def _end_pos(text: str) -> tuple[int, int]:
    """Just after the last non-blank character (a file's final newline has no line to show)."""
    lines = text.rstrip().split("\n")
    return len(lines), len(lines[-1]) + 1


def _syntax_error(e: lark.exceptions.UnexpectedInput, text: str, filename: str) -> SpecError:
    line, col = getattr(e, "line", -1), getattr(e, "column", -1)
    hint = ""
    if isinstance(e, lark.exceptions.UnexpectedToken):
        tok = e.token
        if tok.type == "$END" or line is None or line < 1:
            line, col = _end_pos(text)
            what = "unexpected end of input"
        else:
            shown = str(tok)
            what = f"unexpected {_describe_terminal(tok.type) if tok.type not in ('NAME', 'INT', 'STRING') else ''}".rstrip()
            what = f"unexpected {shown!r}" if tok.type in ("NAME", "INT", "STRING") else what
            if tok.type == "NAME" and str(tok) in RESERVED:
                what += " (a reserved word)"
            prev = (getattr(e, "token_history", None) or [None])[-1]
            if prev is not None and prev.type == "NAME" and str(prev) in RESERVED:
                hint = (f" ('{prev}' at {prev.line}:{prev.column} was read as an op name: is a '|' or ','"
                        " left dangling before it?)")
        exp = _expected(_accepts(e) or e.expected)
    elif isinstance(e, lark.exceptions.UnexpectedCharacters):
        ch = text[e.pos_in_stream] if 0 <= e.pos_in_stream < len(text) else ""
        what = f"unexpected character {ch!r}"
        if ch == '"':
            what = "unterminated string (a name pattern ends with '\"' on the same line)"
        exp = _expected(e.allowed)
    else:  # UnexpectedEOF
        line, col = _end_pos(text)
        what = "unexpected end of input"
        exp = _expected(getattr(e, "expected", ()))
    if line is None or line < 1:
        line, col = _end_pos(text)
    msg = what + (f": expected {exp}" if exp else "") + hint
    return SpecError(Pos(filename, line, max(1, col or 1)), msg, text)


# ----------------------------------------------------------------------------- op schemas
@dataclass(frozen=True)
class _Schema:
    positional: tuple[str, ...]          # names of positional args, in order
    kinds: dict                          # arg name -> kind
    required: tuple[str, ...] = ()
    varargs: Optional[str] = None        # name collecting extra positionals (kind "ident")


_SHARD = _Schema(("dim",), {"dim": "expr", "over": "axis", "split": "ident", "sizes": "exprlist"},
                 ("dim", "over"))
_RENUM = _Schema(("capture",), {"capture": "ident", "over": "axis", "count": "expr",
                                "split": "ident", "sizes": "exprlist", "chunks": "expr",
                                "chunk": "ident"}, ("capture", "over", "count"))
OPS = {
    "shard": _SHARD,
    "replicate": _Schema((), {"over": "axis"}, ("over",)),
    "average": _Schema((), {"over": "axis"}, ("over",)),
    "flat": _Schema((), {"over": "axis", "group": "ident", "align": "expr",
                         "param_align": "expr", "partition": "ident", "bucket": "expr",
                         "order": "ident", "strip": "bool"}, ("over",)),
    "pad": _Schema(("dim",), {"dim": "expr", "multiple": "expr", "keep": "bool"},
                   ("dim", "multiple")),
    "parts": _Schema((), {"names": "ident", "dim": "expr", "sizes": "exprlist", "groups": "expr",
                          "interleave": "expr"},
                     (), varargs="names"),
    "layers": _RENUM,
    "experts": _RENUM,
    "renumber": _RENUM,
}
ATTRS = {"frozen": "flag", "skip": "flag", "tied": "string", "first": "axis", "last": "axis",
         "own_bucket": "flag", "copy_of": "string"}


# ----------------------------------------------------------------------------- the builder
@dataclass
class SpecData:
    filename: str
    name: Optional[str] = None
    axes: list = field(default_factory=list)
    configs: dict = field(default_factory=dict)
    lets: dict = field(default_factory=dict)
    rules: list = field(default_factory=list)
    renames: list = field(default_factory=list)
    sources: dict = field(default_factory=dict)
    includes: list = field(default_factory=list)
    decompositions: list = field(default_factory=list)
    warnings: list = field(default_factory=list)     # (Pos, message): e.g. shadowed rules


def _pos(filename: str, node) -> Pos:
    if isinstance(node, Token):
        return Pos(filename, node.line or 1, node.column or 1)
    meta = node.meta
    if getattr(meta, "empty", True):
        for c in node.children:
            if c is not None:
                return _pos(filename, c)
        return Pos(filename, 1, 1)
    return Pos(filename, meta.line, meta.column)


class _Builder:
    def __init__(self, data: SpecData, text: str, filename: str, stack: tuple):
        self.d = data
        self.text = text
        self.file = filename
        self.stack = stack

    def err(self, node, msg: str) -> SpecError:
        pos = node if isinstance(node, Pos) else _pos(self.file, node)
        return SpecError(pos, msg, self.d.sources.get(pos.filename, self.text))

    # -- names in scope
    def declared(self) -> list[str]:
        return list(self.d.axes) + list(self.d.configs) + list(self.d.lets)

    def check_new_name(self, tok: Token, kind: str):
        n = str(tok)
        if n in self.d.axes and kind != "axis":
            raise self.err(tok, f"{kind} {n!r} is already declared as an axis")
        if n in self.d.lets:
            raise self.err(tok, f"{kind} {n!r} is already declared by 'let' at {self.d.lets[n].pos}")
        if n in self.d.configs and kind != "config":
            raise self.err(tok, f"{kind} {n!r} is already declared by 'config' at "
                                f"{self.d.configs[n].pos}")

    # -- statements
    def run(self, tree: Tree):
        for st in tree.children:
            getattr(self, "st_" + st.data)(st)

    def st_spec_decl(self, t):
        tok = t.children[0]
        if len(self.stack) > 1:       # an included file's header is not the spec's name
            return
        if self.d.name is not None:
            raise self.err(tok, f"second 'spec' header: the spec is already named {self.d.name!r}")
        self.d.name = str(tok)

    def st_axes_decl(self, t):
        *names, of_c = t.children
        seen = set()
        for tok in names:
            n = str(tok)
            if n in seen:
                raise self.err(tok, f"axis {n!r} listed twice")
            seen.add(n)
            self.check_new_name(tok, "axis")
            if of_c is not None and n in self.d.axes:
                raise self.err(tok, f"axis {n!r} is already declared: the axes of a second "
                                    f"decomposition must be new")
            if n not in self.d.axes:
                self.d.axes.append(n)
        if of_c is not None:
            self.decomposition(tuple(str(x) for x in names), of_c)

    def decomposition(self, names: tuple, of_c) -> None:
        """``axes edp, ep, etp = dp, tp``: a second indexing of the ranks of dp x tp."""
        of = []
        for tok in of_c.children:
            n = str(tok)
            if n not in self.d.axes or n in names:
                raise self.err(tok, f"unknown axis {n!r}{did_you_mean(n, self.d.axes)}: "
                                    f"expected axes declared before, e.g. axes edp, ep = dp")
            used = [d for d in self.d.decompositions if n in d.of or n in d.axes]
            if used or n in of:
                raise self.err(tok, f"axis {n!r} is already in a decomposition")
            of.append(n)
        self.d.decompositions.append(A.Decomposition(names, tuple(of), _pos(self.file, of_c)))

    def st_config_decl(self, t):
        for item in t.children:
            tok, default = item.children[0], item.children[1]
            self.check_new_name(tok, "config constant")
            expr = self.expr(default) if default is not None else None
            old = self.d.configs.get(str(tok))
            if old is not None and (old.default is not None or expr is not None):
                raise self.err(tok, f"config constant {str(tok)!r} is already declared at {old.pos}")
            if old is None:
                self.d.configs[str(tok)] = A.ConfigDecl(str(tok), expr, _pos(self.file, tok))

    def st_let_decl(self, t):
        tok, e = t.children
        self.check_new_name(tok, "let")
        if str(tok) in self.d.configs:
            raise self.err(tok, f"let {str(tok)!r} is already declared by 'config'")
        self.d.lets[str(tok)] = A.LetDecl(str(tok), self.expr(e), _pos(self.file, tok))

    def st_include_stmt(self, t):
        tok = t.children[0]
        rel = str(tok)[1:-1]
        here = Path(self.file).parent if not self.file.startswith("<") else Path.cwd()
        cands = [here / rel, CONVERTERS / rel]
        if not rel.endswith(".ucp"):
            cands += [here / (rel + ".ucp"), CONVERTERS / (rel + ".ucp")]
        path = next((c for c in cands if c.is_file()), None)
        if path is None:
            raise self.err(tok, f"include: no file {rel!r} (looked in {here} and {CONVERTERS}): "
                                f"expected the path of a .ucp file")
        key = str(path.resolve())
        if key in self.stack:
            raise self.err(tok, f"include cycle: {rel!r} is already being included")
        try:
            text = path.read_text()
        except OSError as ex:
            raise self.err(tok, f"include: cannot read {rel!r}: {ex}") from None
        self.d.includes.append(str(path))
        _build(self.d, text, str(path), self.stack + (key,))

    def st_param_rule(self, t):
        kw, pat_tok, local_c, where_c, pipe_c, *state_cs, with_c = t.children
        pos = _pos(self.file, kw)
        pattern = self.pattern(pat_tok)
        local = self.pattern(local_c.children[0], typed=False) if local_c is not None else None
        ops, renum = self.pipeline(pipe_c.children if pipe_c is not None else (), pattern)
        chunk_caps = {r.chunk for r in renum if r.chunk}
        if local is not None:
            self.check_same_captures(pattern, local, local_c.children[0], "local pattern",
                                     extra=chunk_caps)
        for r in renum:
            if r.chunk and (local is None or r.chunk not in local.named):
                raise self.err(r.pos, f"{r.kind}(chunk={r.chunk}): the local pattern must "
                                      f"name the model chunk as {{{r.chunk}}}")
        states = tuple(self.state_layout(c, pattern) for c in state_cs)
        where = self.where(where_c) if where_c is not None else ()
        attrs = self.attrs(with_c) if with_c is not None else ()
        rule = A.ParamRule(pattern, local, tuple(ops), tuple(renum), attrs, pos, where, states)
        self.warn_shadowed(rule)
        self.d.rules.append(rule)

    def pipeline(self, calls, pattern: Pattern) -> tuple[list, list]:
        """The ops of ``= op | op ...``: (tensor ops, renumbering ops), checked for order."""
        ops, renum = [], []
        used_axes: dict[str, Pos] = {}
        for call in calls:
            node = self.op(call, pattern)
            axis = getattr(node, "axis", None)
            if axis is not None and axis in used_axes:
                raise self.err(call, f"axis {axis!r} is already used by an op at "
                                     f"{used_axes[axis]} of this rule: expected each axis at most once")
            used_axes[axis] = node.pos
            if isinstance(node, A.RenumberOp):
                if node.capture in {r.capture for r in renum}:
                    raise self.err(call, f"capture {{{node.capture}}} is renumbered twice")
                renum.append(node)
            else:
                if ops and isinstance(ops[-1], A.FlatOp):
                    raise self.err(call, f"{call.children[0]}(...) after flat(...): flat must be "
                                         f"the last tensor op (it flattens the local tensor)")
                ops.append(node)
        return ops, renum

    def state_layout(self, c: Tree, pattern: Pattern) -> A.StateLayout:
        """``state NAME, ... = PIPELINE``: tensor ops only (names are placed once per rule)."""
        kw, *rest = c.children
        names = [x for x in rest if isinstance(x, Token)]
        calls = [x for x in rest if isinstance(x, Tree) and x.data == "call"]
        where_c = next((x for x in rest if isinstance(x, Tree) and x.data == "where_clause"), None)
        where = self.where(where_c, shape=False) if where_c is not None else ()
        ops, renum = self.pipeline(calls, pattern)
        if renum:
            raise self.err(renum[0].pos, f"{renum[0].kind}(...) in a state layout: renumbering "
                                         f"places the name, which is the same for every state; "
                                         f"expected it in the rule's main pipeline")
        return A.StateLayout(tuple(str(n) for n in names), tuple(ops), _pos(self.file, kw), where)

    def where(self, c: Tree, shape: bool = True) -> tuple:
        """Conditions; ``shape``: they may use the tensor's ``ndim`` / ``numel``."""
        out = []
        for cond in c.children[1:]:
            left, op, right = cond.children
            ctx = "where condition"
            out.append(A.Cond(self.expr(left, ctx, shape=shape), str(op),
                              self.expr(right, ctx, shape=shape), _pos(self.file, cond)))
        return tuple(out)

    def warn_shadowed(self, rule: A.ParamRule) -> None:
        """Warn when an earlier rule without conditions matches every name this one does
        (sampled: each capture filled with a few values); the later rule can never win."""
        samples = rule.pattern.samples(frozenset(r.capture for r in rule.renumber))
        for earlier in self.d.rules:
            if earlier.where:
                continue
            rx = earlier.pattern.regex(frozenset(r.capture for r in earlier.renumber))
            if samples and all(rx.fullmatch(x) for x in samples):
                msg = (f'rule "{rule.pattern.text}" is shadowed by the earlier rule '
                       f'"{earlier.pattern.text}" at {earlier.pos}, which matches every name it '
                       f'matches (the first matching rule wins): move it before that rule')
                self.d.warnings.append((rule.pos, msg))
                return

    def st_rename_rule(self, t):
        kw, tgt_tok, src_tok, part_c = t.children
        target = self.pattern(tgt_tok)
        source = self.pattern(src_tok, typed=False)
        self.check_same_captures(target, source, src_tok, "source pattern")
        part = str(part_c.children[0]) if part_c is not None else None
        self.d.renames.append(A.RenameRule(target, source, part, _pos(self.file, kw)))

    # -- pieces
    def pattern(self, tok: Token, typed: bool = True) -> Pattern:
        return parse_pattern(str(tok)[1:-1], _pos(self.file, tok), self.text, typed=typed)

    def check_same_captures(self, pattern: Pattern, other: Pattern, tok, what: str,
                            extra: frozenset = frozenset()):
        named = set(pattern.named) | set(extra)
        for c in other.captures:
            if c.name.startswith("*"):
                continue
            if c.name not in named:
                raise self.err(Pos(self.file, tok.line, tok.column + 1 + c.offset),
                               f"capture {{{c.name}}} of the {what} is not in the pattern "
                               f"{pattern.text!r}: expected one of "
                               f"{', '.join('{%s}' % n for n in pattern.named) or '(no captures)'}")
        missing = [n for n in pattern.named if n not in set(other.named)]
        if missing:
            raise self.err(tok, f"the {what} lacks capture {{{missing[0]}}} of the pattern "
                                f"(each capture must appear on both sides, or the names cannot "
                                f"be mapped back)")
        kinds_a = [c.kind for c in pattern.captures if c.name.startswith("*")]
        kinds_b = [c.kind for c in other.captures if c.name.startswith("*")]
        if kinds_a != kinds_b:
            sym = {"star": "*", "starstar": "**"}
            raise self.err(tok, f"the {what} has wildcards {' '.join(sym[k] for k in kinds_b) or '(none)'}; "
                                f"expected the pattern's, in order: "
                                f"{' '.join(sym[k] for k in kinds_a) or '(none)'}")

    def op(self, call: Tree, pattern: Pattern):
        name_tok, args_t = call.children
        name = str(name_tok)
        if name not in OPS:
            hint = "; attributes go after 'with'" if name in ATTRS else ""
            raise self.err(name_tok, f"unknown op {name!r}{did_you_mean(name, OPS)}: expected "
                                     f"one of {', '.join(OPS)}{hint}")
        a = self.bind_args(name, OPS[name], args_t, call)
        pos = _pos(self.file, name_tok)

        def split_of(default: str) -> str:
            if "sizes" in a:
                if "split" in a and a["split"][0] != "sizes":
                    raise self.err(a["split"][1], "split=... and sizes=[...] together: sizes "
                                                  "implies split=sizes")
                return "sizes"
            if "split" not in a:
                return default
            s, node = a["split"]
            if s not in SPLITS or s == "sizes":
                raise self.err(node, f"unknown split {s!r}: expected chunk, tensor_split or even "
                                     f"(or sizes=[...])")
            return s

        def sizes():
            return a["sizes"][0] if "sizes" in a else None

        if name == "shard":
            return A.ShardOp(a["dim"][0], a["over"][0], split_of("chunk"), sizes(), pos)
        if name == "replicate":
            return A.ReplicateOp(a["over"][0], pos)
        if name == "average":
            return A.AverageOp(a["over"][0], pos)
        if name == "flat":
            return self.flat_op(a, pos)
        if name == "pad":
            return A.PadOp(a["dim"][0], a["multiple"][0], pos, a.get("keep", (False,))[0])
        if name == "parts":
            names = a.get("names", ((), None))[0]
            if len(names) < 2:
                raise self.err(call, "parts(...) needs at least two part names, e.g. "
                                     "parts(gate, up, dim=0)")
            seen = set()
            for n, node in zip(names, a["names"][1]):
                if n in seen:
                    raise self.err(node, f"part {n!r} listed twice")
                seen.add(n)
            sz = sizes()
            if sz is not None and len(sz) != len(names):
                raise self.err(a["sizes"][1], f"parts: {len(sz)} sizes for {len(names)} parts: "
                                              f"expected one size per part")
            if "groups" in a and "interleave" in a:
                raise self.err(a["interleave"][1], "parts: groups= and interleave= together: "
                                                   "interleave is another spelling of groups")
            groups = a.get("groups", a.get("interleave", (A.Num(1, pos),)))[0]
            return A.PartsOp(a.get("dim", (A.Num(0, pos),))[0], tuple(names), sz, groups, pos)
        # renumbering: layers / experts / renumber
        cap, node = a["capture"]
        if cap not in pattern.named:
            raise self.err(node, f"{name}({cap}, ...): {{{cap}}} is not a capture of the pattern "
                                 f"{pattern.text!r}: expected one of "
                                 f"{', '.join(pattern.named) or '(no captures)'}")
        kind = next(c.kind for c in pattern.captures if c.name == cap)
        if kind == "alt":
            raise self.err(node, f"{name}({cap}, ...): capture {{{cap}}} has alternatives, "
                                 f"expected an index capture like {{{cap}}} or {{{cap}:int}}")
        chunk = a["chunk"][0] if "chunk" in a else None
        if chunk is not None and (chunk in pattern.named or "chunks" not in a):
            raise self.err(a["chunk"][1], f"{name}(chunk={chunk}): expected a new capture name "
                                          f"for the model chunk, with chunks=N")
        return A.RenumberOp(name, cap, a["over"][0], a["count"][0], split_of("tensor_split"),
                            sizes(), pos, a["chunks"][0] if "chunks" in a else None, chunk)

    def flat_op(self, a: dict, pos: Pos) -> A.FlatOp:
        one = A.Num(1, pos)
        choice = {"partition": PARTITIONS, "order": ORDERS}
        for key, allowed in choice.items():
            if key in a and a[key][0] not in allowed:
                v = a[key][0]
                raise self.err(a[key][1], f"flat({key}={v}): unknown {key}"
                                          f"{did_you_mean(v, allowed)}: expected {' or '.join(allowed)}")
        if "group" not in a:
            for key in ("partition", "bucket", "order", "strip"):
                if key in a:
                    raise self.err(a[key][1], f"flat({key}=...) without group=: {key} describes "
                                              f"a group of parameters, expected group=NAME")
        return A.FlatOp(a["over"][0], a["group"][0] if "group" in a else None,
                        a.get("align", (one,))[0], a.get("param_align", (one,))[0], pos,
                        a.get("partition", ("buffer",))[0],
                        a["bucket"][0] if "bucket" in a else None,
                        a.get("order", ("model",))[0], a.get("strip", (False,))[0])

    def bind_args(self, opname: str, schema: _Schema, args_t, call) -> dict:
        """-> {arg name: (converted value, node)}; for varargs (tuple, tuple of nodes)."""
        out: dict = {}
        items = args_t.children if args_t is not None else []
        npos = 0
        var_vals, var_nodes = [], []
        seen_kw = False
        for item in items:
            if isinstance(item, Tree) and item.data == "kwarg":
                key_tok, val = item.children
                key = str(key_tok)
                seen_kw = True
                if key not in schema.kinds or key == schema.varargs or key == "capture":
                    raise self.err(key_tok, f"{opname}() has no argument {key!r}"
                                            f"{did_you_mean(key, schema.kinds)}: expected "
                                            f"{self.arg_list(schema)}")
                if key in out:
                    raise self.err(key_tok, f"{opname}(): argument {key!r} given twice")
                out[key] = (self.convert(val, schema.kinds[key], opname, key), item)
                continue
            if seen_kw:
                raise self.err(item, f"{opname}(): positional argument after keyword arguments")
            if npos < len(schema.positional):
                key = schema.positional[npos]
                out[key] = (self.convert(item, schema.kinds[key], opname, key), item)
                npos += 1
            elif schema.varargs:
                var_vals.append(self.convert(item, "ident", opname, "part name"))
                var_nodes.append(item)
            else:
                raise self.err(item, f"{opname}() takes {len(schema.positional)} positional "
                                     f"argument{'s' if len(schema.positional) != 1 else ''}: "
                                     f"expected {self.arg_list(schema)}")
        if schema.varargs and var_vals:
            out[schema.varargs] = (tuple(var_vals), tuple(var_nodes))
        for req in schema.required:
            if req not in out:
                raise self.err(call, f"{opname}() is missing argument {req!r}: expected "
                                     f"{self.arg_list(schema)}")
        return out

    @staticmethod
    def arg_list(schema: _Schema) -> str:
        parts = []
        if schema.varargs:
            parts.append(f"{schema.varargs}...")
        for k in schema.kinds:
            if k == schema.varargs:
                continue
            parts.append(k if k in schema.positional else f"{k}=")
        return "(" + ", ".join(parts) + ")"

    def convert(self, val, kind: str, opname: str, key: str):
        if kind == "expr":
            return self.expr(val, f"{opname}({key}=...)")
        if kind == "exprlist":
            if not (isinstance(val, Tree) and val.data == "list"):
                raise self.err(val, f"{opname}({key}=...): expected a list like [a, b]")
            items = [c for c in val.children if c is not None]
            if not items:
                raise self.err(val, f"{opname}({key}=[]): expected at least one size")
            return tuple(self.expr(c, f"{opname}({key}=...)") for c in items)
        if kind == "axis":
            if not (isinstance(val, Tree) and val.data == "var"):
                raise self.err(val, f"{opname}({key}=...): expected an axis name "
                                    f"({', '.join(self.d.axes) or 'none declared'})")
            n = str(val.children[0])
            if n not in self.d.axes:
                raise self.err(val, f"unknown axis {n!r}{did_you_mean(n, self.d.axes)}: expected "
                                    f"one of {', '.join(self.d.axes) or '(no axes declared: add axes ...)'}")
            return n
        if kind == "bool":
            if isinstance(val, Tree) and val.data == "var" and str(val.children[0]) in ("true", "false"):
                return str(val.children[0]) == "true"
            raise self.err(val, f"{opname}({key}=...): expected true or false")
        if kind == "ident":
            if isinstance(val, Tree) and val.data == "var":
                return str(val.children[0])
            if isinstance(val, Tree) and val.data == "string":
                s = str(val.children[0])[1:-1]
                if not s:
                    raise self.err(val, f"{opname}({key}=\"\"): expected a non-empty name")
                return s
            raise self.err(val, f"{opname}({key}=...): expected a name")
        raise AssertionError(kind)

    def attrs(self, with_c: Tree) -> tuple:
        out = []
        for at in with_c.children:
            name_tok = at.children[0]
            name = str(name_tok)
            if name not in ATTRS:
                hint = "; layout ops go after '='" if name in OPS else ""
                raise self.err(name_tok, f"unknown attribute {name!r}{did_you_mean(name, ATTRS)}: "
                                         f"expected one of {', '.join(ATTRS)}{hint}")
            if name in dict(out):
                raise self.err(name_tok, f"attribute {name!r} given twice")
            kind = ATTRS[name]
            if kind == "flag":
                if at.data != "attr" and at.children[1] is not None:
                    raise self.err(at, f"attribute {name!r} takes no arguments")
                out.append((name, True))
            elif kind == "axis":
                args = at.children[1].children if at.data == "attr_call" and at.children[1] else []
                if len(args) != 1:
                    raise self.err(at, f"attribute {name}: expected {name}(axis), e.g. {name}(pp)")
                out.append((name, self.convert(args[0], "axis", name, "axis")))
            else:
                args = at.children[1].children if at.data == "attr_call" and at.children[1] else []
                if len(args) != 1:
                    raise self.err(at, f'attribute {name}: expected {name}("other.param.name")')
                v = args[0]
                if isinstance(v, Tree) and v.data == "kwarg" and str(v.children[0]) == "to":
                    v = v.children[1]
                if not (isinstance(v, Tree) and v.data == "string"):
                    raise self.err(v, f'attribute {name}: expected a quoted parameter name, '
                                      f'{name}("other.param.name")')
                s = str(v.children[0])[1:-1]
                if not s:
                    raise self.err(v, f"attribute {name}: expected a non-empty name")
                out.append((name, s))
        return tuple(out)

    # -- expressions
    def expr(self, t, ctx: str = "expression", shape: bool = False) -> A.Expr:
        """An integer expression; ``shape``: the tensor's ``ndim`` / ``numel`` may be used
        (``where`` conditions)."""
        pos = _pos(self.file, t)
        if isinstance(t, Token):
            raise self.err(t, f"{ctx}: expected an integer expression")
        d = t.data
        if d == "int":
            return A.Num(int(t.children[0]), pos)
        if d == "var":
            n = str(t.children[0])
            known = self.declared() + (list(A.SHAPE_VARIABLES) if shape else [])
            if n not in known:
                hint = (" (ndim and numel are known in where conditions only)"
                        if n in A.SHAPE_VARIABLES else did_you_mean(n, known))
                raise self.err(t, f"unknown variable {n!r}{hint}: expected an axis, a 'config' "
                                  f"constant or a 'let' declared before this line "
                                  f"({', '.join(self.declared()) or 'none declared'})")
            return A.Var(n, pos)
        if d in ("add", "sub", "mul", "floordiv", "mod"):
            op = {"add": "+", "sub": "-", "mul": "*", "floordiv": "//", "mod": "%"}[d]
            return A.BinOp(op, self.expr(t.children[0], ctx, shape),
                           self.expr(t.children[1], ctx, shape), pos)
        if d == "truediv":
            raise self.err(t, "'/' is not integer arithmetic: expected '//' (floor division) "
                              "or ceil_div(a, b)")
        if d == "neg":
            return A.Neg(self.expr(t.children[0], ctx, shape), pos)
        if d == "unary":  # "+" unary keeps a tree named after the rule
            return self.expr(t.children[0], ctx, shape)
        if d == "func":
            n = str(t.children[0])
            args = tuple(self.expr(c, ctx, shape) for c in t.children[1:] if c is not None)
            if n not in A.FUNCTIONS:
                raise self.err(t, f"unknown function {n!r}{did_you_mean(n, A.FUNCTIONS)}: "
                                  f"expected one of {', '.join(A.FUNCTIONS)}")
            lo, hi = A.FUNCTIONS[n]
            if len(args) < lo or (hi is not None and len(args) > hi):
                want = f"{lo}" if lo == hi else f"at least {lo}"
                raise self.err(t, f"{n}() takes {want} argument{'s' if lo != 1 else ''}, "
                                  f"got {len(args)}")
            return A.Func(n, args, pos)
        if d == "string":
            raise self.err(t, f"{ctx}: expected an integer expression, not a quoted string")
        if d == "list":
            raise self.err(t, f"{ctx}: expected an integer expression, not a list")
        raise self.err(t, f"{ctx}: expected an integer expression")


def _build(data: SpecData, text: str, filename: str, stack: tuple) -> None:
    data.sources[filename] = text
    try:
        tree = _lark().parse(text)
    except lark.exceptions.UnexpectedInput as e:
        raise _syntax_error(e, text, filename) from None
    _Builder(data, text, filename, stack).run(tree)


def parse_data(text: str, filename: str = "<string>") -> SpecData:
    data = SpecData(filename)
    key = str(Path(filename).resolve()) if not filename.startswith("<") else filename
    _build(data, text, filename, (key,))
    return data
