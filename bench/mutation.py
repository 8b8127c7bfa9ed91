"""Mutation testing of ucp/format and ucp/plan with the fast tests (not part of CI: it is slow).

    python bench/mutation.py ucp/format/reader.py ucp/format/verify.py ... [--tests FILE ...]
        [--new-tests GLOB ...] [--timeout-factor 4] [--out bench/results/mutation.txt]

Why a small mutator of our own rather than mutmut 3 (which runs here): on the 2 shared cores of
the development VMs mutmut needed ~6 s a mutant for verify.py alone (a fresh pytest process and
import of torch per mutant) and most of its survivors were edits of message strings. This script

- mutates the AST: comparison and boolean operators, arithmetic, integer and boolean constants,
  ``raise`` / call statements deleted, ``return x`` -> ``return None``; never string literals,
  docstrings or the insides of f-strings (message text);
- runs the selected tests once, unmutated, with a line tracer, to learn which tests execute which
  line of the mutated modules and how long each takes; a mutant on a line no test executes is
  reported as "not covered" without a run;
- preloads torch, numpy, zarr, pytest and hypothesis in one parent process and forks a child per
  mutant, which compiles the mutated module from its AST (original line numbers), imports it in
  place of the real one, and runs only the tests that execute the mutated line, fast ones first,
  with ``-x``; a child running past ``timeout-factor`` x the baseline time of its tests is killed
  and the mutant counted as killed by timeout;
- orders the tests matching ``--new-tests`` after all others, so a mutant whose first failing test
  is a new one survived the old suite: one run gives the score before and after the new tests.

Hypothesis runs derandomized (profile "mutation" of tests/conftest.py) so results repeat.
Known-equivalent survivors are listed, with the reason, in bench/mutation_equivalent.txt
(``module:line:description  # why``) and reported apart from the real survivors.
"""
from __future__ import annotations

import argparse
import ast
import copy
import importlib.abc
import importlib.util
import json
import os
import pathlib
import signal
import sys
import time
from dataclasses import dataclass, field

ROOT = pathlib.Path(__file__).resolve().parents[1]

DEFAULT_TESTS = {
    "ucp/format": ["tests/test_behaviour_*.py", "tests/test_mutants_*.py", "tests/test_format_integrity.py",
                   "tests/test_format_binding.py", "tests/test_format_durability.py", "tests/test_format_resume.py",
                   "tests/test_format_roundtrip.py", "tests/test_format_sharding.py", "tests/test_format_property.py",
                   "tests/test_format_metadata.py", "tests/test_format_interop.py", "tests/test_hostile_manifest.py",
                   "tests/test_format_parts.py", "tests/test_format_lock.py", "tests/test_format_store.py",
                   "tests/test_format_open.py", "tests/test_format_small.py", "tests/test_dcp_read.py",
                   "tests/test_engine_gather.py"],
    "ucp/plan": ["tests/test_behaviour_*.py", "tests/test_mutants_*.py", "tests/test_plan_*.py",
                 "tests/test_converters_plan.py", "tests/test_lang_bind.py"],
}
NEW_TESTS = ["tests/test_behaviour_*.py", "tests/test_mutants_*.py"]

_CMP = {ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE,
        ast.GtE: ast.Gt, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
_BIN = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.FloorDiv, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
        ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.LShift: ast.RShift, ast.RShift: ast.LShift,
        ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.BitXor: ast.BitAnd}
_SYM = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.In: "in",
        ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not", ast.Add: "+", ast.Sub: "-", ast.Mult: "*",
        ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**", ast.LShift: "<<", ast.RShift: ">>",
        ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^", ast.And: "and", ast.Or: "or"}


@dataclass
class Mutant:
    module: str          # e.g. ucp.format.reader
    path: str            # repository-relative file
    index: int           # position among the module's mutation points (AST walk order)
    line: int
    desc: str
    status: str = "pending"   # killed | timeout | survived | equivalent | not covered
    killer: str = ""
    seconds: float = 0.0
    reason: str = ""
    tests: list = field(default_factory=list)
    sha: str = ""        # sha256 of the module's source the mutant was made from (first 16 hex digits)


# The deliberate bugs of issue 19, as text edits of today's code: each must fail some test.
# (file, old text, new text, tests to run, what the bug does)
NAMED = [
    ("ucp/format/reader.py", "if c != s or c != crc:", "if c != s:",
     ["tests/test_behaviour_integrity.py", "tests/test_format_integrity.py", "tests/test_format_binding.py"],
     "reads no longer compare a chunk's crc32c with the manifest's"),
    ("ucp/format/verify.py", "if c != stored or c != crc:", "if c != stored:",
     ["tests/test_behaviour_integrity.py", "tests/test_format_integrity.py", "tests/test_format_binding.py"],
     "verify no longer compares a chunk's crc32c with the manifest's"),
    ("ucp/plan/replicas.py", "total = total.round()", "total = total.trunc()",
     ["tests/test_engine.py", "tests/test_plan_known.py", "tests/test_plan_props.py"],
     "integer replicas averaged by truncation instead of rounding"),
    ("ucp/format/store.py", "os.fsync(fd)", "pass",
     ["tests/test_format_durability.py"], "no fsync of files or directories"),
    ("ucp/format/store.py", "if syncfs(fd):", "if True:",
     ["tests/test_format_durability.py"], "no syncfs before the manifest (nor its os.sync fallback)"),
    ("ucp/loading.py", "torch.zeros(f.local_shape, dtype=dt)", "torch.full(f.local_shape, 7, dtype=dt)",
     ["tests/test_behaviour_padding.py", "tests/test_ranks.py", "tests/test_engine.py"],
     "export pads with 7 instead of zeros"),
]


def run_named(parallel, say):
    """Apply each deliberate bug of NAMED in a forked child and run its tests (all, no -x)."""
    jobs, rows = [], []
    for i, (rel, old, new, tests, what) in enumerate(NAMED):
        src = (ROOT / rel).read_text()
        n = src.count(old)
        if n == 0:
            rows.append(f"{what}: NOT APPLIED ({old!r} not found in {rel}: update NAMED)")
            continue
        code = compile(src.replace(old, new), str(ROOT / rel), "exec")
        module = rel[:-3].replace("/", ".")
        jobs.append((i, expand(tests), 3600, _Finder(module, str(ROOT / rel), code)))
    results = {}
    run_many(jobs, parallel, lambda i, res, secs: results.__setitem__(i, (res, secs)), failfast=False)
    say("## the deliberate bugs of issue 19 (each applied alone; every test that fails under it)")
    for i, (rel, old, new, tests, what) in enumerate(NAMED):
        if i not in results:
            continue
        res, secs = results[i]
        verdict = "TIMEOUT" if res is None else ("killed by " + ", ".join(res["failed"]) if res["code"] else
                                                   "SURVIVED")
        rows.append(f"{what} ({rel}: {old!r} -> {new!r}): {verdict}")
    for r in rows:
        say("- " + r)
    return all("killed by" in r for r in rows)


# -- mutation points ------------------------------------------------------------------------------
def _skip_nodes(tree):
    """ids of nodes never mutated: docstrings, everything inside f-strings, and annotations (never
    evaluated under ``from __future__ import annotations``, which every module of ucp uses)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            skip.update(id(n) for n in ast.walk(node))
        for ann in _annotations(node):
            skip.update(id(n) for n in ast.walk(ann))
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                skip.update(id(n) for n in ast.walk(first))
    return skip


def _annotations(node):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        args = node.args
        every = args.posonlyargs + args.args + args.kwonlyargs + [a for a in (args.vararg, args.kwarg) if a]
        return [a.annotation for a in every if a.annotation is not None] + ([node.returns] if node.returns else [])
    if isinstance(node, ast.AnnAssign):
        return [node.annotation]
    return []


def _points(node):
    """(description, apply) pairs for one node; ``apply(node)`` mutates a copy of it in place."""
    out = []
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in _CMP:
                new = _CMP[type(op)]
                out.append((f"{_SYM[type(op)]} -> {_SYM[new]}", lambda n, i=i, new=new: n.ops.__setitem__(i, new())))
    elif isinstance(node, ast.BoolOp):
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        out.append((f"{_SYM[type(node.op)]} -> {_SYM[new]}", lambda n, new=new: setattr(n, "op", new())))
    elif isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in _BIN:
        new = _BIN[type(node.op)]
        aug = "=" if isinstance(node, ast.AugAssign) else ""
        out.append((f"{_SYM[type(node.op)]}{aug} -> {_SYM[new]}{aug}", lambda n, new=new: setattr(n, "op", new())))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        out.append(("not x -> x", None))  # handled by the parent (replaces the node)
    elif isinstance(node, ast.Constant) and type(node.value) is bool:
        out.append((f"{node.value} -> {not node.value}", lambda n: setattr(n, "value", not n.value)))
    elif isinstance(node, ast.Constant) and type(node.value) is int:
        out.append((f"{node.value} -> {node.value + 1}", lambda n: setattr(n, "value", n.value + 1)))
    elif isinstance(node, ast.Raise):
        out.append(("raise deleted", None))
    elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        out.append(("call statement deleted", None))
    elif isinstance(node, ast.Return) and node.value is not None and not (
            isinstance(node.value, ast.Constant) and node.value.value is None):
        out.append(("return x -> return None", lambda n: setattr(n, "value", ast.Constant(None))))
    elif isinstance(node, ast.Break):
        out.append(("break -> continue", None))
    elif isinstance(node, ast.Continue):
        out.append(("continue -> break", None))
    return out


def _trace_lines(tree):
    """id(node) -> the lines whose execution means the node ran: its own lines in a function body;
    the ``def`` line (what the tracer records on a call) for default values; None at module or
    class level (run at import: every test that uses the module counts)."""
    where = {}

    def visit(node, lines):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            for d in node.decorator_list:
                visit(d, None)
            visit(node.args, (first,))
            if node.returns is not None:
                visit(node.returns, None)
            for st in node.body:
                visit(st, "own")
            return
        own = tuple(range(node.lineno, (node.end_lineno or node.lineno) + 1)) if hasattr(node, "lineno") else None
        where[id(node)] = own if lines == "own" else lines
        for child in ast.iter_child_nodes(node):
            visit(child, "own" if lines == "own" else lines)

    visit(tree, None)
    return where


def mutation_points(tree):
    """[(node index in ast.walk order, line, description, apply, trace lines)] for every mutation."""
    skip = _skip_nodes(tree)
    lines = _trace_lines(tree)
    pts = []
    for k, node in enumerate(ast.walk(tree)):
        if id(node) in skip:
            continue
        for desc, apply in _points(node):
            pts.append((k, getattr(node, "lineno", 0), desc, apply, lines.get(id(node))))
    return pts


class _Replace(ast.NodeTransformer):
    """Replaces the node at walk position ``k`` for the mutations that swap whole nodes."""

    def __init__(self, target):
        self.target = target

    def visit(self, node):
        if node is self.target:
            if isinstance(node, ast.UnaryOp):
                return node.operand
            if isinstance(node, (ast.Raise, ast.Expr)):
                return ast.copy_location(ast.Pass(), node)
            if isinstance(node, ast.Break):
                return ast.copy_location(ast.Continue(), node)
            if isinstance(node, ast.Continue):
                return ast.copy_location(ast.Break(), node)
        return self.generic_visit(node)


def mutated_code(path, tree, point):
    k, _line, _desc, apply, _lines = point
    t = copy.deepcopy(tree)
    node = list(ast.walk(t))[k]
    if apply is not None:
        apply(node)
    else:
        t = _Replace(node).visit(t)
    ast.fix_missing_locations(t)
    return compile(t, str(path), "exec")


# -- the child: import the mutated module in place of the real one, run pytest -------------------
class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, name, path, code):
        self.name, self.path, self.code = name, path, code

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        spec = importlib.util.spec_from_file_location(fullname, self.path, loader=self)
        return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        exec(self.code, module.__dict__)


class _Failures:
    """pytest plugin: the failing tests (setup, call or teardown), in order."""

    def __init__(self):
        self.failed = []

    def pytest_runtest_logreport(self, report):
        if report.failed and report.nodeid not in self.failed:
            self.failed.append(report.nodeid)

    def pytest_collectreport(self, report):
        if report.failed:
            self.failed.append(f"collection of {report.nodeid}")


def _run_child(tests, result_fd, finder=None, tracer=None, failfast=True):
    """In a forked child: pytest on ``tests`` (-x unless ``failfast`` is False or a tracer is
    given); writes a JSON result to ``result_fd``."""
    import pytest

    os.environ["UCP_HYPOTHESIS_PROFILE"] = "mutation"
    os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # entry-point plugins cost seconds per child
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    if finder is not None:
        sys.meta_path.insert(0, finder)
    plugins = [_Failures()]
    if tracer is not None:
        plugins.append(tracer)
    # no assertion rewriting, no gc-heavy unraisable/thread-exception hooks: only pass/fail matters
    args = ["-q", "-p", "no:cacheprovider", "-p", "no:faulthandler", "-p", "no:unraisableexception",
            "-p", "no:threadexception", "--assert=plain", "--rootdir", str(ROOT)]
    if tracer is None and failfast:
        args.append("-x")
    code = pytest.main(args + list(tests), plugins=plugins)
    res = {"code": int(code), "failed": plugins[0].failed}
    if tracer is not None:
        res["lines"] = {f: {str(ln): sorted(ts) for ln, ts in d.items()} for f, d in tracer.lines.items()}
        res["durations"] = tracer.durations
    os.write(result_fd, json.dumps(res).encode())
    os._exit(0)


def _fork(tests, finder=None, tracer=None, failfast=True):
    """Start a child running the tests; returns (pid, read end of its result pipe)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            _run_child(tests, w, finder, tracer, failfast)
        finally:
            os._exit(3)
    os.close(w)
    return pid, r


def run_many(jobs, parallel, on_done, failfast=True):
    """Run ``jobs`` = [(key, tests, timeout, finder)] in up to ``parallel`` forked children at once
    (one thread: the parent only forks and waits on pipes). ``on_done(key, result or None on
    timeout, seconds)``."""
    import select

    pending = list(jobs)[::-1]
    running = {}  # fd -> [pid, key, t0, deadline, chunks]
    while pending or running:
        while pending and len(running) < parallel:
            key, tests, timeout, finder = pending.pop()
            pid, fd = _fork(tests, finder, failfast=failfast)
            now = time.perf_counter()
            running[fd] = [pid, key, now, now + timeout, []]
        now = time.perf_counter()
        wait = max(0.0, min(v[3] for v in running.values()) - now)
        ready, _, _ = select.select(list(running), [], [], wait)
        for fd in ready:
            data = os.read(fd, 1 << 20)
            if data:
                running[fd][4].append(data)
                continue
            pid, key, t0, _dl, chunks = running.pop(fd)
            os.close(fd)
            os.waitpid(pid, 0)
            raw = b"".join(chunks)
            on_done(key, json.loads(raw) if raw else {"code": -1, "failed": ["child died"]},
                    time.perf_counter() - t0)
        now = time.perf_counter()
        for fd in [fd for fd, v in running.items() if v[3] <= now]:
            pid, key, t0, _dl, _chunks = running.pop(fd)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(fd)
            on_done(key, None, now - t0)


def fork_run(tests, timeout, finder=None, tracer=None):
    """Run the tests in one forked child; returns (result dict or None on timeout, seconds)."""
    if tracer is None:
        out = []
        run_many([(0, tests, timeout, finder)], 1, lambda _k, res, secs: out.append((res, secs)))
        return out[0]
    t0 = time.perf_counter()
    pid, r = _fork(tests, finder, tracer)
    with os.fdopen(r, "rb") as f:
        raw = f.read()
    os.waitpid(pid, 0)
    return (json.loads(raw) if raw else None), time.perf_counter() - t0


class LineTracer:
    """pytest plugin for the baseline run: which test executes which line of the target files."""

    def __init__(self, files):
        self.files = set(files)
        self.lines = {f: {} for f in files}
        self.durations = {}
        self.current = None

    def _local(self, frame, event, arg):
        if event == "line" and self.current is not None:
            self.lines[frame.f_code.co_filename].setdefault(frame.f_lineno, set()).add(self.current)
        return self._local

    def _global(self, frame, event, arg):
        if frame.f_code.co_filename in self.files:
            if self.current is not None:  # the def line of a called function counts as executed
                self.lines[frame.f_code.co_filename].setdefault(frame.f_code.co_firstlineno, set()).add(
                    self.current)
            return self._local
        return None

    def pytest_runtest_logstart(self, nodeid, location):
        import threading

        self.current = nodeid
        sys.settrace(self._global)
        threading.settrace(self._global)

    def pytest_runtest_logfinish(self, nodeid, location):
        import threading

        sys.settrace(None)
        threading.settrace(None)
        self.current = None

    def pytest_runtest_logreport(self, report):
        self.durations[report.nodeid] = self.durations.get(report.nodeid, 0.0) + report.duration


# -- driver ---------------------------------------------------------------------------------------
def expand(patterns):
    out = []
    for pat in patterns:
        for p in sorted(ROOT.glob(pat)):
            rel = str(p.relative_to(ROOT))
            if rel not in out:
                out.append(rel)
    return out


def load_equivalent():
    f = ROOT / "bench" / "mutation_equivalent.txt"
    eq = {}
    if f.exists():
        for ln in f.read_text().splitlines():
            if ln.strip() and not ln.startswith("#"):
                key, _, why = ln.partition("#")
                eq[key.strip()] = why.strip()
    return eq


def preload():
    """Import the heavy third-party modules once, in the parent, before forking."""
    import gc

    import crc32c  # noqa: F401
    import fsspec  # noqa: F401
    import hypothesis  # noqa: F401
    import jsonschema  # noqa: F401
    import lark  # noqa: F401
    import numpy  # noqa: F401
    import pytest  # noqa: F401
    import torch  # noqa: F401
    import zarr  # noqa: F401

    assert not any(m == "ucp" or m.startswith("ucp.") for m in sys.modules), "the parent must not import ucp"
    gc.collect()
    gc.freeze()  # children inherit the heap: no collector passes over torch's objects in each one


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="*", help="modules to mutate (paths under ucp/)")
    ap.add_argument("--named", action="store_true", help="only apply the deliberate bugs of issue 19 (NAMED)")
    ap.add_argument("--tests", nargs="*", help="test files or globs (default: per package, see DEFAULT_TESTS)")
    ap.add_argument("--new-tests", nargs="*", default=NEW_TESTS, help="globs of the tests counted as new")
    ap.add_argument("--timeout-factor", type=float, default=4.0)
    ap.add_argument("--limit", type=int, default=0, help="at most this many mutants per module (0: all)")
    ap.add_argument("--parallel", type=int, default=2, help="children at once")
    ap.add_argument("--budget", type=float, default=20.0,
                    help="per mutant, run the fastest old tests of the line up to this many seconds of baseline "
                         "time (0: all); survivors are then rerun with all of them while --recheck-minutes last")
    ap.add_argument("--recheck-minutes", type=float, default=30.0)
    ap.add_argument("--run-equivalent", action="store_true",
                    help="also run the mutants listed in bench/mutation_equivalent.txt (default: reported, not run)")
    ap.add_argument("--only", nargs="*", help="mutate only these of the files (the baseline still covers all)")
    ap.add_argument("--sample", type=int, default=1, help="run every Nth mutant of a module (1: all)")
    ap.add_argument("--survivors-against", nargs="*", metavar="TEST",
                    help="rerun the survivors recorded in --json against these tests (e.g. tests written to kill "
                         "them), apply bench/mutation_equivalent.txt, and rewrite the report")
    ap.add_argument("--baseline-json", help="a run's traced baseline (/tmp/ucp-mutation-baseline-*.json): with "
                                            "--survivors-against, to rerun survivors with every test of their line; "
                                            "otherwise used instead of tracing again (same tests, same sources)")
    ap.add_argument("--recheck-timeouts", action="store_true",
                    help="with --survivors-against: rerun mutants killed by a timeout too (under heavy load a "
                         "slow child can time out without looping)")
    ap.add_argument("--merge", nargs="*", metavar="JSON",
                    help="write one report (--out, --json) from the results of several runs (per module, the "
                         "last run that mutated it), marking modules whose source changed since")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "mutation.json"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "mutation.txt"))
    a = ap.parse_args(argv)
    a.recheck_until = 0.0
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    if a.named:
        preload()
        ok = run_named(a.parallel, _Report(a.out))
        sys.exit(0 if ok else 1)
    if a.survivors_against is not None:
        preload()
        return rerun_survivors(a)
    if a.merge:
        return merge_runs(a)
    files = [str(pathlib.Path(f)) for f in a.files]
    pkgs = {str(pathlib.Path(f).parent) for f in files}
    tests = expand(a.tests if a.tests else [g for p in sorted(pkgs) for g in DEFAULT_TESTS.get(p, [])])
    new = set(expand(a.new_tests))
    preload()
    abspaths = {f: str(ROOT / f) for f in files}
    t0 = time.perf_counter()
    if a.baseline_json:  # another run's traced baseline of the same tests (it must cover these modules)
        base, secs = json.loads(pathlib.Path(a.baseline_json).read_text()), 0.0
        missing = [f for f, p in abspaths.items() if p not in base["lines"]]
        if missing:
            sys.exit(f"{a.baseline_json} has no trace of {', '.join(missing)}")
    else:
        base, secs = baseline(tests, list(abspaths.values()), a.parallel)
    say = _Report(a.out)
    say(f"# mutation run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; baseline {secs:.0f} s; "
        f"tests: {' '.join(tests)}; new tests: {' '.join(sorted(new & set(tests)))}")
    durations = base["durations"]
    eq = load_equivalent()
    results = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped (SIGTERM): partial report"))
    try:
        todo = [f for f in files if not a.only or f in a.only]
        for f in todo:
            a.recheck_until = time.time() + a.recheck_minutes * 60 / len(todo)
            run_module(f, abspaths[f], base["lines"][abspaths[f]], durations, new, eq, a, say, results)
    finally:  # also a stopped run leaves its report (mutants not yet run are left out of it)
        summarise(results, [f for f in files if not a.only or f in a.only], new, say, time.perf_counter() - t0)
        if a.sample > 1:
            say(f"# sampled: every {a.sample}th mutation point of each module")
        pathlib.Path(a.json).write_text(json.dumps([m.__dict__ for m in results], indent=0))


def baseline(tests, paths, parallel):
    """The traced, unmutated run (split over ``parallel`` children by test file), cached in /tmp
    under a hash of the test and module sources. Returns ({"lines", "durations"}, seconds)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(set(tests) | set(paths)) + ["tests/conftest.py"]:
        h.update(f.encode() + (ROOT / f).read_bytes())
    cache = pathlib.Path(f"/tmp/ucp-mutation-baseline-{h.hexdigest()[:16]}.json")
    if cache.exists():
        return json.loads(cache.read_text()), 0.0
    t0 = time.perf_counter()
    groups = [tests[i::parallel] for i in range(parallel)]
    kids = [_fork(g, tracer=LineTracer(paths)) for g in groups if g]
    merged = {"lines": {p: {} for p in paths}, "durations": {}}
    for pid, r in kids:
        with os.fdopen(r, "rb") as f:
            raw = f.read()
        os.waitpid(pid, 0)
        res = json.loads(raw) if raw else {"code": -1, "failed": ["child died"]}
        if res["code"] != 0:
            sys.exit(f"the unmutated baseline does not pass ({res['failed'][:5]}): fix the tests first")
        for p, d in res["lines"].items():
            for ln, ts in d.items():
                merged["lines"][p].setdefault(ln, []).extend(ts)
        merged["durations"].update(res["durations"])
    cache.write_text(json.dumps(merged))
    return merged, time.perf_counter() - t0


def _order(tests, durations, new, budget=0.0):
    """Old tests first (fastest first), then the new ones: the first failure tells before/after.
    With a ``budget`` (seconds of baseline time) the old tests are cut after the fastest ones that
    fit it (at least one); the new tests always run. Returns (tests, whether any were cut)."""
    old = sorted((t for t in tests if t.split("::")[0] not in new), key=lambda t: durations.get(t, 0.0))
    fresh = sorted((t for t in tests if t.split("::")[0] in new), key=lambda t: durations.get(t, 0.0))
    if budget:
        kept, spent = [], 0.0
        for t in old:
            if kept and spent + durations.get(t, 0.0) > budget:
                break
            kept.append(t)
            spent += durations.get(t, 0.0)
        return kept + fresh, len(kept) < len(old)
    return old + fresh, False


def _tests_for(trace_lines, lines):
    """Tests that executed any of ``trace_lines`` (None: every test that executed the module)."""
    if trace_lines is None:
        return sorted({t for ts in lines.values() for t in ts})
    return sorted({t for ln in trace_lines for t in lines.get(str(ln), [])})


def rerun_survivors(a):
    """Second pass over a finished run: its survivors (capped ones too) and uncovered mutants against
    the tests ``a.survivors_against`` (traced once here, to pick those that execute each mutant's
    line, fastest first), then, with ``a.baseline_json`` (the run's traced baseline, in /tmp), every
    other test of the run that executes the line: a mutant that survives this is a survivor."""
    results = [Mutant(**d) for d in json.loads(pathlib.Path(a.json).read_text())]
    header = pathlib.Path(a.out).read_text().splitlines()[0] if pathlib.Path(a.out).exists() else "#"
    tests = expand(a.survivors_against)
    eq = load_equivalent()
    redo = ("not covered", "equivalent") + (("timeout",) if a.recheck_timeouts else ())
    todo = [k for k, m in enumerate(results)
            if (m.status.startswith("survived") or m.status in redo) and tests
            and (a.run_equivalent or not (m.status == "equivalent" or f"{m.path}:{m.line}:{m.desc}" in eq))]
    paths = sorted({str(ROOT / results[k].path) for k in todo})
    traced, _secs = baseline(tests, paths, a.parallel) if todo else ({"lines": {}, "durations": {}}, 0)
    old = json.loads(pathlib.Path(a.baseline_json).read_text()) if a.baseline_json else None
    durations = {**(old["durations"] if old else {}), **traced["durations"]}
    fresh = set(tests)
    trees, points, jobs, capped_left = {}, {}, [], set()
    for k in todo:
        m = results[k]
        if m.path not in trees:
            trees[m.path] = ast.parse((ROOT / m.path).read_text(), str(ROOT / m.path))
            points[m.path] = mutation_points(trees[m.path])
        pt = points[m.path][m.index]
        if (pt[1], pt[2]) != (m.line, m.desc):
            sys.exit(f"{m.path} changed since the run ({m.line} {m.desc} is now {pt[1]} {pt[2]}): run it again")
        ap_ = str(ROOT / m.path)
        mine = _order(_tests_for(pt[4], traced["lines"].get(ap_, {})), durations, set())[0]
        theirs = [] if old is None else [t for t in _order(_tests_for(pt[4], old["lines"].get(ap_, {})), durations,
                                                           set())[0] if t.split("::")[0] not in fresh]
        if not mine and not theirs:
            continue
        m.tests = mine + theirs
        if old is None or ap_ not in old["lines"]:
            capped_left.add(k)  # only the new tests ran: a pass is not a full verdict
        code = mutated_code(ap_, trees[m.path], pt)
        jobs.append((k, m.tests, _budget(m.tests, durations, a), _Finder(m.module, ap_, code)))

    def done(k, res, secs):
        m = results[k]
        if res is None:
            m.status, m.killer = "timeout", "(timeout)"
        elif res["code"] != 0:
            m.status, m.killer, m.reason = "killed", (res["failed"] or [f"exit {res['code']}"])[0], ""
        elif k in capped_left:
            m.status = "survived (tests capped)" if m.status.startswith("survived") else m.status
        else:
            m.status = "survived"  # every test of the line ran (no cap)
        print(f"{m.path}:{m.line} {m.desc}: {m.status} {m.killer}", flush=True)

    run_many(jobs, a.parallel, done)
    for m in results:
        key = f"{m.path}:{m.line}:{m.desc}"
        if (m.status.startswith("survived") or m.status == "not covered") and key in eq:
            m.status, m.reason = "equivalent", eq[key]
    say = _Report(a.out)
    say(header)
    say(f"# survivors rerun against: {' '.join(tests) or '(none)'}; equivalents from bench/mutation_equivalent.txt")
    files = list(dict.fromkeys(m.path for m in results))
    summarise(results, files, set(expand(a.new_tests)), say, 0.0)
    pathlib.Path(a.json).write_text(json.dumps([m.__dict__ for m in results], indent=0))


def _sha(path):
    import hashlib

    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()[:16]


def merge_runs(a):
    """One report from several runs: per module, the mutants of the last run (in the order given)
    that mutated it, with bench/mutation_equivalent.txt applied again."""
    by_path, headers = {}, []
    for f in a.merge:
        ms = [Mutant(**d) for d in json.loads(pathlib.Path(f).read_text())]
        for path in dict.fromkeys(m.path for m in ms):
            by_path[path] = [m for m in ms if m.path == path]
        txt = pathlib.Path(f).with_suffix(".txt")
        headers += [ln for ln in (txt.read_text().splitlines() if txt.exists() else []) if ln.startswith("# ")
                    and "mutants in" not in ln][:12]
    eq = load_equivalent()
    results = [m for ms in by_path.values() for m in ms]
    for m in results:
        key = f"{m.path}:{m.line}:{m.desc}"
        if (m.status.startswith("survived") or m.status == "not covered") and key in eq:
            m.status, m.reason = "equivalent", eq[key]
    say = _Report(a.out)
    for h in headers:
        say(h)
    say("\n## source measured (sha256, 16 hex digits) against the source now")
    for path, ms in by_path.items():
        now = _sha(ROOT / path)
        shas = {m.sha for m in ms}
        state = "same" if shas == {now} else f"CHANGED since ({', '.join(sorted(shas)) or 'not recorded'})"
        say(f"{path:34} {now}  {state}")
    summarise(results, list(by_path), set(expand(a.new_tests)), say, 0.0)
    say(f"# merged from {', '.join(a.merge)}; {sum(m.seconds for m in results) / 60:.0f} min of mutant runs in all")
    pathlib.Path(a.json).write_text(json.dumps([m.__dict__ for m in results], indent=0))


def _budget(tests, durations, a):
    """Seconds a mutant's child may run: its tests' baseline time, times the factor, plus start-up."""
    return a.timeout_factor * sum(durations.get(t, 1.0) for t in tests) + 30


def run_module(rel, path, lines, durations, new, eq, a, say, results):
    module = rel[:-3].replace("/", ".")
    tree = ast.parse(pathlib.Path(path).read_text(), path)
    sha = _sha(path)
    points = mutation_points(tree)
    if a.limit:
        points = points[:a.limit]
    muts, jobs, capped = {}, [], set()  # muts: point index -> Mutant
    # a listed key names one line and description; two mutants sharing both are run anyway
    dup = {}
    for pt in points:
        dup[(pt[1], pt[2])] = dup.get((pt[1], pt[2]), 0) + 1
    for i, pt in enumerate(points):
        if i % a.sample:
            continue
        m = Mutant(module, rel, i, pt[1], pt[2], sha=sha)
        m.tests, cut = _order(_tests_for(pt[4], lines), durations, new, a.budget)
        if cut:
            capped.add(i)
        muts[i] = m
        results.append(m)
        if not m.tests:
            m.status = "not covered"
        elif f"{rel}:{m.line}:{m.desc}" in eq and not a.run_equivalent and dup[(m.line, m.desc)] == 1:
            m.status, m.reason = "equivalent", eq[f"{rel}:{m.line}:{m.desc}"]  # judged equivalent: not run
        else:
            jobs.append((i, m.tests, _budget(m.tests, durations, a), _Finder(module, path, mutated_code(path, tree, pt))))

    def done(i, res, secs):
        m = muts[i]
        m.seconds = secs
        if res is None:
            m.status, m.killer = "timeout", "(timeout)"
        elif res["code"] != 0:
            m.status, m.killer = "killed", (res["failed"] or [f"exit {res['code']}"])[0]
        else:
            m.status = "survived"
        print(f"{module}:{m.line} {m.desc}: {m.status} {m.killer} ({m.seconds:.1f} s)", flush=True)

    run_many(jobs, a.parallel, done)
    # survivors of a capped run: run every test that executes the line, while time is left
    again = [(i, _order(_tests_for(points[i][4], lines), durations, new)[0]) for i in sorted(capped)
             if muts[i].status == "survived"]
    left = a.recheck_until - time.time()
    jobs = []
    for i, tests in again:
        cost = sum(durations.get(t, 1.0) for t in tests) / a.parallel
        if left < cost:
            muts[i].status = "survived (tests capped)"
            continue
        left -= cost
        muts[i].tests = tests
        jobs.append((i, tests, _budget(tests, durations, a), _Finder(module, path, mutated_code(path, tree, points[i]))))
    run_many(jobs, a.parallel, done)
    for m in muts.values():
        key = f"{rel}:{m.line}:{m.desc}"
        if (m.status.startswith("survived") or m.status == "not covered") and key in eq:
            m.status, m.reason = "equivalent", eq[key]
    return list(muts.values())


class _Report:
    def __init__(self, path):
        self.path = pathlib.Path(path)
        self.lines = []

    def __call__(self, s=""):
        print(s, flush=True)
        self.lines.append(s)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(self.lines) + "\n")


def _killed_before(m, new):
    """Killed by the old tests alone: the first failure (old tests run first) is an old test."""
    return m.status == "timeout" or (m.status == "killed" and m.killer.split("::")[0] not in new)


def summarise(results, files, new, say, seconds):
    say("\n## score per module (killed / (mutants - equivalent)); before = old tests only")
    say(f"{'module':34} {'mutants':>7} {'equiv':>5} {'killed':>6} {'before':>7} {'after':>7}  survivors")
    ran = [m for m in results if m.status != "pending"]
    if len(ran) < len(results):
        say(f"# stopped early: {len(results) - len(ran)} mutants not run are left out")
    results = ran
    for f in files:
        ms = [m for m in results if m.path == f]
        if not ms:
            continue
        eqv = sum(m.status == "equivalent" for m in ms)
        killed = [m for m in ms if m.status in ("killed", "timeout")]
        before = sum(_killed_before(m, new) for m in ms)
        denom = max(1, len(ms) - eqv)
        surv = [m for m in ms if m.status.startswith("survived") or m.status == "not covered"]
        say(f"{f:34} {len(ms):7} {eqv:5} {len(killed):6} {before / denom:7.1%} {len(killed) / denom:7.1%}  "
            f"{len(surv)}")
    stale = _stale_equivalents(files)
    if stale:
        say(f"\n## listed in bench/mutation_equivalent.txt but no such mutant in today's code ({len(stale)})")
        for key in stale:
            say(key)
    for status in ("survived", "survived (tests capped)", "not covered", "equivalent"):
        ms = [m for m in results if m.status == status]
        if ms:
            say(f"\n## {status} ({len(ms)})")
            for m in ms:
                src = _source_line(m.path, m.line)
                say(f"{m.path}:{m.line}: {m.desc:28} | {src}" + (f"  # {m.reason}" if m.reason else ""))
    say(f"\n# {len(results)} mutants in {seconds / 60:.1f} min")


def _stale_equivalents(files):
    """Keys of bench/mutation_equivalent.txt for ``files`` that name no mutation point of the code
    now (a line moved or changed since they were written: they must be checked again)."""
    out = []
    for f in files:
        tree = ast.parse((ROOT / f).read_text(), str(ROOT / f))
        have = {f"{f}:{line}:{desc}" for _k, line, desc, _a, _t in mutation_points(tree)}
        out += [k for k in load_equivalent() if k.startswith(f + ":") and k not in have]
    return out


def _source_line(path, line):
    try:
        return pathlib.Path(ROOT / path).read_text().splitlines()[line - 1].strip()[:90]
    except IndexError:
        return ""


if __name__ == "__main__":
    main()
