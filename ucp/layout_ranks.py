"""The *rank-files* layout: one ``torch.save`` file per rank plus a ``layout.json`` that says
which spec, degrees and global shapes produced them.

It is the simplest distributed layout there is — what a hand-rolled TP/ZeRO training loop
writes when every rank saves its local ``{state: {local_name: tensor}}`` — and the layout
through which a spec alone (no framework code) drives both directions: ``ucp convert
--from ranks`` and ``ucp export --to ranks --tp N --dp M``. Framework sources (DeepSpeed,
DCP, Megatron) reuse the same planning; only their file readers differ.

Rank files are read with ``torch.load(weights_only=True, mmap=True)``: no pickled code
runs, and a rank's file is paged in only where its fragments are read.
"""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from ucp.errors import UcpError
from ucp.format.store import readahead
from ucp.loading import fill_locals, fragments_for

LAYOUT_FILE = "layout.json"
#: Per-parameter metadata lists each rank's boxes up to this many fragments; beyond it the
#: spec (kept in the checkpoint's metadata) and the degrees reproduce them through the planner,
#: so a 512-way run does not put 512 entries per parameter into the manifest.
MAX_LISTED_FRAGMENTS = 64
META_FILE = "meta.pt"
FORMAT_NAME = "ucp-ranks"


class RanksError(UcpError):
    pass


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise RanksError(f"unknown dtype {name!r}")
    return dt


def all_coords(axes: list[str], degrees: dict[str, int]) -> list[dict[str, int]]:
    """Every rank of a mesh, in row-major order of the axes as the spec declares them."""
    axes = [a for a in axes if degrees.get(a, 1) > 1] or []
    ranges = [range(degrees.get(a, 1)) for a in axes]
    return [dict(zip(axes, c)) for c in itertools.product(*ranges)]


def rank_file_name(coords: dict[str, int]) -> str:
    return "rank" + "".join(f"-{a}{i}" for a, i in coords.items()) + ".pt" if coords else "rank.pt"


def bind_spec(spec_text: str, spec_name: str, degrees: dict, constants: dict, names: list[str]):
    """Parse and bind a spec, and match every parameter (an error lists every unmatched one)."""
    from ucp.lang import parse

    spec = parse(spec_text, filename=spec_name)
    bound = spec.bind(degrees=degrees, constants=constants)
    matches = bound.resolve(names)
    return spec, bound, matches


def resolve_spec_text(spec: str | None, fallback_text: str | None,
                      fallback_name: str | None = None) -> tuple[str, str]:
    """(text, name) of a spec given as a file path, a converters/ name, or embedded text."""
    if spec is None:
        if fallback_text is None:
            raise RanksError("no spec given and none embedded in layout.json")
        return fallback_text, fallback_name or f"{LAYOUT_FILE}:spec"
    p = Path(spec)
    if p.is_file():
        return p.read_text(), str(p)
    from ucp.lang import load

    s = load(spec)
    return s.text, s.filename


# ------------------------------------------------------------------ writing rank files
def save_ranks(states: dict[str, dict[str, torch.Tensor]], dst: str | os.PathLike, *,
               spec_text: str, spec_name: str = "<spec>", degrees: dict[str, int],
               constants: dict[str, int] | None = None,
               scalars: dict[str, dict[str, Any]] | None = None,
               metadata: dict | None = None,
               read: Callable[[str, str, Any, Any], torch.Tensor] | None = None,
               dtypes: dict[str, dict[str, str]] | None = None,
               shapes: dict[str, tuple] | None = None, progress: bool = False,
               direct_read: Callable | None = None) -> Path:
    """Write every rank's local tensors for ``degrees`` (what each rank of a run would save).

    ``states`` holds full tensors ``{state: {name: tensor}}``; alternatively ``read(name,
    state, start, stop)`` supplies boxes (used by export from a universal checkpoint, so no
    full tensor is ever materialised) together with ``shapes`` and ``dtypes``.
    """
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise RanksError(f"{dst}: destination is not empty")
    constants = dict(constants or {})
    if shapes is None:
        shapes = {n: tuple(t.shape) for n, t in states["param"].items()}
    names = list(shapes)
    if dtypes is None:
        dtypes = {n: {st: _dtype_name(states[st][n].dtype) for st in states if n in states[st]}
                  for n in names}
    spec, bound, matches = bind_spec(spec_text, spec_name, degrees, constants, names)
    dst.mkdir(parents=True, exist_ok=True)
    if read is None:
        def read(name, state, start, stop):
            return states[state][name][tuple(slice(a, b) for a, b in zip(start, stop))]

    state_names = sorted({st for d in dtypes.values() for st in d}, key=lambda s: (s != "param", s))
    ranks = []
    from ucp.progress import bar

    mesh = all_coords(list(spec.axes), degrees)
    with bar(total=len(mesh), desc="export ranks", unit="rank", enabled=None if progress else False) as pb:
        for coords in mesh:
            pb.update(1)
            frags = fragments_for(bound, matches, shapes, degrees, coords)
            got = fill_locals(frags, lambda n: {st: _dtype(dn) for st, dn in dtypes[n].items()},
                              read, direct_read)
            out = {st: got.get(st, {}) for st in state_names}  # every state, "param" first
            fname = rank_file_name(coords)
            torch.save(out, dst / fname)
            ranks.append({"coords": coords, "file": fname})
    layout = {
        "format": FORMAT_NAME, "version": 1, "spec_name": spec_name, "spec": spec_text,
        "degrees": {a: int(degrees.get(a, 1)) for a in spec.axes}, "constants": constants,
        "params": [{"name": n, "shape": list(shapes[n]), "dtypes": dtypes[n],
                    **({"scalars": scalars[n]} if scalars and n in scalars else {})} for n in names],
        "ranks": ranks,
    }
    if metadata:
        # Non-tensor state may hold tensors (RNG states): a weights-only torch file, not JSON.
        torch.save(metadata, dst / META_FILE)
        layout["metadata_file"] = META_FILE
    tmp = dst / (LAYOUT_FILE + ".tmp")
    tmp.write_text(json.dumps(layout, indent=1))
    os.replace(tmp, dst / LAYOUT_FILE)
    return dst


# ------------------------------------------------------------------ reading rank files
def read_layout(src: str | os.PathLike) -> dict:
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
    if not path.is_file():
        raise RanksError(f"{path}: rank file is missing")
    readahead(path)  # the tensors are sliced through a memory map: read the file ahead of the faults
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for truncated or hostile files
        raise RanksError(f"{path}: cannot be read as a weights-only torch file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None


def convert_ranks(src, dst, *, spec=None, progress=False, storage_options=None,
                  overwrite=False, workers=None, resume=False) -> None:
    """Rank files + their spec -> a committed universal checkpoint.

    ``resume`` continues an interrupted conversion into the same ``dst``: chunks that the
    earlier run wrote completely (size and crc32c check out) are kept and not rewritten.
    """
    from ucp.format import create_checkpoint

    src = Path(src)
    layout = read_layout(src)
    spec_text, spec_name = resolve_spec_text(spec, layout.get("spec"), layout.get("spec_name"))
    degrees, constants = layout["degrees"], layout.get("constants", {})
    params = layout["params"]
    shapes = {p["name"]: tuple(p["shape"]) for p in params}
    spec_obj, bound, matches = bind_spec(spec_text, spec_name, degrees, constants, list(shapes))

    expected = {rank_file_name(c) for c in all_coords(list(spec_obj.axes), degrees)}
    listed = {r["file"] for r in layout["ranks"]}
    if expected != listed:
        raise RanksError(f"{src}: layout.json lists rank files {sorted(listed)} but degrees {degrees} "
                         f"need {sorted(expected)}")
    files = {}
    per_param: dict[str, list] = {n: [] for n in shapes}
    for r in layout["ranks"]:
        coords = r["coords"]
        for f in fragments_for(bound, matches, shapes, degrees, coords):
            per_param[f.name].append((f, r["file"]))

    def local(fname, state, local_name, f):
        if fname not in files:
            files[fname] = load_rank_file(src / fname)
        d = files[fname]
        if state not in d or local_name not in d[state]:
            raise RanksError(f"{src / fname}: no tensor {state}/{local_name} (needed for parameter {f.name})")
        t = d[state][local_name]
        if tuple(t.shape) != tuple(f.local_shape):
            raise RanksError(f"{src / fname}: {state}/{local_name} has shape {tuple(t.shape)}, the spec "
                             f"({f.name}, degrees {degrees}) implies {tuple(f.local_shape)}")
        return t

    sizes = {p["name"]: int(torch.Size(shapes[p["name"]]).numel()) * len(p["dtypes"]) for p in params}
    wopts = {"workers": workers} if workers else {}
    job = torchrun_rank()
    if job is None:
        mine = set(sizes)
        w = create_checkpoint(dst, overwrite=overwrite, storage_options=storage_options, resume=resume,
                              **wopts)
    else:  # one process of a torchrun job: convert a share of the parameters, commit together
        from ucp.format import create_distributed
        from ucp.plan.assign import assign_by_size

        mine = set(assign_by_size(sizes, job[1])[job[0]])
        w = create_distributed(dst, storage_options=storage_options, resume=resume, **wopts)
    failure = None
    try:
        _convert_params(w, [p for p in params if p["name"] in mine], shapes, per_param, matches,
                        spec_name, degrees, local, progress, sum(sizes[n] for n in mine))
    except Exception as e:
        if job is None:
            w.abort()
            raise
        failure = f"{type(e).__name__}: {e}"
    extra = load_rank_file(src / layout["metadata_file"]) if layout.get("metadata_file") else {}
    md = {"source": {"format": FORMAT_NAME, "path": str(src), "degrees": degrees, "spec": spec_name,
                     "spec_text": spec_text, "constants": constants}, **extra}
    if job is None:
        w.set_metadata(md)
        w.commit()
    else:
        from ucp.format import commit_distributed

        commit_distributed(w, metadata=md, failure=failure, param_order=list(shapes))


def torchrun_rank() -> tuple[int, int] | None:
    """(rank, world size) when this process is one of several started by torchrun, else None.
    The process group is created here (gloo: conversion moves bytes between files, not GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "MASTER_ADDR" not in os.environ:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def _convert_params(w, params, shapes, per_param, matches, spec_name, degrees, local, progress, total):
    from ucp.plan import check_coverage, dedupe
    from ucp.plan.meta import rule_metadata
    from ucp.progress import bar

    with bar(total=total, desc="convert", unit="el", enabled=None if progress else False) as pb:
        for p in params:
            name, shape = p["name"], shapes[p["name"]]
            frs = [f for f, _ in per_param[name]]
            check_coverage(name, shape, frs)
            m = matches[name]
            held = [f for f in frs if f.pieces]
            frag = {"layout": FORMAT_NAME, "spec": spec_name, "degrees": degrees,
                    "rule": m.rule.origin, "fragments": len(held)}
            if len(held) <= MAX_LISTED_FRAGMENTS:
                frag["ranks"] = [{"coords": dict(f.coords), "local": f.local_name,
                                  "local_shape": list(f.local_shape),
                                  "pieces": [[list(pc.src.start), list(pc.src.stop), list(pc.dst.start),
                                              list(pc.dst.stop)] for pc in f.pieces]}
                                 for f in held]
            meta = {"rule": m.rule.origin, "fragmentation": frag}
            meta.update(rule_metadata(m.rule, shape))
            if p.get("scalars"):
                meta["scalars"] = p["scalars"]
            w.add_param(name, meta=meta)
            fname_of = {id(f): fn for f, fn in per_param[name]}
            groups = dedupe(frs)
            for st, dtn in p["dtypes"].items():
                a = w.add_array(name, st, shape, _dtype(dtn))
                for reps in groups:  # [(fragment, weight)]: one entry, or the replicas to average
                    f0 = reps[0][0]
                    for i, pc in enumerate(f0.pieces):
                        acc = None
                        for f, wgt in reps:
                            t = local(fname_of[id(f)], st, f.local_name, f)
                            pcf = f.pieces[i]
                            v = t[pcf.dst.slices()].reshape(pc.src.shape)
                            acc = v if len(reps) == 1 else (v.double() * wgt if acc is None else acc + v.double() * wgt)
                        if len(reps) > 1:
                            acc = acc.to(_dtype(dtn))
                        a.write(tuple(pc.src.start), acc)
                pb.update(int(torch.Size(shape).numel()) * len(p["dtypes"]))


def export_ranks(src, dst, *, degrees: dict, spec=None, constants=None, progress=False,
                 storage_options=None) -> Path:
    """A universal checkpoint -> rank files for ``degrees``, reading only each rank's boxes."""
    import ucp

    ck = ucp.open(src, storage_options=storage_options)
    md = ck.metadata if isinstance(ck.metadata, dict) else {}
    src_layout = md.get("source", {})
    if spec is None and not src_layout.get("spec_text"):
        raise RanksError(f"{src}: no --spec given and the checkpoint records none")
    spec_text, spec_name = (resolve_spec_text(spec, None) if spec is not None
                            else (src_layout["spec_text"], src_layout.get("spec", "<recorded spec>")))
    shapes = {n: tuple(ck.array_info(n, "param").shape) for n in ck.params}
    dtypes = {n: {st: _dtype_name(ck.array_info(n, st).dtype) for st in ck.states(n)} for n in ck.params}
    scalars = {n: ck.param_meta(n)["scalars"] for n in ck.params if ck.param_meta(n).get("scalars")}
    if constants is None:
        constants = src_layout.get("constants", {})

    def read(name, state, start, stop):
        return ck.read_box(name, state, tuple(start), tuple(stop))

    def direct_read(name, state, start, stop, out):
        ck.read_box(name, state, tuple(start), tuple(stop), out=out)

    meta = {k: v for k, v in md.items() if k != "source"}
    return save_ranks({}, dst, spec_text=spec_text, spec_name=spec_name, degrees=degrees,
                      constants=constants, scalars=scalars, metadata=meta, read=read,
                      dtypes=dtypes, shapes=shapes, progress=progress, direct_read=direct_read)


def load_ranks_full(src) -> dict[str, dict[str, torch.Tensor]]:
    """Assemble rank files back into full tensors ``{state: {name: tensor}}`` (checks coverage)."""
    from ucp.plan import check_coverage

    src = Path(src)
    layout = read_layout(src)
    degrees, constants = layout["degrees"], layout.get("constants", {})
    shapes = {p["name"]: tuple(p["shape"]) for p in layout["params"]}
    _, bound, matches = bind_spec(layout["spec"], layout["spec_name"], degrees, constants, list(shapes))
    out: dict[str, dict[str, torch.Tensor]] = {}
    seen: dict[str, list] = {n: [] for n in shapes}
    by_name = {p["name"]: p for p in layout["params"]}
    for r in layout["ranks"]:
        d = load_rank_file(src / r["file"])
        for f in fragments_for(bound, matches, shapes, degrees, r["coords"]):
            seen[f.name].append(f)
            for st, dtn in by_name[f.name]["dtypes"].items():
                full = out.setdefault(st, {}).get(f.name)
                if full is None:
                    full = out[st][f.name] = torch.zeros(shapes[f.name], dtype=_dtype(dtn))
                t = d[st][f.local_name]
                for pc in f.pieces:
                    full[pc.src.slices()] = t[pc.dst.slices()].reshape(pc.src.shape)
    for n, frs in seen.items():
        check_coverage(n, shapes[n], frs)
    return out
