"""Small-tensor A/B of several checkouts: process CPU time of write, open and read, over many launches.

    python bench/bench_small.py [--against REV_OR_DIR ...] [--launches 15] [--n 2000] [--reps 3]

On this shared 2-core VM the wall time of one launch differs from the next by up to 2x, more than a
20% change in the code. So each checkout (this one, plus every ``--against``: a directory holding a
checkout, or a git revision that is exported with ``git archive`` into a temporary directory) runs
``--launches`` fresh processes, alternating checkouts (AB, BA, AB, ... so drift hits both alike).
Each launch writes ``--n`` 4 KiB fp32 tensors, one array each (the write is timed once), then
measures, ``--reps`` times, the process CPU time (``time.process_time``: user + system of every thread, so the writer and reader
threads count; waiting on the disk does not) of:

- write: ``create_checkpoint`` + ``write_tensor`` of every tensor + commit, per tensor;
- open: ``open_checkpoint`` (manifest read and every hostile-input check), per checkpoint; "open 1st"
  is the launch's first open, with the per-geometry caches still empty;
- read: ``read`` of every tensor of an opened checkpoint (open not included), per tensor;
- load: open + read of every tensor, per tensor (what ``bench_format.py`` calls read).

A launch keeps the least of its reps (write: its one run); printed are the MEDIAN and the interquartile range (IQR) over
launches, and each checkout's median over the first one's. The child uses only the public API that
every version has (``create_checkpoint``, ``write_tensor``, ``open_checkpoint``, ``params``,
``read``), so it runs the pre-format-v2 code (6a5af76) too. Results: stdout and
bench/results/small.txt.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve()
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
from _common import record  # noqa: E402  (standard library only: no ucp before --root picks one)
PHASES = [("write", "write ms/tensor", 1e3), ("open_first", "open 1st ms", 1e3), ("open", "open ms", 1e3),
          ("read", "read ms/tensor", 1e3), ("load", "load ms/tensor", 1e3)]


def child(a):
    """One launch: import the checkout's ucp from ``--root`` and print the least CPU time of each phase."""
    sys.path.insert(0, a.root)
    import torch

    import ucp
    from ucp.format import create_checkpoint, open_checkpoint
    if not pathlib.Path(ucp.__file__).resolve().is_relative_to(pathlib.Path(a.root).resolve()):
        raise SystemExit(f"imported {ucp.__file__}, not the checkout under {a.root}")
    torch.manual_seed(0)
    n = a.n
    small = {f"layers.{i // 8}.p{i % 8}.weight": torch.randn(1024) for i in range(n)}
    base = pathlib.Path(tempfile.mkdtemp(prefix="ucp-small-", dir=a.dir))
    ck = base / "ck"
    clock = time.process_time

    def write():
        shutil.rmtree(ck, ignore_errors=True)
        t0 = clock()
        with create_checkpoint(ck) as w:
            for k, t in small.items():
                w.write_tensor(k, "param", t)
        return clock() - t0

    def open_():
        t0 = clock()
        open_checkpoint(ck)
        return clock() - t0

    def read():
        c = open_checkpoint(ck)
        names = c.params
        t0 = clock()
        for k in names:
            c.read(k)
        return clock() - t0

    def load():
        t0 = clock()
        c = open_checkpoint(ck)
        for k in c.params:
            c.read(k)
        return clock() - t0

    try:
        out = {"write": write() / n}  # once per launch: the slowest phase, and not the one under study
        out["open_first"] = open_()
        out["open"] = min([out["open_first"]] + [open_() for _ in range(a.reps - 1)])
        out["read"] = min(read() for _ in range(a.reps)) / n
        out["load"] = min(load() for _ in range(a.reps)) / n
        got = open_checkpoint(ck)
        if sorted(got.params) != sorted(small) or not all(torch.equal(got.read(k), t) for k, t in small.items()):
            raise SystemExit("read back differs from what was written")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print("RESULT " + json.dumps(out), flush=True)


def checkout(spec, tmp) -> tuple[str, pathlib.Path]:
    """``(label, directory)`` of ``--against``: a directory as is, a git revision exported into ``tmp``."""
    p = pathlib.Path(spec)
    if p.is_dir():
        return spec, p.resolve()
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", spec], check=True,
                         capture_output=True, text=True).stdout.strip()
    d = pathlib.Path(tmp) / rev
    d.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(d)], input=archive, check=True)
    return f"{spec} ({rev})" if rev != spec else rev, d


def launch(root, a) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(HERE), "--child", "--root", str(root), "--n", str(a.n), "--reps", str(a.reps)]
    if a.dir:
        cmd += ["--dir", a.dir]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode or not lines:
        raise SystemExit(f"launch in {root} failed (rc {r.returncode}):\n{r.stdout}\n{r.stderr}")
    return json.loads(lines[-1][len("RESULT "):])


def quartiles(xs):
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return med, q1, q3


def report(labels, runs, a, load_before, load_after) -> list[str]:
    out = [f"# bench_small: {a.n} tensors of 4 KiB, {a.launches} launches per checkout (alternating), "
           f"least of {a.reps} reps per launch (write: 1); process CPU time, MEDIAN [IQR q1..q3] over launches",
           f"# load average before {load_before}, after {load_after} (CPU time moves far less than wall "
           "time under load, but a loaded cache still slows it)"]
    for i, lab in enumerate(labels):
        out.append(f"# [{i}] {lab}")
    head = f"{'phase':<16}" + "".join(f"{'[%d] median [IQR]' % i:>28}" for i in range(len(labels)))
    out.append(head + "".join(f"{'[%d]/[0]' % i:>10}" for i in range(1, len(labels))))
    for key, name, scale in PHASES:
        meds = []
        row = f"{name:<16}"
        for lab in labels:
            med, q1, q3 = quartiles([r[key] * scale for r in runs[lab]])
            meds.append(med)
            row += f"{med:>10.3f} [{q1:.3f}..{q3:.3f}]".rjust(28)
        row += "".join(f"{m / meds[0]:>9.2f}x" for m in meds[1:])
        out.append(row)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", action="append", default=[], help="another checkout: a directory or a git revision")
    ap.add_argument("--launches", type=int, default=15)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                    help="where the checkpoints are written (default /dev/shm: no disk waits between the CPU "
                         "figures; a launch takes seconds, not a minute, on the shared disk)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "small.txt"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    with tempfile.TemporaryDirectory(prefix="ucp-bench-small-") as tmp:
        roots = [("this checkout " + subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                                     capture_output=True, text=True).stdout.strip(), ROOT)]
        roots += [checkout(s, tmp) for s in a.against]
        labels = [lab for lab, _ in roots]
        runs = {lab: [] for lab in labels}
        before = " ".join(f"{x:.2f}" for x in os.getloadavg())
        for i in range(a.launches):
            for lab, root in (roots if i % 2 == 0 else roots[::-1]):
                runs[lab].append(launch(root, a))
            print(f"launch {i + 1}/{a.launches} done", file=sys.stderr, flush=True)
        after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = report(labels, runs, a, before, after)
    print("\n".join(lines))
    pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    record(a.out, "\n".join(lines))


if __name__ == "__main__":
    main()
