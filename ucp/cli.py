"""The ``ucp`` command.

Each sub-command is a thin shell over the library: parse arguments, call one function,
print a table or JSON, choose the exit code. Errors that ucp raises on purpose
(``UcpError``) are printed as one clear line and exit 2; anything else is a bug and keeps
its traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from ucp.errors import UcpError

EXIT_OK, EXIT_DIFF, EXIT_ERROR = 0, 1, 2


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    out = [line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def _storage_options(args) -> dict | None:
    raw = getattr(args, "storage_options", None)
    if not raw:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise UcpError(f"--storage-options is not valid JSON: {e}") from None


# ---------------------------------------------------------------- inspect
def inspect_summary(ck) -> dict:
    """Everything `ucp inspect` shows, as plain JSON-able data."""
    params = []
    for name in ck.params:
        meta = ck.param_meta(name)
        states = []
        for st in ck.states(name):
            info = ck.array_info(name, st)
            inner = getattr(info, "inner_chunks", None)
            states.append({"state": st, "dtype": str(info.dtype).replace("torch.", ""),
                           "shape": list(info.shape), "chunks": list(info.chunks),
                           **({"inner_chunks": list(inner)} if inner else {}),
                           "nbytes": int(info.nbytes)})
        entry = {"name": name, "states": states}
        for key in ("frozen", "tied_to", "parts", "padding", "rule", "scalars", "fragmentation"):
            if meta.get(key) not in (None, False, [], {}):
                entry[key] = meta[key]
        params.append(entry)
    md = ck.metadata
    return {
        "path": str(ck.path),
        "params": params,
        "num_params": len(params),
        "num_arrays": sum(len(p["states"]) for p in params),
        "nbytes": int(sum(s["nbytes"] for p in params for s in p["states"])),
        "metadata_keys": sorted(md.keys()) if isinstance(md, dict) else [],
    }


def cmd_inspect(args) -> int:
    import ucp

    ck = ucp.open(args.path, storage_options=_storage_options(args))
    s = inspect_summary(ck)
    if args.json:
        print(json.dumps(s, indent=2, default=str))
        return EXIT_OK
    rows = []
    for p in s["params"]:
        flags = []
        if p.get("frozen"):
            flags.append("frozen")
        if p.get("tied_to"):
            flags.append(f"tied->{p['tied_to']}")
        if p.get("parts"):
            flags.append("parts:" + ",".join(x["name"] for x in p["parts"]))
        if p.get("padding"):
            flags.append("padded")
        for i, st in enumerate(p["states"]):
            rows.append([p["name"] if i == 0 else "", st["state"], st["dtype"],
                         "x".join(map(str, st["shape"])) or "scalar",
                         ("x".join(map(str, st["chunks"])) or "-")
                         + (" / " + "x".join(map(str, st["inner_chunks"])) if st.get("inner_chunks") else ""),
                         _fmt_bytes(st["nbytes"]), " ".join(flags) if i == 0 else ""])
    print(_table(rows, ["parameter", "state", "dtype", "shape", "chunks (/ inner)", "size", "notes"]))
    print(f"\n{s['num_params']} parameters, {s['num_arrays']} arrays, {_fmt_bytes(s['nbytes'])}"
          f"; metadata: {', '.join(s['metadata_keys']) or '(none)'}")
    return EXIT_OK


# ---------------------------------------------------------------- verify
def cmd_verify(args) -> int:
    from ucp.format import verify

    problems = verify(args.path, deep=not args.quick, storage_options=_storage_options(args),
                      progress=not args.quiet)
    if args.json:
        print(json.dumps({"path": args.path, "ok": not problems, "problems": problems}, indent=2))
    elif problems:
        for p in problems:
            print(f"FAIL {p}")
        print(f"{args.path}: {len(problems)} problem(s)")
    else:
        print(f"{args.path}: OK ({'every chunk re-read and checksummed' if not args.quick else 'sizes and manifest checked'})")
    return EXIT_OK if not problems else EXIT_DIFF


# ---------------------------------------------------------------- diff
def _blocks(shape, itemsize, budget=64 << 20):
    """Row blocks of a tensor that fit in ``budget`` bytes, so diff never holds a whole tensor."""
    if len(shape) == 0 or shape[0] == 0:
        yield None
        return
    row = max(1, math.prod(shape[1:]) * itemsize)
    step = max(1, budget // row)
    for a in range(0, shape[0], step):
        yield (slice(a, min(a + step, shape[0])),)


def diff_checkpoints(a, b, atol: float = 0.0) -> list[dict]:
    """Per (parameter, state): max absolute difference, or why they cannot be compared."""
    import torch

    rows = []
    names_a, names_b = set(a.params), set(b.params)
    for name in [*a.params, *[n for n in b.params if n not in names_a]]:
        if name not in names_b:
            rows.append({"param": name, "state": "*", "status": "only in A"})
            continue
        if name not in names_a:
            rows.append({"param": name, "state": "*", "status": "only in B"})
            continue
        sa, sb = a.states(name), b.states(name)
        for st in [*sa, *[s for s in sb if s not in sa]]:
            if st not in sb or st not in sa:
                rows.append({"param": name, "state": st, "status": "only in A" if st in sa else "only in B"})
                continue
            ia, ib = a.array_info(name, st), b.array_info(name, st)
            if tuple(ia.shape) != tuple(ib.shape):
                rows.append({"param": name, "state": st, "status": f"shape {list(ia.shape)} vs {list(ib.shape)}"})
                continue
            dtype_note = "" if ia.dtype == ib.dtype else f"dtype {ia.dtype} vs {ib.dtype}"
            maxdiff, nan_mismatch = 0.0, False
            for idx in _blocks(tuple(ia.shape), max(ia.dtype.itemsize, ib.dtype.itemsize)):
                ta, tb = a.read(name, st, index=idx), b.read(name, st, index=idx)
                if ta.dtype.is_floating_point or tb.dtype.is_floating_point:
                    fa, fb = ta.double(), tb.double()
                    na, nb = torch.isnan(fa), torch.isnan(fb)
                    if not torch.equal(na, nb):
                        nan_mismatch = True
                    same_inf = torch.isinf(fa) & torch.isinf(fb) & (fa == fb)
                    d = (fa - fb).abs().masked_fill(na | nb | same_inf, 0.0)
                elif ta.dtype == torch.bool:
                    d = (ta != tb).double()
                else:
                    d = (ta.long() - tb.long()).abs().double()
                if d.numel():
                    maxdiff = max(maxdiff, float(d.max()))
            bad = nan_mismatch or maxdiff > atol or bool(dtype_note)
            status = "differs" if bad else ("equal" if maxdiff == 0 else "close")
            if nan_mismatch:
                status += " (NaN positions differ)"
            if dtype_note:
                status += f" ({dtype_note})"
            rows.append({"param": name, "state": st, "status": status, "max_abs_diff": maxdiff})
    return rows


def metadata_diff(a, b, where="metadata") -> list[str]:
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
        for k in [*a, *[k for k in b if k not in a]]:
            if k not in a or k not in b:
                out.append(f"{where}.{k}")
            else:
                out += metadata_diff(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [where]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in metadata_diff(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if (type(a) is type(b) and a == b) else [where]


def cmd_diff(args) -> int:
    import ucp

    so = _storage_options(args)
    a, b = ucp.open(args.a, storage_options=so), ucp.open(args.b, storage_options=so)
    rows = diff_checkpoints(a, b, atol=args.atol)
    md_diffs = [] if args.ignore_metadata else metadata_diff(a.metadata, b.metadata)
    md_equal = not md_diffs
    bad = [r for r in rows if not r["status"].startswith(("equal", "close"))]
    if args.json:
        print(json.dumps({"equal": not bad and md_equal, "atol": args.atol, "rows": rows,
                          "metadata_equal": md_equal, "metadata_differences": md_diffs}, indent=2))
    else:
        shown = rows if args.all else bad
        if shown:
            print(_table([[r["param"], r["state"], r["status"],
                           f"{r['max_abs_diff']:.3g}" if "max_abs_diff" in r else "-"] for r in shown],
                         ["parameter", "state", "status", "max|a-b|"]))
        worst = max((r.get("max_abs_diff", 0.0) for r in rows), default=0.0)
        print(f"{len(rows)} arrays compared, {len(bad)} differ beyond atol={args.atol:g}; "
              f"max |a-b| = {worst:.3g}; metadata "
              + ("equal" if md_equal else "differs at " + ", ".join(md_diffs[:8])
                 + (f" (+{len(md_diffs) - 8} more)" if len(md_diffs) > 8 else "")))
    return EXIT_OK if not bad and md_equal else EXIT_DIFF


# ---------------------------------------------------------------- convert / export / demo
def cmd_convert(args) -> int:
    import ucp

    from ucp.errors import DestinationNotEmptyError

    if args.resume and args.overwrite:
        raise UcpError("--resume and --overwrite exclude each other")
    try:
        ucp.convert(args.src, args.dst, source=getattr(args, "from"), spec=args.spec,
                    workers=args.workers, resume=args.resume, overwrite=args.overwrite or None,
                    progress=not args.quiet, storage_options=_storage_options(args))
    except DestinationNotEmptyError:
        raise UcpError(f"{args.dst} is not empty: --resume finishes an interrupted conversion into it, "
                       "--overwrite replaces it") from None
    rank, world = _dist_rank()
    if rank == 0:
        print(f"converted {args.src} -> {args.dst}" + (f" ({world} processes)" if world > 1 else ""))
    return EXIT_OK


def _dist_rank() -> tuple[int, int]:
    """(rank, world size) of a torchrun job this command runs in, (0, 1) otherwise."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def cmd_export(args) -> int:
    import ucp

    degrees = {k: v for k, v in (("tp", args.tp), ("pp", args.pp), ("dp", args.dp), ("ep", args.ep)) if v}
    ucp.export(args.src, args.dst, args.to, degrees=degrees, spec=args.spec, zero_stage=args.zero_stage,
               max_shard_size=args.max_shard_size, progress=not args.quiet,
               storage_options=_storage_options(args))
    print(f"exported {args.src} -> {args.dst} ({args.to}, {degrees or 'single rank'})")
    return EXIT_OK


def cmd_demo(args) -> int:
    from ucp.demo import run_demo

    return EXIT_OK if run_demo(args.dir, quiet=args.quiet) else EXIT_DIFF


def _plugin_help(registry: dict) -> str:
    return "; ".join(f"{name} ({cls.description})" if cls.description else name
                     for name, cls in sorted(registry.items()))


def build_parser() -> argparse.ArgumentParser:
    from ucp.sources import sources
    from ucp.targets import targets

    p = argparse.ArgumentParser(prog="ucp", description="Universal, reshardable checkpoints.")
    from ucp import __version__

    p.add_argument("--version", action="version", version=f"ucp {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, json_flag=False):
        sp.add_argument("--storage-options", help="JSON dict passed to fsspec (e.g. endpoint_url)")
        sp.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
        if json_flag:
            sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = sub.add_parser("convert", help="framework checkpoint -> universal checkpoint")
    sp.add_argument("src")
    sp.add_argument("dst")
    sp.add_argument("--from", default="auto", metavar="SOURCE",
                    help="auto (detect from file names) or one of: " + _plugin_help(sources()))
    sp.add_argument("--spec", help="a converters/*.ucp name or a spec file")
    sp.add_argument("--workers", type=int, default=None)
    sp.add_argument("--resume", action="store_true", help="finish an interrupted conversion into DST")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    common(sp)
    sp.set_defaults(fn=cmd_convert)

    sp = sub.add_parser("export", help="universal checkpoint -> framework layout at any parallelism")
    sp.add_argument("src")
    sp.add_argument("dst")
    sp.add_argument("--to", required=True, metavar="TARGET",
                    help="one of: " + _plugin_help(targets()))
    for ax, what in (("tp", "tensor"), ("pp", "pipeline"), ("dp", "data"), ("ep", "expert")):
        sp.add_argument(f"--{ax}", type=int, default=None, help=f"{what}-parallel degree to write")
    sp.add_argument("--zero-stage", type=int, default=None, help="ZeRO stage to write (targets that take it)")
    sp.add_argument("--max-shard-size", default=None, help="largest file to write, e.g. 5GB (targets that take it)")
    sp.add_argument("--spec", help="a converters/*.ucp name or a spec file (targets that take one)")
    common(sp)
    sp.set_defaults(fn=cmd_export)

    sp = sub.add_parser("inspect", help="list parameters, states, dtypes, shapes, chunks")
    sp.add_argument("path")
    common(sp, json_flag=True)
    sp.set_defaults(fn=cmd_inspect)

    sp = sub.add_parser("verify", help="check the manifest and every chunk; exit 1 on any problem")
    sp.add_argument("path")
    sp.add_argument("--quick", action="store_true", help="check presence and sizes only, no re-read")
    common(sp, json_flag=True)
    sp.set_defaults(fn=cmd_verify)

    sp = sub.add_parser("diff", help="per-parameter max abs difference; exit 1 beyond --atol")
    sp.add_argument("a")
    sp.add_argument("b")
    sp.add_argument("--atol", type=float, default=0.0)
    sp.add_argument("--all", action="store_true", help="show equal arrays too")
    sp.add_argument("--ignore-metadata", action="store_true")
    common(sp, json_flag=True)
    sp.set_defaults(fn=cmd_diff)

    sp = sub.add_parser("demo", help="end to end on a small embedded model")
    sp.add_argument("dir", nargs="?", default=None)
    common(sp)
    sp.set_defaults(fn=cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.fn(args)
    except UcpError as e:
        rank, world = _dist_rank()
        if rank == 0:  # under torchrun every rank raises the same error: say it once
            print(f"ucp {args.cmd}: error: {e}", file=sys.stderr)
        rc = EXIT_ERROR
    except BrokenPipeError:
        rc = EXIT_OK
    if _dist_rank()[1] > 1:
        # torchrun job: leave together, and skip interpreter teardown (gloo aborts there now and then)
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
