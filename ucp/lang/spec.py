"""Spec (parsed, unbound) and BoundSpec (every expression evaluated to plain ints)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

from ucp.plan import ops as O
from ucp.lang import ast as A
from ucp.lang.errors import Pos, SpecError, UnmatchedError
from ucp.lang.parser import CONVERTERS, SpecData, parse_data
from ucp.lang.pattern import Pattern, groupdict


def split_sizes(n: int, k: int, split: str, sizes: Optional[tuple[int, ...]] = None) -> list[int]:
    """Sizes of the ``k`` ranks' shares of ``n`` items (ops.SPLITS); the planner's rule, so that
    names (renumbering) and tensors (shards) can never disagree on a split."""
    from ucp.plan.boxes import split_sizes as _plan_split_sizes
    from ucp.plan.errors import PlanError

    try:
        return _plan_split_sizes(n, k, split, sizes)
    except PlanError as e:
        raise ValueError(str(e)) from None


@dataclass(frozen=True)
class Match:
    """A name matched by a rule: the bound rule and the captured text (wildcards as "*0"...)."""
    rule: O.BoundRule
    captures: dict
    name: str = ""


@dataclass(frozen=True)
class _Compiled:
    rule: O.BoundRule
    node: A.ParamRule
    regex: "re.Pattern[str]"
    local_pattern: Pattern
    local_regex: "re.Pattern[str]"


def _compile(node: A.ParamRule, bound: O.BoundRule) -> _Compiled:
    digits = frozenset(r.capture for r in node.renumber)
    local = node.local or node.pattern
    return _Compiled(bound, node, node.pattern.regex(digits), local, local.regex(digits))


class Spec:
    """A parsed spec: declarations and rules, expressions unevaluated."""

    def __init__(self, data: SpecData):
        self._d = data
        self.filename = data.filename
        stem = Path(data.filename).stem if not data.filename.startswith("<") else "spec"
        self.name: str = data.name or stem
        self.axes: tuple[str, ...] = tuple(data.axes)
        self.configs: dict[str, A.ConfigDecl] = dict(data.configs)
        self.lets: dict[str, A.LetDecl] = dict(data.lets)
        self.rules: tuple[A.ParamRule, ...] = tuple(data.rules)
        self.renames: tuple[A.RenameRule, ...] = tuple(data.renames)
        self.includes: tuple[str, ...] = tuple(data.includes)
        self.sources = data.sources
        self.text: str = data.sources.get(data.filename, "")   # source text of the top file
        self._rename_re = [(r, r.target.regex(), r.source.regex()) for r in self.renames]

    def __repr__(self) -> str:
        return (f"Spec({self.name!r}, axes={self.axes}, rules={len(self.rules)}, "
                f"renames={len(self.renames)})")

    # -- what a caller must give
    @property
    def constants(self) -> dict[str, Optional[A.Expr]]:
        """Every declared config constant and its default expression (None: none)."""
        return {n: c.default for n, c in self.configs.items()}

    @property
    def constants_needed(self) -> tuple[str, ...]:
        """Config constants without a default that some rule uses (directly or via lets)."""
        used: list[str] = []
        seen: set[str] = set()

        def visit(e: A.Expr):
            for v in A.variables(e):
                if v.name in seen:
                    continue
                seen.add(v.name)
                if v.name in self.lets:
                    visit(self.lets[v.name].expr)
                elif v.name in self.configs:
                    c = self.configs[v.name]
                    if c.default is None:
                        used.append(v.name)
                    else:
                        visit(c.default)

        for r in self.rules:
            for e in _rule_exprs(r):
                visit(e)
        return tuple(n for n in self.configs if n in used)

    # -- binding
    def bind(self, degrees: Optional[Mapping[str, int]] = None,
             constants: Optional[Mapping[str, int]] = None) -> "BoundSpec":
        degrees = dict(degrees or {})
        constants = dict(constants or {})
        here = Pos(self.filename, 1, 1)
        for ax, v in degrees.items():
            if ax not in self.axes:
                if v == 1:
                    continue
                raise SpecError(here, f"bind: degree {ax}={v} for an axis this spec does not "
                                      f"declare: expected axes {', '.join(self.axes) or '(none)'}",
                                self.sources.get(self.filename))
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SpecError(here, f"bind: degree {ax}={v!r}: expected a positive integer",
                                self.sources.get(self.filename))
        for k, v in constants.items():
            if k in self.configs and (not isinstance(v, int) or isinstance(v, bool)):
                raise SpecError(self.configs[k].pos, f"bind: constant {k}={v!r}: expected an "
                                                     f"integer", self.sources.get(self.filename))
        env = _Env(self, {ax: degrees.get(ax, 1) for ax in self.axes}, constants)
        compiled = []
        for r in self.rules:
            env.rule = r
            compiled.append(_compile(r, _bind_rule(r, env)))
        return BoundSpec(self, env.degrees, {k: v for k, v in constants.items()}, compiled)

    # -- cross-framework renames
    def rename(self, name: str) -> tuple[str, Optional[str]]:
        """Map a name by the first ``rename`` rule whose target pattern matches it:
        -> (source name, part or None). Raises UnmatchedError when no rule matches."""
        for r, tre, _sre in self._rename_re:
            m = tre.fullmatch(name)
            if m:
                return r.source.format(groupdict(m)), r.part
        raise UnmatchedError([name], self.name, what="rename rule")

    def unrename(self, name: str, part: Optional[str] = None) -> str:
        """The inverse of ``rename``: the target name whose source is ``name`` (and ``part``)."""
        for r, tre, sre in self._rename_re:
            if r.part != part:
                continue
            m = sre.fullmatch(name)
            if m:
                out = r.target.format(groupdict(m))
                if tre.fullmatch(out):
                    return out
        shown = name if part is None else f"{name} (part {part})"
        raise UnmatchedError([shown], self.name, what="rename rule")

    def unrename_parts(self, name: str) -> dict[Optional[str], str]:
        """Every target derived from source ``name``: {part or None: target name}."""
        out: dict[Optional[str], str] = {}
        for r, tre, sre in self._rename_re:
            m = sre.fullmatch(name)
            if m and r.part not in out:
                t = r.target.format(groupdict(m))
                if tre.fullmatch(t):
                    out[r.part] = t
        return out

    def rename_all(self, names: Iterable[str]) -> dict[str, tuple[str, Optional[str]]]:
        out, missing = {}, []
        for n in names:
            try:
                out[n] = self.rename(n)
            except UnmatchedError:
                missing.append(n)
        if missing:
            raise UnmatchedError(missing, self.name, what="rename rule")
        return out


def _rule_exprs(r: A.ParamRule):
    for op in tuple(r.ops) + tuple(r.renumber):
        for f in ("dim", "align", "param_align", "multiple", "groups", "count"):
            e = getattr(op, f, None)
            if e is not None:
                yield e
        for e in getattr(op, "sizes", None) or ():
            yield e


class _Env:
    def __init__(self, spec: Spec, degrees: dict, constants: dict):
        self.spec = spec
        self.degrees = degrees
        self.constants = constants
        self.lets: dict[str, int] = {}
        self.rule: Optional[A.ParamRule] = None
        self._active: set[str] = set()

    def err(self, pos: Pos, msg: str) -> SpecError:
        return SpecError(pos, msg, self.spec.sources.get(pos.filename))

    def rule_desc(self) -> str:
        r = self.rule
        return f'rule "{r.pattern.text}" at {r.pos}' if r else "a declaration"

    def var(self, v: A.Var) -> int:
        n = v.name
        if n in self.degrees:
            return self.degrees[n]
        if n in self.spec.lets:
            if n not in self.lets:
                self.lets[n] = self.eval(self.spec.lets[n].expr)
            return self.lets[n]
        if n in self.spec.configs:
            if n in self.constants:
                return self.constants[n]
            d = self.spec.configs[n].default
            if d is not None:
                return self.eval(d)
            raise self.err(v.pos, f"config constant {n!r} is not given to bind (needed by "
                                  f"{self.rule_desc()}): expected constants={{{n!r}: ...}}")
        raise self.err(v.pos, f"unknown variable {n!r}")  # excluded by the parser

    def eval(self, e: A.Expr) -> int:
        if isinstance(e, A.Num):
            return e.value
        if isinstance(e, A.Var):
            return self.var(e)
        if isinstance(e, A.Neg):
            return -self.eval(e.operand)
        if isinstance(e, A.BinOp):
            a, b = self.eval(e.left), self.eval(e.right)
            if e.op == "+":
                return a + b
            if e.op == "-":
                return a - b
            if e.op == "*":
                return a * b
            if b == 0:
                raise self.err(e.pos, f"division by zero ({a} {e.op} 0) in {self.rule_desc()}")
            return a // b if e.op == "//" else a % b
        if isinstance(e, A.Func):
            xs = [self.eval(x) for x in e.args]
            if e.name == "min":
                return min(xs)
            if e.name == "max":
                return max(xs)
            if xs[1] == 0:
                raise self.err(e.pos, f"division by zero (ceil_div({xs[0]}, 0)) in "
                                      f"{self.rule_desc()}")
            return -(-xs[0] // xs[1])
        raise AssertionError(e)


def _bind_rule(r: A.ParamRule, env: _Env) -> O.BoundRule:
    def ev(e, what: str, lo: Optional[int] = None) -> int:
        v = env.eval(e)
        if lo is not None and v < lo:
            raise env.err(e.pos, f"{what} = {v}: expected an integer >= {lo} "
                                 f"(in {env.rule_desc()})")
        return v

    def ev_sizes(es, axis: str, what: str, total: Optional[int] = None):
        vals = tuple(ev(e, f"{what} size", 0) for e in es)
        k = env.degrees[axis]
        if len(vals) != k:
            raise env.err(es[0].pos, f"{what}: {len(vals)} sizes for {axis}={k}: expected one "
                                     f"size per rank of {axis} (in {env.rule_desc()})")
        if total is not None and sum(vals) != total:
            raise env.err(es[0].pos, f"{what}: sizes sum to {sum(vals)}, expected {total} "
                                     f"(in {env.rule_desc()})")
        return vals

    ops: list = []
    parts_by_dim: dict[int, O.Parts] = {}
    for op in r.ops:
        if isinstance(op, A.ShardOp):
            dim = ev(op.dim, "shard dim", 0)
            sizes = ev_sizes(op.sizes, op.axis, "shard") if op.sizes else None
            k = env.degrees[op.axis]
            p = parts_by_dim.get(dim)
            if p is not None and p.sizes is not None:
                if p.groups > 1 and p.groups % k:
                    raise env.err(op.pos, f"shard over {op.axis}={k}: {p.groups} interleaved "
                                          f"groups of parts {', '.join(p.names)} do not divide "
                                          f"evenly: expected groups % {op.axis} == 0 "
                                          f"(in {env.rule_desc()})")
                if p.groups == 1 and op.split == "even":
                    for n, s in zip(p.names, p.sizes):
                        if s % k:
                            raise env.err(op.pos, f"shard over {op.axis}={k}, split=even: part "
                                                  f"{n} of size {s} is not divisible "
                                                  f"(in {env.rule_desc()})")
            ops.append(O.Shard(dim, op.axis, op.split, sizes))
        elif isinstance(op, A.ReplicateOp):
            ops.append(O.Replicate(op.axis))
        elif isinstance(op, A.AverageOp):
            ops.append(O.Average(op.axis))
        elif isinstance(op, A.FlatOp):
            ops.append(O.Flat(op.axis, op.group, ev(op.align, "flat align", 1),
                              ev(op.param_align, "flat param_align", 1)))
        elif isinstance(op, A.PadOp):
            ops.append(O.Pad(ev(op.dim, "pad dim", 0), ev(op.multiple, "pad multiple", 1)))
        elif isinstance(op, A.PartsOp):
            dim = ev(op.dim, "parts dim", 0)
            groups = ev(op.groups, "parts groups", 1)
            sizes = tuple(ev(e, "parts size", 0) for e in op.sizes) if op.sizes else None
            if sizes and groups > 1:
                for n, s in zip(op.names, sizes):
                    if s % groups:
                        raise env.err(op.pos, f"parts: size {s} of part {n} is not divisible by "
                                              f"groups={groups} (in {env.rule_desc()})")
            if dim in parts_by_dim:
                raise env.err(op.pos, f"parts: dim {dim} already has parts "
                                      f"(in {env.rule_desc()})")
            p = O.Parts(dim, op.names, sizes, groups)
            parts_by_dim[dim] = p
            ops.append(p)
        else:
            raise AssertionError(op)
    ren = []
    for rn in r.renumber:
        count = ev(rn.count, f"{rn.kind} count", 0)
        sizes = ev_sizes(rn.sizes, rn.axis, rn.kind, count) if rn.sizes else None
        k = env.degrees[rn.axis]
        if rn.split == "even" and count % k:
            raise env.err(rn.pos, f"{rn.kind}: count {count} is not divisible by {rn.axis}={k} "
                                  f"(split=even) (in {env.rule_desc()})")
        ren.append(O.Renumber(rn.capture, rn.axis, count, rn.split, sizes))
    local = (r.local or r.pattern).text
    return O.BoundRule(r.pattern.text, local, tuple(ops), tuple(ren), str(r.pos), tuple(r.attrs))


class BoundSpec:
    """A spec bound to degrees and constants: ``rules`` are ``ucp.plan.ops.BoundRule``s."""

    def __init__(self, spec: Spec, degrees: dict, constants: dict, compiled: list):
        self.spec = spec
        self.name = spec.name
        self.degrees: dict[str, int] = dict(degrees)
        self.constants = constants
        self._c: list[_Compiled] = compiled
        self.rules: tuple[O.BoundRule, ...] = tuple(c.rule for c in compiled)

    def __repr__(self) -> str:
        return f"BoundSpec({self.name!r}, degrees={self.degrees}, rules={len(self.rules)})"

    # -- matching
    def _match(self, name: str) -> Optional[tuple[_Compiled, Match]]:
        for c in self._c:
            m = c.regex.fullmatch(name)
            if m:
                return c, Match(c.rule, groupdict(m), name)
        return None

    def match(self, name: str) -> Optional[Match]:
        """The first rule (in spec order) whose pattern matches ``name``, or None."""
        hit = self._match(name)
        return hit[1] if hit else None

    def resolve(self, names: Iterable[str]) -> dict[str, Match]:
        """Match every name; UnmatchedError lists all names that no rule matches."""
        out, missing = {}, []
        for n in names:
            m = self.match(n)
            if m is None:
                missing.append(n)
            else:
                out[n] = m
        if missing:
            raise UnmatchedError(missing, self.name)
        return out

    def check_shape(self, name: str, shape) -> Match:
        """Match ``name`` and check its rule against the universal tensor ``shape``."""
        hit = self._match(name)
        if hit is None:
            raise UnmatchedError([name], self.name)
        c, m = hit
        nd = len(shape)
        for op, node in zip(c.rule.ops, c.node.ops):
            dim = getattr(op, "dim", None)
            if dim is not None and dim >= nd:
                raise SpecError(node.pos, f"{name}: {type(op).__name__.lower()} on dim {dim} of "
                                          f"a {nd}-d tensor {tuple(shape)}: expected dim < {nd}",
                                self.spec.sources.get(node.pos.filename))
            if isinstance(op, O.Parts) and op.sizes is not None and sum(op.sizes) != shape[dim]:
                raise SpecError(node.pos, f"{name}: parts sizes {op.sizes} sum to "
                                          f"{sum(op.sizes)}, but dim {dim} of {tuple(shape)} is "
                                          f"{shape[dim]}",
                                self.spec.sources.get(node.pos.filename))
        return m

    # -- renumbering
    def _ranges(self, r: O.Renumber) -> list[int]:
        return split_sizes(r.count, self.degrees.get(r.axis, 1), r.split, r.sizes)

    def _rank(self, coords: Mapping[str, int], axis: str) -> int:
        k = self.degrees.get(axis, 1)
        rank = int(coords.get(axis, 0)) if coords else 0
        if not 0 <= rank < k:
            raise ValueError(f"coordinate {axis}={rank} outside degree {axis}={k}")
        return rank

    def _holds(self, rule: O.BoundRule, coords: Mapping[str, int]) -> bool:
        """False when a first(axis) / last(axis) attribute excludes the rank at coords."""
        for k, v in rule.attrs:
            if k == "first" and self._rank(coords, v) != 0:
                return False
            if k == "last" and self._rank(coords, v) != self.degrees.get(v, 1) - 1:
                return False
        return True

    def holds(self, name: str, coords: Optional[Mapping[str, int]] = None) -> bool:
        """Whether the rank at ``coords`` holds ``name``: its renumbered indices fall in the
        rank's range, and no ``first(axis)`` / ``last(axis)`` attribute excludes the rank."""
        hit = self._match(name)
        if hit is None:
            raise UnmatchedError([name], self.name)
        return (self._holds(hit[0].rule, coords or {})
                and self.local_name(name, coords) is not None)

    def placement(self, name: str) -> dict[str, int]:
        """For a renumbered name: {axis: rank} along each renumbering axis that holds it."""
        hit = self._match(name)
        if hit is None:
            raise UnmatchedError([name], self.name)
        c, m = hit
        out = {}
        for r, node in zip(c.rule.renumber, c.node.renumber):
            g = self._global_index(name, m, r, node)
            sizes = self._ranges(r)
            start = 0
            for rank, s in enumerate(sizes):
                if start <= g < start + s:
                    out[r.axis] = rank
                    break
                start += s
        return out

    def _global_index(self, name, m, r, node) -> int:
        g = int(m.captures[r.capture])
        if not 0 <= g < r.count:
            raise SpecError(node.pos, f"{name}: {{{r.capture}}} = {g} is outside "
                                      f"{node.kind}(count={r.count})",
                            self.spec.sources.get(node.pos.filename))
        return g

    def local_name(self, name: str, coords: Optional[Mapping[str, int]] = None) -> Optional[str]:
        """The framework-local name of universal ``name`` on the rank at ``coords``
        ({axis: index}); None when that rank does not hold it (another pipeline stage or
        expert rank). Raises UnmatchedError when no rule matches."""
        hit = self._match(name)
        if hit is None:
            raise UnmatchedError([name], self.name)
        c, m = hit
        caps = dict(m.captures)
        for r, node in zip(c.rule.renumber, c.node.renumber):
            g = self._global_index(name, m, r, node)
            rank = self._rank(coords or {}, r.axis)
            sizes = self._ranges(r)
            start = sum(sizes[:rank])
            if not start <= g < start + sizes[rank]:
                return None
            caps[r.capture] = str(g - start)
        return c.local_pattern.format(caps)

    def global_name(self, local: str, coords: Optional[Mapping[str, int]] = None
                    ) -> Optional[tuple[str, Match]]:
        """Inverse of ``local_name``: (universal name, Match) for a local name on the rank at
        ``coords``, or None when no rule gives that local name there."""
        for c in self._c:
            m = c.local_regex.fullmatch(local)
            if not m:
                continue
            caps = groupdict(m)
            ok = True
            for r in c.rule.renumber:
                rank = self._rank(coords or {}, r.axis)
                sizes = self._ranges(r)
                li = int(caps[r.capture])
                if li >= sizes[rank]:
                    ok = False
                    break
                caps[r.capture] = str(sum(sizes[:rank]) + li)
            if not ok:
                continue
            name = c.node.pattern.format(caps)
            hit = self._match(name)
            if hit is not None and hit[0] is c:
                return name, hit[1]
        return None

    # -- fused parts
    def part_range(self, name: str, part: str, size: Optional[int] = None
                   ) -> tuple[int, int, int]:
        """(dim, start, stop) of ``part`` inside the universal (part-major) tensor ``name``.
        ``size`` (the length of that dim) is needed only for equal-sized parts."""
        m = self.match(name)
        if m is None:
            raise UnmatchedError([name], self.name)
        for op in m.rule.ops:
            if isinstance(op, O.Parts) and part in op.names:
                i = op.names.index(part)
                if op.sizes is not None:
                    sizes = op.sizes
                else:
                    if size is None:
                        raise ValueError(f"{name}: parts {op.names} have equal sizes; give size=")
                    if size % len(op.names):
                        raise ValueError(f"{name}: dim {op.dim} of size {size} does not split "
                                         f"into {len(op.names)} equal parts")
                    sizes = (size // len(op.names),) * len(op.names)
                start = sum(sizes[:i])
                return op.dim, start, start + sizes[i]
        raise KeyError(f"{name}: rule {m.rule.origin} has no part {part!r}")

    def rename(self, name: str):
        return self.spec.rename(name)

    def unrename(self, name: str, part: Optional[str] = None) -> str:
        return self.spec.unrename(name, part)


def parse(text: str, filename: str = "<string>") -> Spec:
    """Parse spec source text. Raises SpecError (file:line:col: ...) on any error."""
    return Spec(parse_data(text, filename))


def load(path: Union[str, Path]) -> Spec:
    """Load a spec file, or a bare name from the repository's converters/ directory
    (``load("megatron_gpt")`` reads converters/megatron_gpt.ucp)."""
    p = Path(path)
    if not p.is_file():
        s = str(path)
        cands = [CONVERTERS / s, CONVERTERS / (s + ".ucp")] if "/" not in s else []
        found = next((c for c in cands if c.is_file()), None)
        if found is None:
            known = ", ".join(sorted(x.stem for x in CONVERTERS.glob("*.ucp")))
            raise SpecError(Pos(s, 1, 1), f"no spec file {s!r}: expected a path or one of the "
                                          f"bundled specs ({known})")
        p = found
    return parse(p.read_text(), str(p))
