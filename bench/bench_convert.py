"""Conversion of a rank-files checkpoint to the universal form, against a raw copy of the
same bytes, with 1 process and with torchrun (2 processes), in one run.

Printed: wall time, throughput, ratio to `cp -r` of the source directory followed by `sync`
(the floor: the same bytes read and written once), and peak RSS of the converting process(es)
against the size of the largest tensor.

Usage: python bench/bench_convert.py [--hidden 2048] [--layers 4] [--dir /tmp]
"""
from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import drop_caches, free_port, record  # noqa: E402
from bench_reshard import best_of, llama_shapes, machine_load, model_args  # noqa: E402
from ucp.demo import DEMO_SPEC  # noqa: E402
from ucp.targets.ranks import save_ranks  # noqa: E402


def run(cmd, reps=1, out=None) -> tuple[float, float]:
    """(best seconds of ``reps`` runs, peak RSS in MiB of the children) of a command; before each
    run the page cache is dropped and ``out`` (the command's destination) removed, untimed."""

    def before():
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)
        drop_caches()

    def once():  # a callable cmd gives a fresh command line per run (a new torchrun port)
        subprocess.run(cmd() if callable(cmd) else cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
        os.sync()

    dt, _ = best_of(once, reps, before)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return dt, peak / 1024


def main():
    a = model_args("convert.txt")
    base = Path(tempfile.mkdtemp(prefix="ucp-bench-convert-", dir=a.dir))
    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    try:
        shapes = llama_shapes(a.hidden, a.layers, a.vocab, a.inter)
        g = torch.Generator().manual_seed(0)
        states = {"param": {n: torch.randn(s, generator=g) for n, s in shapes.items()}}
        nbytes = sum(t.numel() * 4 for t in states["param"].values())
        largest = max(t.numel() * 4 for t in states["param"].values())
        src = base / "src"
        save_ranks(states, src, spec_text=DEMO_SPEC, degrees={"tp": 2, "dp": 2})
        del states
        say(f"# ucp convert benchmark: {nbytes / 2**20:.0f} MiB fp32 in 4 rank files (TP=2 x ZeRO-3 DP=2), "
            f"largest tensor {largest / 2**20:.0f} MiB; cold page cache before each run; best of {a.reps}; "
            f"{machine_load()}")
        say(f"{'run':34s} {'seconds':>8s} {'GB/s':>6s} {'vs cp':>6s} {'peak RSS MiB':>13s}")
        t_cp, _ = run(["cp", "-r", str(src), str(base / "copy")], a.reps, base / "copy")
        say(f"{'cp -r + sync (same bytes)':34s} {t_cp:8.2f} {nbytes / t_cp / 1e9:6.2f} {1.0:6.2f}x {'-':>13s}")
        t_imp, _ = run([sys.executable, "-c", "import torch, ucp.cli, ucp.engine, ucp.sources.ranks, ucp.format, ucp.lang"],
                       a.reps)
        say(f"{'python start + import torch, ucp':34s} {t_imp:8.2f} {'':>6s} {'':>6s}  {'-':>13s}")
        t1, rss1 = run([sys.executable, "-m", "ucp", "convert", str(src), str(base / "u1"), "-q"], a.reps, base / "u1")
        say(f"{'ucp convert, 1 process':34s} {t1:8.2f} {nbytes / t1 / 1e9:6.2f} {t_cp / t1:6.2f}x {rss1:13.0f}")
        t2, rss2 = run(lambda: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                        "-m", "ucp", "convert", str(src), str(base / "u2"), "-q"], a.reps, base / "u2")
        say(f"{'torchrun -m ucp convert, 2 procs':34s} {t2:8.2f} {nbytes / t2 / 1e9:6.2f} {t_cp / t2:6.2f}x "
            f"{rss2:13.0f}")
        say(f"# without interpreter start-up, 1 process converts at {nbytes / (t1 - t_imp) / 1e9:.2f} GB/s, "
            f"{t_cp / (t1 - t_imp):.2f}x cp")
        say(f"# 2 processes / 1 process: {t1 / t2:.2f}x (2 cores and one disk here: scale-out is for many "
            f"nodes; torchrun adds its own start-up). Peak RSS is the largest child; rank files are "
            f"memory-mapped, so resident pages of the source count.")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    record(a.out, "\n".join(lines))


if __name__ == "__main__":
    main()
