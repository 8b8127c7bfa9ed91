"""Source plug-in for the *rank-files* layout: one ``torch.save`` file per rank plus a
``layout.json`` naming the spec, degrees and global shapes that produced them.

It is the simplest distributed layout there is — what a hand-rolled TP/ZeRO training loop
writes when every rank saves its local ``{state: {local_name: tensor}}`` — and the example
plug-in of CONTRIBUTING.md: the spec alone (no framework code) says which fragment each
file holds; the engine does the rest. ``ucp.targets.ranks`` writes the same layout.

Rank files are read with ``torch.load(weights_only=True, mmap=True)``: no pickled code runs,
and the tensors are sliced through a memory map; every zip record is first checked against its
CRC-32, which ``torch.load`` never does.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Mapping, TYPE_CHECKING

from ucp.errors import UcpError
from ucp.sources import Source, SourceLayout, SourceParam

if TYPE_CHECKING:
    import torch

LAYOUT_FILE = "layout.json"
META_FILE = "meta.pt"
FORMAT_NAME = "ucp-ranks"


class RanksError(UcpError):
    """A rank-files checkpoint is missing, malformed or disagrees with its spec."""


def rank_file_name(coords: Mapping[str, int]) -> str:
    """``rank-tp0-dp1.pt`` for ``{"tp": 0, "dp": 1}`` (``rank.pt`` for a single rank)."""
    return "rank" + "".join(f"-{a}{i}" for a, i in coords.items()) + ".pt" if coords else "rank.pt"


def read_layout(src) -> dict:
    """The parsed ``layout.json`` of a rank-files checkpoint (errors name the file)."""
    path = Path(src) / LAYOUT_FILE
    if not path.is_file():
        raise RanksError(f"{src}: no {LAYOUT_FILE}; not a rank-files checkpoint")
    try:
        layout = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RanksError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if layout.get("format") != FORMAT_NAME:
        raise RanksError(f"{path}: format is {layout.get('format')!r}, expected {FORMAT_NAME!r}")
    return layout


def load_rank_file(path: Path) -> dict:
    """A rank (or metadata) file, weights-only and memory-mapped; errors name the file."""
    import torch

    from ucp.format.store import readahead
    from ucp.sources.torchfile import TorchFileError, check_records

    if not path.is_file():
        raise RanksError(f"{path}: rank file is missing")
    readahead(path)  # the tensors are sliced through a memory map: read the file ahead of the faults
    try:
        check_records(path)    # torch.load maps the tensors unchecked: a changed byte would convert as read
    except TorchFileError as e:
        raise RanksError(str(e)) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for truncated or hostile files
        first = str(e).splitlines()[0] if str(e) else ""
        raise RanksError(f"{path}: cannot be read as a weights-only torch file ({type(e).__name__}: "
                         f"{first})") from None


class RanksSource(Source):
    """Rank files + ``layout.json``; ``--spec`` overrides the spec recorded in ``layout.json``."""
    name = "ranks"
    description = "one torch.save file per rank + layout.json naming the spec that produced them"
    priority = 10

    def __init__(self, path, *, spec=None, storage_options=None, **options):
        super().__init__(path, spec=spec, storage_options=storage_options, **options)
        self.reject_options()
        self._files: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._mesh_axes: tuple[str, ...] = ()

    @classmethod
    def detect(cls, path) -> bool:
        return (Path(path) / LAYOUT_FILE).is_file()

    def layout(self) -> SourceLayout:
        from ucp.engine import bind_layout, load_spec, parse_spec
        from ucp.format.dtypes import torch_dtype

        layout = read_layout(self.path)
        spec = (load_spec(self.spec) if self.spec is not None
                else parse_spec(layout["spec"], layout.get("spec_name") or f"{LAYOUT_FILE}:spec"))
        shapes = {p["name"]: tuple(p["shape"]) for p in layout["params"]}
        bound = bind_layout(spec, shapes, layout["degrees"], layout.get("constants", {}))
        self._check_files(layout, bound.mesh())
        self._check_rules(bound, shapes)
        kept = [p for p in layout["params"] if not bound.matches[p["name"]].rule.skip]
        shapes = {p["name"]: shapes[p["name"]] for p in kept}
        self._mesh_axes = tuple(a for a in spec.axes if int(bound.degrees.get(a, 1)) > 1)
        frags = bound.fragments_by_param(shapes)
        by_state = {st: bound.fragments_by_param(shapes, st) for st in bound.own_states(list(shapes))}
        params = [SourceParam(name=p["name"], shape=shapes[p["name"]],
                              dtypes={st: torch_dtype(dn) for st, dn in p["dtypes"].items()},
                              fragments=frags[p["name"]], scalars=p.get("scalars") or {},
                              state_fragments={st: f[p["name"]] for st, f in by_state.items() if st in p["dtypes"]},
                              meta=bound.param_meta(p["name"], shapes[p["name"]]))
                  for p in kept]
        metadata = load_rank_file(self.path / layout["metadata_file"]) if layout.get("metadata_file") else {}
        return SourceLayout(params=params, metadata=metadata, spec_name=spec.filename, spec_text=spec.text,
                            degrees=bound.axis_degrees(), constants=bound.constants)

    def _check_files(self, layout: dict, mesh: list) -> None:
        expected = {rank_file_name(c) for c in mesh}
        listed = {r["file"] for r in layout["ranks"]}
        if expected != listed:
            raise RanksError(f"{self.path}: {LAYOUT_FILE} lists rank files {sorted(listed)} but degrees "
                             f"{layout['degrees']} need {sorted(expected)}")

    def _check_rules(self, bound, shapes) -> None:
        """Parameters ``with skip`` are left out on purpose; ``with tied(...)`` aliases are
        refused clearly (the planner gives them no tensor of their own; not supported by the
        rank-files plug-ins yet)."""
        tied = sorted(n for n in shapes if bound.matches[n].rule.tied)
        if tied:
            raise RanksError(f"{self.path}: parameters {', '.join(tied)} have rules `with tied(...)`, which "
                             "the rank-files source does not support yet; convert with a spec without them")

    def file_of(self, fragment) -> str:
        """The rank file that holds ``fragment``."""
        coords = dict(fragment.coords)
        return rank_file_name({a: coords.get(a, 0) for a in self._mesh_axes})

    def describe(self, fragment, state: str) -> str:
        return f"{self.path / self.file_of(fragment)}: {state}/{fragment.local_name} (parameter {fragment.name})"

    def local(self, fragment, state: str):
        fname = self.file_of(fragment)
        with self._lock:
            if fname not in self._files:
                self._files[fname] = load_rank_file(self.path / fname)
            tensors = self._files[fname]
        if state not in tensors or fragment.local_name not in tensors[state]:
            raise RanksError(f"{self.path / fname}: no tensor {state}/{fragment.local_name} "
                             f"(needed for parameter {fragment.name})")
        t = tensors[state][fragment.local_name]
        if tuple(t.shape) != tuple(fragment.local_shape):
            raise RanksError(f"{self.path / fname}: {state}/{fragment.local_name} has shape {tuple(t.shape)}, "
                             f"the spec implies {tuple(fragment.local_shape)} for parameter {fragment.name}")
        return t

    def close(self) -> None:
        self._files.clear()


def load_ranks_full(src) -> dict[str, dict[str, torch.Tensor]]:
    """Assemble rank files back into full tensors ``{state: {name: tensor}}``: coverage checked
    once by the engine's rule, replicas averaged by the one rule (``ucp.plan.assemble``)."""
    from ucp.engine import check_layout
    from ucp.plan import assemble

    source = RanksSource(src)
    try:
        layout = source.layout()
        check_layout(layout)
        out: dict[str, dict[str, torch.Tensor]] = {}
        for p in layout.params:
            for state, dtype in p.dtypes.items():
                frags = p.fragments_of(state)
                items = [(f, source.local(f, state)) for f in frags]
                out.setdefault(state, {})[p.name] = assemble(p.shape, dtype, items, check=False)
        return out
    finally:
        source.close()
