"""The ``ucp`` command.

Each sub-command is a thin shell over the library: parse arguments, call one function,
print a table or JSON, choose the exit code. Errors that ucp raises on purpose
(``UcpError``) are printed as one clear line and exit 2; anything else is a bug and keeps
its traceback.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys

from ucp import errors
from ucp.errors import UcpError

EXIT_OK, EXIT_DIFF, EXIT_ERROR = 0, 1, 2
EXIT_INTERRUPTED = 130      # as a shell reports a command ended by Ctrl-C


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
def cmd_inspect(args) -> int:
    """`ucp inspect`: a table (or JSON) of parameters, states and chunks."""
    import ucp

    from ucp.format.compare import inspect_summary

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
        if not p["states"]:   # a tied alias stored once: no arrays of its own, one row all the same
            shape = p.get("shape")
            rows.append([p["name"], "-", str(p.get("dtype") or "-"),
                         "x".join(map(str, shape)) if shape else ("scalar" if shape == [] else "-"), "-", "-",
                         " ".join(flags)])
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
    """`ucp verify`: exit 0 only when the manifest and every chunk check out (and, with
    ``--strict``, when no stray file lies in the checkpoint)."""
    from ucp.format.verify import verify_report

    problems, warnings = verify_report(args.path, deep=not args.quick, storage_options=_storage_options(args),
                                       progress=not args.quiet)
    failed = problems + (warnings if args.strict else [])
    if args.json:
        print(json.dumps({"path": args.path, "ok": not failed, "problems": problems, "warnings": warnings},
                         indent=2))
        return EXIT_OK if not failed else EXIT_DIFF
    for p in problems:
        print(f"FAIL {p}")
    for w in warnings:
        print(f"{'FAIL' if args.strict else 'WARN'} {w}")
    if failed:
        print(f"{args.path}: {len(failed)} problem(s)")
    else:
        print(f"{args.path}: OK ({'every chunk re-read and checksummed' if not args.quick else 'sizes and manifest checked'}"
              f"{f'; {len(warnings)} stray file(s), see above' if warnings else ''})")
    return EXIT_OK if not failed else EXIT_DIFF


# ---------------------------------------------------------------- diff
def cmd_diff(args) -> int:
    """`ucp diff`: differing arrays and metadata paths; exit 1 when any."""
    import ucp
    from ucp.format.compare import diff_report

    so = _storage_options(args)
    a, b = ucp.open(args.a, storage_options=so), ucp.open(args.b, storage_options=so)
    rep = diff_report(a, b, atol=args.atol, metadata=not args.ignore_metadata)
    if args.json:
        print(json.dumps(rep, indent=2))
        return EXIT_OK if rep["equal"] else EXIT_DIFF
    rows, md_diffs = rep["rows"], rep["metadata_differences"]
    bad = [r for r in rows if not r["ok"]]
    shown = rows if args.all else bad
    if shown:
        print(_table([[r["param"], r["state"], r["status"],
                       f"{r['max_abs_diff']:.3g}" if "max_abs_diff" in r else "-"] for r in shown],
                     ["parameter", "state", "status", "max|a-b|"]))
    both = [r["max_abs_diff"] for r in rows if "max_abs_diff" in r]
    only = sum(1 for r in rows if r["status"].startswith("only in"))
    print(f"{len(rows)} arrays compared, {len(bad)} differ beyond atol={args.atol:g}"
          + (f" ({only} only in one checkpoint)" if only else "")
          + (f"; max |a-b| = {max(both):.3g}" if both else "; no array in both") + "; metadata "
          + ("equal" if rep["metadata_equal"] else "differs at " + ", ".join(md_diffs[:8])
             + (f" (+{len(md_diffs) - 8} more)" if len(md_diffs) > 8 else "")))
    return EXIT_OK if rep["equal"] else EXIT_DIFF


# ---------------------------------------------------------------- convert / export / demo
def cmd_convert(args) -> int:
    """`ucp convert`: a framework checkpoint -> universal, through the registry."""
    import ucp

    from ucp.errors import DestinationNotEmptyError

    if args.resume and args.overwrite:
        raise UcpError("--resume and --overwrite exclude each other")
    try:
        ucp.convert(args.src, args.dst, source=getattr(args, "from"), spec=args.spec,
                    workers=args.workers, resume=args.resume, overwrite=args.overwrite or None,
                    progress=not args.quiet, storage_options=_storage_options(args),
                    distributed=False if args.single_process else None)
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
    """`ucp export`: universal -> a target's files; degrees and target options."""
    import ucp

    degrees = {ax: getattr(args, ax) for ax, _ in _DEGREES if getattr(args, ax)}
    ucp.export(args.src, args.dst, args.to, degrees=degrees, spec=args.spec, zero_stage=args.zero_stage,
               max_shard_size=args.max_shard_size, config=args.config, dtype=args.dtype,
               sub_group_size=args.sub_group_size, tag=args.tag, keys=args.keys, progress=not args.quiet,
               storage_options=_storage_options(args), distributed=False if args.single_process else None)
    rank, world = _dist_rank()
    if rank == 0:
        print(f"exported {args.src} -> {args.dst} ({args.to}, {degrees or 'single rank'})"
              + (f" ({world} processes)" if world > 1 else ""))
    return EXIT_OK


def cmd_demo(args) -> int:
    """`ucp demo`: the end-to-end story; exit 1 unless every check passes."""
    from ucp.demo import run_demo

    return EXIT_OK if run_demo(args.dir, quiet=args.quiet) else EXIT_DIFF


def _positive(text: str) -> int:
    """argparse type of degrees, thread counts and sizes: an integer of at least 1 (``--dp 0``
    wrote a single-rank checkpoint, ``--workers 0`` was taken as the default)."""
    try:
        n = int(text)
    except ValueError:
        try:    # 1e9, as DeepSpeed configs write sub_group_size
            x = float(text)
        except ValueError:
            x = math.nan
        if not (math.isfinite(x) and x == int(x)):
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
        n = int(x)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _tolerance(text: str) -> float:
    """argparse type of ``--atol``: a finite number of at least 0 (a negative or NaN one made
    identical checkpoints differ)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(x) or x < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return x


def _plugin_help(registry: dict) -> str:
    return "; ".join(f"{name} ({cls.description})" if cls.description else name
                     for name, cls in sorted(registry.items()))


def _single_process(sp) -> None:
    sp.add_argument("--single-process", action="store_true",
                    help="run in this process alone, even with a torchrun environment (WORLD_SIZE, "
                         "MASTER_ADDR, ...), e.g. when started from one rank of a training job. Without it, "
                         "under torchrun every process of the job converts a share, and a process left "
                         "alone fails after UCP_RENDEZVOUS_TIMEOUT seconds (default 120)")


def _common(sp, json_flag=False) -> None:
    sp.add_argument("--storage-options", help="JSON dict passed to fsspec (e.g. endpoint_url)")
    sp.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    if json_flag:
        sp.add_argument("--json", action="store_true", help="machine-readable output")


def _add_convert(sub) -> None:
    from ucp.sources import sources

    sp = sub.add_parser("convert", help="framework checkpoint -> universal checkpoint")
    sp.add_argument("src")
    sp.add_argument("dst")
    sp.add_argument("--from", default="auto", metavar="SOURCE",
                    help="auto (detect from file names) or one of: " + _plugin_help(sources()))
    sp.add_argument("--spec", help="a converters/*.ucp name or a spec file")
    sp.add_argument("--workers", type=_positive, default=None, help="writer threads")
    sp.add_argument("--resume", action="store_true", help="finish an interrupted conversion into DST")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    _single_process(sp)
    _common(sp)
    sp.set_defaults(fn=cmd_convert)


#: the degrees ``ucp export`` takes, and what each splits
_DEGREES = (("tp", "tensor"), ("pp", "pipeline"), ("vp", "virtual-pipeline (interleaved)"), ("dp", "data"),
            ("ep", "expert"))


def _add_export(sub) -> None:
    from ucp.dcp.keys import KEY_FORMS
    from ucp.targets import targets

    sp = sub.add_parser("export", help="universal checkpoint -> framework layout at any parallelism")
    sp.add_argument("src")
    sp.add_argument("dst")
    sp.add_argument("--to", required=True, metavar="TARGET", help="one of: " + _plugin_help(targets()))
    for ax, what in _DEGREES:
        sp.add_argument(f"--{ax}", type=_positive, default=None, help=f"{what}-parallel degree to write")
    sp.add_argument("--zero-stage", type=int, default=None, help="ZeRO stage to write (targets that take it)")
    sp.add_argument("--max-shard-size", default=None, help="largest file to write, e.g. 5GB (targets that take it)")
    sp.add_argument("--spec", help="a converters/*.ucp name or a spec file (targets that take one)")
    sp.add_argument("--dtype", default=None, help="weights dtype of the run to write, e.g. bf16 (targets that take it)")
    sp.add_argument("--sub-group-size", type=_positive, default=None,
                    help="ZeRO-3 sub_group_size of the run to write (targets that take it)")
    sp.add_argument("--tag", default=None, help="checkpoint tag folder to write (targets that take it)")
    sp.add_argument("--config", default=None,
                    help="the model's config file to write with it, e.g. HF config.json (targets that take one)")
    sp.add_argument("--keys", default=None, metavar="FORM",
                    help=f"state-dict key form to write: one of {', '.join(KEY_FORMS)} (torchtitan: model keys at "
                         "the top level, optimizer under optimizer.), each optionally under a wrapper's keys as "
                         "FORM@KEY[/KEY...] (get_state_dict@app); default: the form saved (targets that take it: dcp)")
    _single_process(sp)
    _common(sp)
    sp.set_defaults(fn=cmd_export)


def _add_inspection(sub) -> None:
    sp = sub.add_parser("inspect", help="list parameters, states, dtypes, shapes, chunks")
    sp.add_argument("path")
    _common(sp, json_flag=True)
    sp.set_defaults(fn=cmd_inspect)

    sp = sub.add_parser("verify", help="check the manifest and every chunk; exit 1 on any problem")
    sp.add_argument("path")
    sp.add_argument("--quick", action="store_true", help="check presence and sizes only, no re-read")
    sp.add_argument("--strict", action="store_true", help="stray files (not part of the checkpoint) fail too")
    _common(sp, json_flag=True)
    sp.set_defaults(fn=cmd_verify)

    sp = sub.add_parser("diff", help="per-parameter max abs difference; exit 1 beyond --atol")
    sp.add_argument("a")
    sp.add_argument("b")
    sp.add_argument("--atol", type=_tolerance, default=0.0)
    sp.add_argument("--all", action="store_true", help="show equal arrays too")
    sp.add_argument("--ignore-metadata", action="store_true")
    _common(sp, json_flag=True)
    sp.set_defaults(fn=cmd_diff)


def build_parser() -> argparse.ArgumentParser:
    """The ``ucp`` argument parser; ``--from`` / ``--to`` help lists the registered plug-ins."""
    from ucp import __version__

    p = argparse.ArgumentParser(prog="ucp", description="Universal, reshardable checkpoints.")
    p.add_argument("--version", action="version", version=f"ucp {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    _add_convert(sub)
    _add_export(sub)
    _add_inspection(sub)
    sp = sub.add_parser("demo", help="end to end on a small embedded model")
    sp.add_argument("dir", nargs="?", default=None)
    _common(sp)
    sp.set_defaults(fn=cmd_demo)
    return p


#: commands that run without importing torch (unless their work needs it)
TORCH_FREE_COMMANDS = frozenset({"convert", "verify"})


#: the packages an fsspec store's errors come from (their failures are the store's, not ucp's)
_STORE_CLIENTS = frozenset({"botocore", "aiobotocore", "s3fs", "fsspec", "aiohttp", "gcsfs", "adlfs"})

#: the Python API's spellings in error messages, and the command line's
_FLAGS = {"overwrite=True": "--overwrite", "resume=True": "--resume"}


def _as_flags(message: str) -> str:
    """An error raised by the Python API, in the command line's words (``overwrite=True`` is
    ``--overwrite`` there)."""
    for api, flag in _FLAGS.items():
        message = message.replace(api, flag)
    return message


def _framework_hint(e: UcpError) -> str:
    """For a folder read as a universal checkpoint that holds a framework's checkpoint instead:
    which one, and that ``ucp convert`` makes a universal checkpoint of it."""
    from ucp.errors import NotCommittedError
    from ucp.plugins import local_path

    path = getattr(e, "path", None)
    if not isinstance(e, NotCommittedError) or path is None:
        return ""
    try:
        from ucp.sources import detect

        name = detect(local_path(path, "a framework's folder is"))
    except (UcpError, OSError):
        return ""
    return f"; it holds a {name} checkpoint: `ucp convert {path} DST` makes a universal one of it"


def _say_once(text: str) -> None:
    """One line on stderr, from process 0 only: under torchrun every rank ends the same way."""
    if _dist_rank()[0] == 0:
        print(text, file=sys.stderr)


#: what a convert that stopped part-way leaves, and how to finish it
_RESUME_HINT = "nothing was committed: the same command with --resume finishes the conversion, keeping what " \
               "was written and checked"


def _error(cmd: str, text: str) -> int:
    """Print one error line and give the exit code of an error."""
    _say_once(f"ucp {cmd}: error: {text}")
    return EXIT_ERROR


class _Interrupts:
    """While active, Ctrl-C (SIGINT) and SIGTERM (what schedulers send) raise KeyboardInterrupt in
    the main thread and are remembered: the engine's clean-up runs on the way out (an export
    removes what it wrote; a conversion keeps its checked chunks for --resume), and the command
    ends with one line even where a library turned the interrupt into an error of its own."""

    def __init__(self):
        self.signal = None
        self.done = False
        self._saved = {}

    def _on(self, signum, frame):
        if self.done or self.signal is not None:   # after the outcome, or while the clean-up runs
            return
        self.signal = errors.interrupted_by = signum    # what this process tells its job's others
        raise KeyboardInterrupt

    def __enter__(self):
        import signal
        import threading

        errors.interrupted_by = None
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._on)
        return self

    def __exit__(self, *exc):
        import signal

        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        return False


def _stopped(cmd: str, signum) -> int:
    import signal

    what = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
    hint = (f"; {_RESUME_HINT}" if cmd == "convert" else "; what it wrote was removed" if cmd == "export" else "")
    _say_once(f"ucp {cmd}: {what}{hint}")
    return EXIT_INTERRUPTED


def _failed(cmd: str, e: Exception) -> int:
    """The exit code of a command that raised ``e``, after one error line; called while ``e`` is
    handled, so that a bug is re-raised with its traceback."""
    if isinstance(e, UcpError):
        return _error(cmd, f"{_as_flags(str(e))}{_framework_hint(e)}")
    if isinstance(e, BrokenPipeError):
        return EXIT_OK
    if isinstance(e, OSError):     # a full disk, a read-only or size-limited destination: one line
        hint = f"; once that is fixed: {_RESUME_HINT}" if cmd == "convert" else ""
        return _error(cmd, f"{e}{hint}")
    if type(e).__module__.split(".")[0] in _STORE_CLIENTS:   # a store that cannot be reached, refuses credentials
        return _error(cmd, f"{type(e).__name__}: {e}")
    raise e      # a bug: its traceback is what to report


def main(argv=None) -> int:
    """Run one ``ucp`` command; returns the exit code (0 ok, 1 differences found, 2 error, 130 interrupted)."""
    args = build_parser().parse_args(argv)   # --help, --version, usage errors: done, without torch
    # Torch (imported by no plug-in module, so that the parser is quick) is ~170k objects that
    # live until exit. Freezing them keeps each later full collection from walking them all (a
    # conversion allocates enough containers to trigger several: 0.2-0.4 s of CPU). Two commands
    # leave torch out: ``verify`` reads bytes and checksums only, and ``convert`` leaves it to its
    # source (the DeepSpeed source reads without it: 1.5-2 s saved; the engine pauses collections
    # while it converts).
    interrupted = _Interrupts()
    with interrupted:
        try:
            if args.cmd not in TORCH_FREE_COMMANDS:   # from here on: torch's import takes a second or two
                import torch  # noqa: F401
            gc.freeze()
            rc = args.fn(args)
            interrupted.done = True    # a signal now comes after the work: the command succeeded
        except KeyboardInterrupt:
            interrupted.done = True
            rc = _stopped(args.cmd, interrupted.signal)
        except Exception as e:
            interrupted.done = True
            if interrupted.signal is not None:      # torch's zip writer turns it into "unexpected pos"
                rc = _stopped(args.cmd, interrupted.signal)
            else:
                rc = _failed(args.cmd, e)
        # the outcome is decided and said: signals are ignored from here to the exit (handlers kept)
        if _dist_rank()[1] > 1 and rc != EXIT_INTERRUPTED:
            # torchrun job: leave together, and skip interpreter teardown (gloo aborts there now and then)
            import torch.distributed as dist

            try:
                dist.barrier()
            except RuntimeError:     # a partner is gone: what this process did is said already
                pass
            dist.destroy_process_group()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    return rc


def run() -> None:
    """The ``ucp`` command (console script and ``python -m ucp``): :func:`main`, then exit with
    Ctrl-C and SIGTERM ignored. The outcome is decided and reported; a signal during the second
    or so torch takes to tear down must not turn it into a kill or a traceback."""
    import signal

    rc = main()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    sys.exit(rc)


if __name__ == "__main__":
    run()
