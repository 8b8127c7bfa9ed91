"""The typed AST of a spec. Expressions stay unevaluated until ``Spec.bind``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from ucp.lang.errors import Pos
from ucp.lang.pattern import Pattern


# ----------------------------------------------------------------------------- expressions
@dataclass(frozen=True)
class Num:
    value: int
    pos: Pos


@dataclass(frozen=True)
class Var:
    name: str
    pos: Pos


@dataclass(frozen=True)
class BinOp:
    op: str            # "+", "-", "*", "//", "%"
    left: "Expr"
    right: "Expr"
    pos: Pos


@dataclass(frozen=True)
class Neg:
    operand: "Expr"
    pos: Pos


@dataclass(frozen=True)
class Func:
    name: str          # "ceil_div", "min", "max"
    args: tuple["Expr", ...]
    pos: Pos


Expr = Union[Num, Var, BinOp, Neg, Func]

FUNCTIONS = {"ceil_div": (2, 2), "min": (1, None), "max": (1, None), "gcd": (1, None),
             "lcm": (1, None)}

#: Variables a ``where`` condition may use besides the spec's names: facts of the tensor.
SHAPE_VARIABLES = ("ndim", "numel")


@dataclass(frozen=True)
class Cond:
    """``left OP right`` of a ``where`` clause (OP: ``< <= == != >= >``)."""
    left: "Expr"
    op: str
    right: "Expr"
    pos: Pos


def variables(e: Expr) -> list[Var]:
    """Every variable reference inside an expression, left to right."""
    if isinstance(e, Var):
        return [e]
    if isinstance(e, BinOp):
        return variables(e.left) + variables(e.right)
    if isinstance(e, Neg):
        return variables(e.operand)
    if isinstance(e, Func):
        return [v for a in e.args for v in variables(a)]
    return []


# ----------------------------------------------------------------------------- declarations
@dataclass(frozen=True)
class ConfigDecl:
    name: str
    default: Optional[Expr]
    pos: Pos


@dataclass(frozen=True)
class Decomposition:
    """``axes edp, ep, etp = dp, tp``: the ranks of the product of ``of`` (row-major, the
    last axis fastest) are also indexed by ``axes`` (row-major, the last axis fastest)."""
    axes: tuple[str, ...]
    of: tuple[str, ...]
    pos: Pos


@dataclass(frozen=True)
class LetDecl:
    name: str
    expr: Expr
    pos: Pos


# ----------------------------------------------------------------------------- layout ops
@dataclass(frozen=True)
class ShardOp:
    dim: Expr
    axis: str
    split: str
    sizes: Optional[tuple[Expr, ...]]
    pos: Pos


@dataclass(frozen=True)
class ReplicateOp:
    axis: str
    pos: Pos


@dataclass(frozen=True)
class AverageOp:
    axis: str
    pos: Pos


@dataclass(frozen=True)
class FlatOp:
    axis: str
    group: Optional[str]
    align: Expr
    param_align: Expr
    pos: Pos
    partition: str = "buffer"
    bucket: Optional[Expr] = None
    order: str = "model"
    strip: bool = False


@dataclass(frozen=True)
class PadOp:
    dim: Expr
    multiple: Expr
    pos: Pos
    keep: bool = False


@dataclass(frozen=True)
class PartsOp:
    dim: Expr
    names: tuple[str, ...]
    sizes: Optional[tuple[Expr, ...]]
    groups: Expr
    pos: Pos


@dataclass(frozen=True)
class RenumberOp:
    """``layers(i, over=pp, count=layers)`` / ``experts(e, over=ep, count=experts)``."""
    kind: str          # "layers" | "experts" | "renumber": the op name as written
    capture: str
    axis: str
    count: Expr
    split: str
    sizes: Optional[tuple[Expr, ...]]
    pos: Pos
    chunks: Optional[Expr] = None     # virtual pipeline stages per rank
    chunk: Optional[str] = None       # the local capture that receives the model chunk


TensorOpNode = Union[ShardOp, ReplicateOp, AverageOp, FlatOp, PadOp, PartsOp]


# ----------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class StateLayout:
    """``state exp_avg, exp_avg_sq = PIPELINE``: these states' own layout."""
    states: tuple[str, ...]
    ops: tuple[TensorOpNode, ...]
    pos: Pos
    where: tuple[Cond, ...] = ()   # conditions on constants and degrees (bind time)


@dataclass(frozen=True)
class ParamRule:
    pattern: Pattern              # universal name
    local: Optional[Pattern]      # framework-local name; None: same as pattern
    ops: tuple[TensorOpNode, ...]
    renumber: tuple[RenumberOp, ...]
    attrs: tuple[tuple[str, object], ...]
    pos: Pos                      # of the ``param`` keyword
    where: tuple[Cond, ...] = ()  # conditions on the tensor's shape, all must hold
    states: tuple[StateLayout, ...] = ()


@dataclass(frozen=True)
class RenameRule:
    """``rename "TARGET" from "SOURCE" [part NAME]``: the tensor named TARGET is SOURCE
    (or part NAME of SOURCE's fused dimension)."""
    target: Pattern
    source: Pattern
    part: Optional[str]
    pos: Pos
