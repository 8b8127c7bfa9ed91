"""Looking at universal checkpoints: what ``ucp inspect`` and ``ucp diff`` report, as plain
JSON-able data (the CLI only parses arguments and prints).

Comparisons stream: a tensor is read in row blocks of bounded size, so diffing two
checkpoints never holds a whole large tensor, let alone a model.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Optional

#: per-parameter metadata keys that ``inspect`` shows when set
SHOWN_META = ("frozen", "tied_to", "parts", "padding", "rule", "scalars", "fragmentation")
#: bytes of one block of a tensor compared at a time
DIFF_BLOCK_BYTES = 64 << 20


def _state_summary(ck, name: str, state: str) -> dict:
    from ucp.format.dtypes import dtype_name

    info = ck.array_info(name, state)
    inner = getattr(info, "inner_chunks", None)
    return {"state": state, "dtype": dtype_name(info.dtype), "shape": list(info.shape),
            "chunks": list(info.chunks), **({"inner_chunks": list(inner)} if inner else {}),
            "nbytes": int(info.nbytes)}


def inspect_summary(ck) -> dict:
    """Everything ``ucp inspect`` shows about the open checkpoint ``ck``: per parameter its
    states (dtype, shape, chunks, bytes) and the metadata in :data:`SHOWN_META`; totals; the
    keys of the non-tensor metadata."""
    params = []
    for name in ck.params:
        meta = ck.param_meta(name)
        entry = {"name": name, "states": [_state_summary(ck, name, st) for st in ck.states(name)]}
        entry.update({k: meta[k] for k in SHOWN_META if meta.get(k) not in (None, False, [], {})})
        if not entry["states"]:   # an alias stored once: its shape and dtype are in its metadata only
            entry.update({k: meta[k] for k in ("shape", "dtype") if k in meta})
        params.append(entry)
    md = ck.metadata
    return {"path": str(ck.path), "params": params, "num_params": len(params),
            "num_arrays": sum(len(p["states"]) for p in params),
            "nbytes": int(sum(s["nbytes"] for p in params for s in p["states"])),
            "metadata_keys": sorted(md.keys()) if isinstance(md, dict) else []}


def row_blocks(shape, itemsize: int, budget: int = DIFF_BLOCK_BYTES) -> Iterator[Optional[tuple]]:
    """Indexes of row blocks of a tensor that fit in ``budget`` bytes (None: the whole of a
    0-d or empty tensor)."""
    if len(shape) == 0 or shape[0] == 0:
        yield None
        return
    row = max(1, math.prod(shape[1:]) * itemsize)
    step = max(1, budget // row)
    for a in range(0, shape[0], step):
        yield (slice(a, min(a + step, shape[0])),)


def _block_diff(ta, tb) -> tuple[float, bool]:
    """(max |a - b| over the block, whether NaN positions differ); equal infinities and NaN
    against NaN count as no difference; complex numbers differ by their parts'."""
    import torch

    if ta.dtype.is_complex or tb.dtype.is_complex:   # real and imaginary parts as floats (.long() drops both)
        ta, tb = (torch.view_as_real(t) if t.dtype.is_complex else t for t in (ta, tb))
    if ta.dtype.is_floating_point or tb.dtype.is_floating_point:
        fa, fb = ta.double(), tb.double()
        na, nb = torch.isnan(fa), torch.isnan(fb)
        same_inf = torch.isinf(fa) & torch.isinf(fb) & (fa == fb)
        d = (fa - fb).abs().masked_fill(na | nb | same_inf, 0.0)
        nan_mismatch = not torch.equal(na, nb)
    elif ta.dtype == torch.bool:
        d, nan_mismatch = (ta != tb).double(), False
    else:
        d, nan_mismatch = (ta.long() - tb.long()).abs().double(), False
    return (float(d.max()) if d.numel() else 0.0), nan_mismatch


def compare_array(a, b, name: str, state: str, atol: float = 0.0) -> dict:
    """One row of ``ucp diff``: ``status`` (equal, close, differs, or why the arrays cannot be
    compared), ``max_abs_diff`` and ``ok`` (within ``atol``, same dtype, same NaN positions)."""
    ia, ib = a.array_info(name, state), b.array_info(name, state)
    if tuple(ia.shape) != tuple(ib.shape):
        return {"param": name, "state": state, "status": f"shape {list(ia.shape)} vs {list(ib.shape)}",
                "ok": False}
    maxdiff, nan_mismatch = 0.0, False
    for idx in row_blocks(tuple(ia.shape), max(ia.dtype.itemsize, ib.dtype.itemsize)):
        d, nans = _block_diff(a.read(name, state, index=idx), b.read(name, state, index=idx))
        maxdiff, nan_mismatch = max(maxdiff, d), nan_mismatch or nans
    ok = not nan_mismatch and maxdiff <= atol and ia.dtype == ib.dtype
    status = "differs" if not ok else ("equal" if maxdiff == 0 else "close")
    if nan_mismatch:
        status += " (NaN positions differ)"
    if ia.dtype != ib.dtype:
        status += f" (dtype {ia.dtype} vs {ib.dtype})"
    return {"param": name, "state": state, "status": status, "max_abs_diff": maxdiff, "ok": ok}


def _union(first, second) -> list:
    seen = set(first)
    return [*first, *[x for x in second if x not in seen]]


def diff_checkpoints(a, b, atol: float = 0.0) -> list[dict]:
    """Per (parameter, state) of either checkpoint, in A's order then B's extras: a row of
    :func:`compare_array`, or ``only in A`` / ``only in B``."""
    rows = []
    names_a, names_b = set(a.params), set(b.params)
    for name in _union(a.params, b.params):
        if name not in names_a or name not in names_b:
            rows.append({"param": name, "state": "*", "status": "only in A" if name in names_a else "only in B",
                         "ok": False})
            continue
        sa, sb = a.states(name), b.states(name)
        for st in _union(sa, sb):
            if st not in sa or st not in sb:
                rows.append({"param": name, "state": st, "status": "only in A" if st in sa else "only in B",
                             "ok": False})
            else:
                rows.append(compare_array(a, b, name, st, atol))
    return rows


def metadata_diff(a: Any, b: Any, where: str = "metadata") -> list[str]:
    """Paths at which two decoded metadata trees differ (tensors bit-exact, NaN equal to NaN)."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape
                and torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                                b.contiguous().reshape(-1).view(torch.uint8)))
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in _union(a, b):
            out += metadata_diff(a[k], b[k], f"{where}.{k}") if k in a and k in b else [f"{where}.{k}"]
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [where]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in metadata_diff(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if (type(a) is type(b) and a == b) else [where]


def diff_report(a, b, atol: float = 0.0, metadata: bool = True) -> dict:
    """Everything ``ucp diff`` reports: ``rows`` (:func:`diff_checkpoints`), the metadata
    differences (none when ``metadata`` is False) and ``equal``, the verdict."""
    rows = diff_checkpoints(a, b, atol)
    md_diffs = metadata_diff(a.metadata, b.metadata) if metadata else []
    return {"equal": all(r["ok"] for r in rows) and not md_diffs, "atol": atol, "rows": rows,
            "metadata_equal": not md_diffs, "metadata_differences": md_diffs}
