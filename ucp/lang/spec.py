"""Spec (parsed, unbound) and BoundSpec (every expression evaluated to plain ints)."""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

from ucp.plan import ops as O
from ucp.plan import placement as P
from ucp.plan.errors import PlanError
from ucp.errors import UcpError
from ucp.lang import ast as A
from ucp.lang.errors import Pos, SpecError, SpecWarning, UnmatchedError, caret_snippet
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
    return _Compiled(bound, node, node.pattern.regex(digits), local,
                     local.regex(digits, like=node.pattern))


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
        self.decompositions: tuple[A.Decomposition, ...] = tuple(data.decompositions)
        self.warnings: tuple[str, ...] = tuple(
            f"{pos}: {msg}\n{caret_snippet(data.sources.get(pos.filename), pos.line, pos.column)}"
            for pos, msg in data.warnings)
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
        env = _Env(self, _all_degrees(self, degrees), constants)
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
    """Every expression of a rule (ops of every state, renumbering, where conditions)."""
    ops = tuple(r.ops) + tuple(r.renumber) + tuple(op for st in r.states for op in st.ops)
    for op in ops:
        for f in ("dim", "align", "param_align", "multiple", "groups", "count", "bucket", "chunks"):
            e = getattr(op, f, None)
            if e is not None:
                yield e
        for e in getattr(op, "sizes", None) or ():
            yield e
    for c in tuple(r.where) + tuple(w for st in r.states for w in st.where):
        yield c.left
        yield c.right


def _all_degrees(spec: Spec, degrees: Mapping[str, int]) -> dict[str, int]:
    """Degrees of every axis. Of a second decomposition's axes not given, the first takes
    what the given ones leave of the product and the others are 1; the products of both
    sides must agree."""
    out = {ax: degrees.get(ax, 1) for ax in spec.axes}
    for d in spec.decompositions:
        total = math.prod(out[a] for a in d.of)
        missing = [a for a in d.axes if a not in degrees]
        given = math.prod(out[a] for a in d.axes if a in degrees)
        for a in missing[1:]:
            out[a] = 1
        if missing and given and total % given == 0:
            out[missing[0]] = total // given
        if math.prod(out[a] for a in d.axes) != total:
            shown = " * ".join(f"{a}={out[a]}" for a in d.axes)
            raise SpecError(d.pos, f"bind: {shown} is not {' * '.join(d.of)} = {total}: the "
                                   f"second decomposition must index the same ranks",
                            spec.sources.get(d.pos.filename))
    return out


class _Env:
    def __init__(self, spec: Spec, degrees: dict, constants: dict):
        self.spec = spec
        self.degrees = degrees
        self.constants = constants
        self.lets: dict[str, int] = {}
        self.rule: Optional[A.ParamRule] = None
        self.shape: Optional[dict[str, int]] = None   # ndim / numel inside a where condition

    def err(self, pos: Pos, msg: str) -> SpecError:
        return SpecError(pos, msg, self.spec.sources.get(pos.filename))

    def rule_desc(self) -> str:
        r = self.rule
        return f'rule "{r.pattern.text}" at {r.pos}' if r else "a declaration"

    def var(self, v: A.Var) -> int:
        n = v.name
        if self.shape is not None and n in A.SHAPE_VARIABLES:
            if n not in self.shape:
                raise self.err(v.pos, f"{self.shape.get('name', '')}: {self.rule_desc()} needs "
                                      f"the tensor's shape for {n!r}: expected "
                                      f"match(name, shape=...) / resolve(names, shapes)")
            return self.shape[n]
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
            return self.binop(e, self.eval(e.left), self.eval(e.right))
        if isinstance(e, A.Func):
            return self.func(e, [self.eval(x) for x in e.args])
        raise AssertionError(e)

    def binop(self, e: A.BinOp, a: int, b: int) -> int:
        if e.op == "+":
            return a + b
        if e.op == "-":
            return a - b
        if e.op == "*":
            return a * b
        if b == 0:
            raise self.err(e.pos, f"division by zero ({a} {e.op} 0) in {self.rule_desc()}")
        return a // b if e.op == "//" else a % b

    def func(self, e: A.Func, xs: list[int]) -> int:
        simple = {"min": min, "max": max, "gcd": math.gcd, "lcm": math.lcm}
        if e.name in simple:
            return simple[e.name](*xs)
        if xs[1] == 0:
            raise self.err(e.pos, f"division by zero (ceil_div({xs[0]}, 0)) in "
                                  f"{self.rule_desc()}")
        return -(-xs[0] // xs[1])

    def value(self, e: A.Expr, what: str, lo: Optional[int] = None) -> int:
        """Evaluate, and check a lower bound (an error at the expression)."""
        v = self.eval(e)
        if lo is not None and v < lo:
            raise self.err(e.pos, f"{what} = {v}: expected an integer >= {lo} "
                                  f"(in {self.rule_desc()})")
        return v

    def sizes(self, es, axis: str, what: str, total: Optional[int] = None, per: int = 1):
        """Explicit sizes: one per rank of ``axis`` (times ``per``), summing to ``total``."""
        vals = tuple(self.value(e, f"{what} size", 0) for e in es)
        k = self.degrees[axis] * per
        if len(vals) != k:
            raise self.err(es[0].pos, f"{what}: {len(vals)} sizes for {axis}={self.degrees[axis]}"
                                      f"{f' x {per} chunks' if per > 1 else ''}: expected one "
                                      f"size per rank{' and chunk' if per > 1 else ''} of {axis} "
                                      f"(in {self.rule_desc()})")
        if total is not None and sum(vals) != total:
            raise self.err(es[0].pos, f"{what}: sizes sum to {sum(vals)}, expected {total} "
                                      f"(in {self.rule_desc()})")
        return vals


# ----------------------------------------------------------------------------- binding ops
def _bind_shard(op: A.ShardOp, env: _Env, parts: dict):
    dim = env.value(op.dim, "shard dim", 0)
    sizes = env.sizes(op.sizes, op.axis, "shard") if op.sizes else None
    k = env.degrees[op.axis]
    p = parts.get(dim)
    if p is not None and p.sizes is not None:
        if p.groups > 1 and p.groups % k:
            raise env.err(op.pos, f"shard over {op.axis}={k}: {p.groups} interleaved groups of "
                                  f"parts {', '.join(p.names)} do not divide evenly: expected "
                                  f"groups % {op.axis} == 0 (in {env.rule_desc()})")
        if p.groups == 1 and op.split == "even":
            for n, size in zip(p.names, p.sizes):
                if size % k:
                    raise env.err(op.pos, f"shard over {op.axis}={k}, split=even: part {n} of "
                                          f"size {size} is not divisible (in {env.rule_desc()})")
    return O.Shard(dim, op.axis, op.split, sizes)


_BRACED = re.compile(r"\{(\w+)\}")


def _group_name(group: Optional[str], env: _Env) -> Optional[str]:
    """``{name}`` in a group name: a declared name (axis, constant, let) is replaced by its
    value now; a capture is left for the planner (``group="dense.{v}"``: one buffer per
    model chunk)."""
    if group is None:
        return None
    declared = set(env.degrees) | set(env.spec.lets) | set(env.spec.configs)
    return _BRACED.sub(lambda m: str(env.var(A.Var(m.group(1), env.rule.pos)))
                       if m.group(1) in declared else m.group(0), group)


def _bind_flat(op: A.FlatOp, env: _Env, parts: dict):
    bucket = env.value(op.bucket, "flat bucket", 0) if op.bucket is not None else 0
    return O.Flat(op.axis, _group_name(op.group, env), env.value(op.align, "flat align", 1),
                  env.value(op.param_align, "flat param_align", 1), op.partition, bucket,
                  op.order, op.strip)


def _bind_parts(op: A.PartsOp, env: _Env, parts: dict):
    dim = env.value(op.dim, "parts dim", 0)
    groups = env.value(op.groups, "parts groups", 1)
    sizes = tuple(env.value(e, "parts size", 0) for e in op.sizes) if op.sizes else None
    if sizes and groups > 1:
        for n, size in zip(op.names, sizes):
            if size % groups:
                raise env.err(op.pos, f"parts: size {size} of part {n} is not divisible by "
                                      f"groups={groups} (in {env.rule_desc()})")
    if dim in parts:
        raise env.err(op.pos, f"parts: dim {dim} already has parts (in {env.rule_desc()})")
    parts[dim] = O.Parts(dim, op.names, sizes, groups)
    return parts[dim]


_OP_BINDERS = {
    A.ShardOp: _bind_shard,
    A.ReplicateOp: lambda op, env, parts: O.Replicate(op.axis),
    A.AverageOp: lambda op, env, parts: O.Average(op.axis),
    A.FlatOp: _bind_flat,
    A.PadOp: lambda op, env, parts: O.Pad(env.value(op.dim, "pad dim", 0),
                                          env.value(op.multiple, "pad multiple", 1), op.keep),
    A.PartsOp: _bind_parts,
}


def _bind_ops(ops: Sequence, env: _Env) -> tuple:
    parts: dict[int, O.Parts] = {}
    return tuple(_OP_BINDERS[type(op)](op, env, parts) for op in ops)


def _bind_renumber(rn: A.RenumberOp, env: _Env) -> O.Renumber:
    count = env.value(rn.count, f"{rn.kind} count", 0)
    chunks = env.value(rn.chunks, f"{rn.kind} chunks", 1) if rn.chunks is not None else 1
    sizes = env.sizes(rn.sizes, rn.axis, rn.kind, count, chunks) if rn.sizes else None
    k = env.degrees[rn.axis] * chunks
    if rn.split == "even" and count % k:
        raise env.err(rn.pos, f"{rn.kind}: count {count} is not divisible by "
                              f"{rn.axis}={env.degrees[rn.axis]}"
                              f"{f' x chunks={chunks}' if chunks > 1 else ''} (split=even) "
                              f"(in {env.rule_desc()})")
    return O.Renumber(rn.capture, rn.axis, count, rn.split, sizes, chunks, rn.chunk)


def _rule_axes(r: A.ParamRule, spec: Spec) -> tuple[str, ...]:
    """With a second decomposition, the axes of the one the rule uses (by the axes it
    mentions): the other decomposition's axes are not the rule's business."""
    if not spec.decompositions:
        return ()
    used = {getattr(op, "axis", None) for op in tuple(r.ops) + tuple(r.renumber)
            + tuple(op for st in r.states for op in st.ops)}
    used |= {v for k, v in r.attrs if k in ("first", "last")}
    drop: set[str] = set()
    for d in spec.decompositions:
        drop |= set(d.of) if used & set(d.axes) else set(d.axes)
    return tuple(a for a in spec.axes if a not in drop)


def _with_source(env: _Env, pos: Pos) -> Pos:
    return replace(pos, source=env.spec.sources.get(pos.filename))


def _bind_rule(r: A.ParamRule, env: _Env) -> O.BoundRule:
    ops = _bind_ops(r.ops, env)
    active = [st for st in r.states
              if all(_compare(env.eval(w.left), w.op, env.eval(w.right)) for w in st.where)]
    states = tuple((name, _bind_ops(st.ops, env)) for st in active for name in st.states)
    positions = [op.pos for op in r.ops] + [op.pos for st in active for _ in st.states
                                            for op in st.ops]
    renumber = tuple(_bind_renumber(rn, env) for rn in r.renumber)
    local = (r.local or r.pattern).text
    return O.BoundRule(r.pattern.text, local, ops, renumber, str(r.pos), tuple(r.attrs), states,
                       _rule_axes(r, env.spec), tuple(_with_source(env, p) for p in positions),
                       tuple(_with_source(env, rn.pos) for rn in r.renumber))


class BoundSpec:
    """A spec bound to degrees and constants: ``rules`` are ``ucp.plan.ops.BoundRule``s.

    ``degrees`` holds every axis, those of a second decomposition (``axes edp, ep = dp``)
    included; :meth:`coords` completes a rank's coordinates with them.
    """

    def __init__(self, spec: Spec, degrees: dict, constants: dict, compiled: list):
        self.spec = spec
        self.name = spec.name
        self.degrees: dict[str, int] = dict(degrees)
        self.constants = constants
        self._c: list[_Compiled] = compiled
        self.rules: tuple[O.BoundRule, ...] = tuple(c.rule for c in compiled)
        self._env = _Env(spec, self.degrees, constants)

    def __repr__(self) -> str:
        return f"BoundSpec({self.name!r}, degrees={self.degrees}, rules={len(self.rules)})"

    # -- ranks
    def coords(self, coords: Mapping[str, int]) -> dict[str, int]:
        """``coords`` over the primary axes completed with every second decomposition's
        coordinates (the same rank's linear index within the product, row-major)."""
        out = {a: int(coords.get(a, 0)) for a in self.spec.axes}
        for d in self.spec.decompositions:
            index = 0
            for a in d.of:
                index = index * self.degrees[a] + out[a]
            for a in reversed(d.axes):
                index, out[a] = divmod(index, self.degrees[a])
        return out

    def mesh(self) -> list[dict[str, int]]:
        """Every rank's complete coordinates, row-major over the primary axes."""
        from ucp.plan import mesh_coords

        derived = {a for d in self.spec.decompositions for a in d.axes}
        primary = {a: self.degrees[a] for a in self.spec.axes if a not in derived}
        return [self.coords(c) for c in mesh_coords(primary)]

    # -- matching
    def _where_holds(self, c: _Compiled, name: str, shape) -> bool:
        if not c.node.where:
            return True
        self._env.shape = {"name": name}
        if shape is not None:
            shape = tuple(int(x) for x in shape)
            self._env.shape.update(ndim=len(shape), numel=math.prod(shape))
        self._env.rule = c.node
        try:
            return all(_compare(self._env.eval(w.left), w.op, self._env.eval(w.right))
                       for w in c.node.where)
        finally:
            self._env.shape = None

    def _match(self, name: str, shape=None) -> Optional[tuple[_Compiled, Match]]:
        for c in self._c:
            m = c.regex.fullmatch(name)
            if m and self._where_holds(c, name, shape):
                return c, Match(c.rule, groupdict(m), name)
        return None

    def _hit(self, name: str, shape=None) -> tuple[_Compiled, Match]:
        hit = self._match(name, shape)
        if hit is None:
            raise UnmatchedError([name], self.name)
        return hit

    def match(self, name: str, shape=None) -> Optional[Match]:
        """The first rule (in spec order) whose pattern matches ``name`` (and whose ``where``
        conditions hold for ``shape``), or None."""
        hit = self._match(name, shape)
        return hit[1] if hit else None

    def resolve(self, names: Iterable[str], shapes: Optional[Mapping[str, Sequence[int]]] = None
                ) -> dict[str, Match]:
        """Match every name; UnmatchedError lists all names that no rule matches.
        ``shapes[name]`` is needed where a rule has a ``where`` condition."""
        out, missing = {}, []
        for n in names:
            m = self.match(n, shapes.get(n) if shapes else None)
            if m is None:
                missing.append(n)
            else:
                out[n] = m
        if missing:
            raise UnmatchedError(missing, self.name)
        return out

    def check_shape(self, name: str, shape) -> Match:
        """Match ``name`` and check its rule (every state's layout) against the universal
        tensor ``shape``: dims in range, parts sizes (``Parts.part_sizes``)."""
        c, m = self._hit(name, shape)
        nd = len(shape)
        for op, pos in zip(c.rule.ops + tuple(o for _, ops in c.rule.states for o in ops),
                           c.rule.positions):
            dim = getattr(op, "dim", None)
            if dim is not None and dim >= nd:
                raise SpecError(pos, f"{name}: {type(op).__name__.lower()} on dim {dim} of a "
                                     f"{nd}-d tensor {tuple(shape)}: expected dim < {nd}")
            if isinstance(op, O.Parts):
                try:
                    op.part_sizes(int(shape[dim]))
                except ValueError as e:
                    raise SpecError(pos, f"{name}: {e}") from None
        return m

    # -- placement (ucp.plan.placement is the one rule)
    def _placed(self, c: _Compiled, m: Match, fn, *args):
        try:
            return fn(c.rule, *args)
        except PlanError as e:
            node = c.node.renumber[0] if c.node.renumber else c.node
            raise SpecError(node.pos, f"{m.name}: {e}",
                            self.spec.sources.get(node.pos.filename)) from None

    def holds(self, name: str, coords: Optional[Mapping[str, int]] = None, shape=None) -> bool:
        """Whether the rank at ``coords`` holds ``name``: its renumbered indices fall in the
        rank's range, no ``first(axis)`` / ``last(axis)`` attribute excludes the rank, and
        the rule does not ``skip`` it."""
        c, m = self._hit(name, shape)
        if c.rule.skip:
            return False
        return self._placed(c, m, P.place, m.captures, self.degrees, coords or {}) is not None

    def placement(self, name: str, shape=None) -> dict[str, int]:
        """For a renumbered name: {axis: rank} along each renumbering axis that holds it."""
        c, m = self._hit(name, shape)
        return self._placed(c, m, P.placement, m.captures, self.degrees)

    def local_name(self, name: str, coords: Optional[Mapping[str, int]] = None,
                   shape=None) -> Optional[str]:
        """The framework-local name of universal ``name`` on the rank at ``coords``
        ({axis: index}); None when that rank does not hold it (another pipeline stage or
        expert rank). Raises UnmatchedError when no rule matches (``shape``: for rules with
        ``where`` conditions)."""
        return self._local(*self._hit(name, shape), coords)

    def _local(self, c: _Compiled, m: Match, coords) -> Optional[str]:
        local = self._placed(c, m, _place_names, m.captures, self.degrees, coords or {})
        return None if local is None else c.local_pattern.format(local)

    def global_name(self, local: str, coords: Optional[Mapping[str, int]] = None, shape=None
                    ) -> Optional[tuple[str, Match]]:
        """Inverse of ``local_name``: (universal name, Match) for a local name on the rank at
        ``coords``, or None when no rule gives that local name there."""
        for c in self._c:
            m = c.local_regex.fullmatch(local)
            if not m:
                continue
            caps = _unplace_names(c.rule, groupdict(m), self.degrees, coords or {})
            if caps is None:
                continue
            name = c.node.pattern.format(caps)
            hit = self._match(name, shape)
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
                if size is None:
                    if op.sizes is None:
                        raise ValueError(f"{name}: parts {op.names} have equal sizes; give size=")
                    size = sum(op.sizes)
                start, stop = op.part_range(part, size)
                return op.dim, start, stop
        raise KeyError(f"{name}: rule {m.rule.origin} has no part {part!r}")

    # -- planning
    def fragments(self, shapes: Mapping[str, Sequence[int]], coords: Mapping[str, int], *,
                  state: Optional[str] = None, frozen: Iterable[str] = ()):
        """Every fragment (``ucp.plan.Fragment``) the rank at ``coords`` holds of ``state``,
        for the parameters of ``shapes`` (model order), with this spec's local names."""
        from ucp.plan import rank_fragments

        hits = {n: self._hit(n, shape) for n, shape in shapes.items()}
        full = self.coords(coords)
        return rank_fragments({n: m.rule for n, (c, m) in hits.items()}, shapes, self.degrees,
                              full, local_name=lambda n, co: self._local(*hits[n], co),
                              captures=lambda n: hits[n][1].captures, state=state,
                              frozen=frozen)

    def rename(self, name: str):
        return self.spec.rename(name)

    def unrename(self, name: str, part: Optional[str] = None) -> str:
        return self.spec.unrename(name, part)


def _place_names(rule: O.BoundRule, caps, degrees, coords) -> Optional[dict]:
    """Local captures on the rank (``first`` / ``last`` not considered: ``holds`` does)."""
    return P.place(replace(rule, attrs=()), caps, degrees, coords)


def _unplace_names(rule: O.BoundRule, caps: dict, degrees, coords) -> Optional[dict]:
    try:
        return P.unplace(replace(rule, attrs=()), caps, degrees, coords)
    except (PlanError, ValueError, KeyError):
        return None


def _compare(a: int, op: str, b: int) -> bool:
    return {"<": a < b, "<=": a <= b, "==": a == b, "!=": a != b, ">=": a >= b, ">": a > b}[op]


def parse(text: str, filename: str = "<string>") -> Spec:
    """Parse spec source text. Raises SpecError (file:line:col: ...) on any error; warns
    (``SpecWarning``) about rules an earlier rule shadows."""
    spec = Spec(parse_data(text, filename))
    for w in spec.warnings:
        warnings.warn(w, SpecWarning, stacklevel=2)
    return spec


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
            raise UcpError(f"no spec file {s!r}: expected a path or one of the bundled specs ({known})")
        p = found
    return parse(p.read_text(), str(p))
