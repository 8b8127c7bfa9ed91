"""The ucp specification language: Lark (LALR) parse -> typed AST -> bound rules.

    spec = parse(text, filename="<string>")      # or load("megatron_gpt") / load(path)
    bound = spec.bind(degrees={"tp": 2}, constants={"heads": 8})
    bound.resolve(names)                          # {name: Match}; UnmatchedError lists all misses

spec/LANGUAGE.md is the normative description; ucp/grammar/ucp.lark is the grammar.
"""
from ucp.lang.errors import Pos, SpecError, SpecWarning, UnmatchedError
from ucp.lang.parser import CONVERTERS, GRAMMAR
from ucp.lang.spec import BoundSpec, Match, Spec, load, parse, split_sizes

__all__ = ["parse", "load", "Spec", "BoundSpec", "Match", "SpecError", "SpecWarning", "UnmatchedError", "Pos",
           "split_sizes", "CONVERTERS", "GRAMMAR"]
