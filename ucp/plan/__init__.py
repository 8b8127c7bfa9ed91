"""Pure planning, no I/O: fragments, layouts, intersections, coverage checks.

``ucp.plan.ops`` is the frozen contract with the language; the rest is functions over
shapes, boxes and flat ranges (plus in-memory ``split`` / ``assemble`` over torch tensors):
``prepare`` (one function per op), ``flat`` (flat partitions, groups, buckets),
``placement`` (the one placement rule for layers and experts), ``model`` (Piece, Fragment,
Read), ``fragments`` (per-rank planning, per state; coverage; resharding reads),
``replicas`` (the one averaging rule), ``meta`` (per-parameter metadata of a rule).
"""
from ucp.plan.boxes import (Box, box_flat_range, chunks_intersecting, contiguous_runs, flat_to_boxes,
                            ravel, split_range, split_sizes, union_numel, unravel)
from ucp.plan.errors import CoverageError, PlanError, PlanSpecError, Pos, SpecError
from ucp.plan.fragments import (Fragment, Piece, Read, apply_reads, assemble, check_coverage, dedupe,
                                fragment, layout_fragments, match_captures, mesh_coords, owner,
                                pieces_within, plan_reads, plan_universal_reads, rank_fragments, read_cost,
                                representatives, split, split_group, state_fragments)
from ucp.plan.placement import Location, ends_admit, locate, place, unplace
from ucp.plan.ops import (ORDERS, PARTITIONS, SPLITS, Average, BoundRule, Flat, Pad, Parts, Renumber,
                          Replicate, Shard, TensorOp)

__all__ = [
    "Box", "box_flat_range", "chunks_intersecting", "contiguous_runs", "flat_to_boxes", "ravel",
    "split_range", "split_sizes", "union_numel", "unravel",
    "CoverageError", "PlanError", "PlanSpecError", "Pos", "SpecError",
    "Fragment", "Piece", "Read", "apply_reads", "assemble", "check_coverage", "dedupe", "fragment",
    "layout_fragments", "match_captures", "mesh_coords", "owner", "pieces_within", "plan_reads",
    "plan_universal_reads", "rank_fragments", "read_cost", "representatives", "split",
    "split_group", "state_fragments",
    "Location", "ends_admit", "locate", "place", "unplace",
    "ORDERS", "PARTITIONS", "SPLITS", "Average", "BoundRule", "Flat", "Pad", "Parts", "Renumber", "Replicate", "Shard",
    "TensorOp",
]
