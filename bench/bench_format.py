"""Benchmark of the universal format against raw numpy I/O and safetensors, on the same bytes.

    python bench/bench_format.py [--size-mb 256] [--small 2000] [--chunk-mb 4] [--shards 32/256,16/256,32/1024]
                                 [--dir DIR] [--reps 3] [--small-only]

Prints write and read throughput of large tensors (an fp32 one of --size-mb and a bf16 one of half
that) and of --small 4 KiB tensors, as ratios to numpy tofile(+fsync)/fromfile and to safetensors
save_file/load_file; reads are measured warm (page cache) and, when /proc/sys/vm/drop_caches is
writable, cold. The small tensors' process CPU time is printed too: under load it moves far less than
wall time (--small-only runs just that part and writes no results file unless --out is given;
bench/bench_small.py is the A/B of checkouts over many launches). Results go to stdout and
bench/results/format.txt.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import resource
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import record  # noqa: E402
from ucp.format import create_checkpoint, open_checkpoint  # noqa: E402

MiB = 1 << 20
LINES: list[str] = []


def say(s=""):
    print(s, flush=True)
    LINES.append(s)


def can_drop():
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
        return True
    except OSError:
        return False


def drop():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def best(fn, reps, before=None):
    ts = []
    for _ in range(reps):
        if before:
            before()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts), statistics.median(ts)


def cpu_best(fn, reps, before=None):
    """Least process CPU time (user + system, every thread) of ``reps`` runs: on a shared machine it
    moves far less than wall time, so A/B comparisons of the per-tensor work hold up under load."""
    ts = []
    for _ in range(reps):
        if before:
            before()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        fn()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        ts.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    return min(ts)


def rm(p):
    shutil.rmtree(p, ignore_errors=True)
    if os.path.isfile(p):
        os.unlink(p)


def bench_large(a, base, cold):
    """The large-tensor table (numpy, safetensors and every ucp layout on the same bytes)."""
    torch.manual_seed(0)
    n32 = a.size_mb * MiB // 4
    big = {"w32": torch.randn(n32 // 4096, 4096), "w16": torch.randn(n32 // 4096 // 2, 4096).bfloat16()}
    nbytes = sum(t.numel() * t.element_size() for t in big.values())
    say(f"\n## large tensors: fp32 {tuple(big['w32'].shape)} + bf16 {tuple(big['w16'].shape)} = {nbytes / MiB:.0f} MiB")
    for t in big.values():  # touch a ballast of output-sized memory so first-touch costs do not skew reads
        torch.empty_like(t).fill_(1)

    # numpy raw
    npdir = base / "np"

    def np_write():
        npdir.mkdir()
        for k, t in big.items():
            arr = t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
            with open(npdir / k, "wb") as f:
                arr.tofile(f)
                f.flush()
                os.fsync(f.fileno())

    def np_read():
        out = {}
        out["w32"] = np.fromfile(npdir / "w32", dtype=np.float32)
        out["w16"] = np.fromfile(npdir / "w16", dtype=np.uint16)
        return out

    from safetensors.torch import load_file, save_file

    stp = base / "st.safetensors"

    def st_write():
        save_file(big, str(stp))
        fd = os.open(stp, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)

    def st_read():  # load_file maps lazily: touch every page so the bytes are really read
        d = load_file(str(stp))
        for t in d.values():
            int(t.reshape(-1).view(torch.uint8)[::4096].sum())
        return d

    outs = {k: torch.from_numpy(np.empty(t.numel() * t.element_size(), np.uint8)).view(t.dtype).reshape(t.shape)
            for k, t in big.items()}
    for o in outs.values():
        o.view(torch.uint8).fill_(1)

    def np_readinto():
        for k in big:
            with open(npdir / k, "rb", buffering=0) as f:
                f.readinto(memoryview(outs[k].view(torch.uint8).numpy()).cast("B"))

    res = {}
    res["np_w"] = best(np_write, a.reps, lambda: (rm(npdir), os.sync()))[0]
    res["np_r"] = best(np_read, a.reps)[0]
    res["np_rc"] = best(np_read, a.reps, drop)[0] if cold else None
    res["np_ri"] = best(np_readinto, a.reps)[0]
    res["np_ric"] = best(np_readinto, a.reps, drop)[0] if cold else None
    res["st_w"] = best(st_write, a.reps, lambda: (rm(stp), os.sync()))[0]
    res["st_r"] = best(st_read, a.reps)[0]
    res["st_rc"] = best(st_read, a.reps, drop)[0] if cold else None

    def gbps(t):
        return nbytes / t / 1e9

    say(f"numpy tofile+fsync write {gbps(res['np_w']):6.2f}   fromfile warm {gbps(res['np_r']):6.2f}"
        + (f"   cold {gbps(res['np_rc']):6.2f}" if cold else ""))
    say(f"numpy readinto (prealloc)           into warm {gbps(res['np_ri']):6.2f}"
        + (f"   cold {gbps(res['np_ric']):6.2f}" if cold else ""))
    say(f"safetensors save+fsync  {gbps(res['st_w']):6.2f}   load_file warm {gbps(res['st_r']):6.2f}"
        + (f"   cold {gbps(res['st_rc']):6.2f}" if cold else "")
        + "   (warm load_file is a zero-copy mmap: pages are mapped, not copied, so /st warm is not a like-for-like ratio)")
    say(f"{'ucp config':30s} {'write':>6s} {'/np':>5s} {'/st':>5s} | {'warm rd':>7s} {'/np':>5s} {'/st':>5s}"
        + (f" | {'cold rd':>7s} {'/np':>5s} {'/st':>5s}" if cold else "")
        + f" | {'out= warm':>9s} {'/np':>5s}" + (f" {'cold':>5s} {'/np':>5s}" if cold else "")
        + " | read/need: row 1%  TP=4 cols")
    ck = base / "ucp"
    configs = [(f"plain chunk {int(c):2d} MiB", {"chunk_bytes": int(c) * MiB}, 4) for c in a.chunk_mb.split(",")]
    for i, sc in enumerate(a.shards.split(",") if a.shards else []):
        smb, ikb = (int(x) for x in sc.split("/"))
        configs.append((f"shard {smb:2d}M/{ikb:4d}K" + ("*" if (smb, ikb) == (32, 256) else ""),
                        {"shard_bytes": smb * MiB, "inner_bytes": ikb * 1024}, 4))
    configs += [("shard 32M/ 256K", {}, 1), ("shard 32M/ 256K", {}, 2)]
    for label, kw, workers in configs:
        def u_write():
            with create_checkpoint(ck, workers=workers, **kw) as w:
                for k, t in big.items():
                    w.write_tensor(k, "param", t)

        def u_read():
            c = open_checkpoint(ck, workers=workers)
            return [c.read(k) for k in big]

        tw = best(u_write, a.reps, lambda: (rm(ck), os.sync()))[0]
        tr = best(u_read, a.reps)[0]
        trc = best(u_read, a.reps, drop)[0] if cold else None
        def u_read_into():
            c = open_checkpoint(ck, workers=workers)
            for k in big:
                c.read(k, out=outs[k])

        tri = best(u_read_into, a.reps)[0]
        tric = best(u_read_into, a.reps, drop)[0] if cold else None
        c = open_checkpoint(ck)
        rows = big["w32"].shape[0]
        c.read("w32", index=slice(rows // 2, rows // 2 + max(1, rows // 100)))
        s = c.last_read_stats
        cols = big["w32"].shape[1]
        got_c = need_c = 0
        for r in range(4):  # a row-parallel TP=4 rank reads a column block
            c.read("w32", index=(slice(None), slice(r * cols // 4, (r + 1) * cols // 4)))
            got_c += c.last_read_stats["bytes_read"]
            need_c += c.last_read_stats["bytes_needed"]
        line = (f"{label:20s} {workers} worker{'s' if workers > 1 else ' '} "
                f"{gbps(tw):6.2f} {res['np_w'] / tw:5.2f} {res['st_w'] / tw:5.2f} | "
                f"{gbps(tr):7.2f} {res['np_r'] / tr:5.2f} {res['st_r'] / tr:5.2f}")
        if cold:
            line += f" | {gbps(trc):7.2f} {res['np_rc'] / trc:5.2f} {res['st_rc'] / trc:5.2f}"
        line += f" | {gbps(tri):9.2f} {res['np_ri'] / tri:5.2f}"
        if cold:
            line += f" {gbps(tric):5.2f} {res['np_ric'] / tric:5.2f}"
        line += f" | {s['bytes_read'] / s['bytes_needed']:.2f}x {got_c / need_c:.2f}x"
        say(line)
    got = open_checkpoint(ck).read("w16")
    assert torch.equal(got.view(torch.int16), big["w16"].view(torch.int16))
    # durability cost
    def u_write_nd():
        with create_checkpoint(ck, durable=False) as w:
            for k, t in big.items():
                w.write_tensor(k, "param", t)
    tnd = best(u_write_nd, a.reps, lambda: (rm(ck), os.sync()))[0]
    say("(* = the default layout)")
    say(f"default layout, durable=False {gbps(tnd):6.2f}  (no syncfs before the manifest; data may still be in page cache)")
    del big



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--chunk-mb", default="4", help="plain (unsharded) row-chunk sizes to compare")
    ap.add_argument("--shards", default="32/256,16/256,32/1024",
                    help="sharded configs: shard MiB / inner KiB (the first is the default layout)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir under /tmp)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None,
                    help="results file (default bench/results/format.txt; with --small-only: none, stdout only, so a "
                         "quick run does not replace the full figures)")
    ap.add_argument("--small-only", action="store_true",
                    help="only the small-tensor figures (bench/bench_small.py is the sturdier A/B of checkouts)")
    a = ap.parse_args()
    if a.out is None and not a.small_only:
        a.out = str(pathlib.Path(__file__).parent / "results" / "format.txt")
    base = pathlib.Path(a.dir or tempfile.mkdtemp(prefix="ucp-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    cold = can_drop()
    say(f"# ucp format benchmark  torch {torch.__version__}  cores {os.cpu_count()}  dir {base}  "
        f"cold reads: {'yes' if cold else 'no (drop_caches not writable)'}  load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cores")
    say(f"# best of {a.reps}; throughput in GB/s (1e9 B/s); ratio = ucp / baseline (higher is better)")
    if not a.small_only:
        bench_large(a, base, cold)
    from safetensors.torch import load_file, save_file

    # small tensors
    n = a.small
    small = {f"layers.{i // 8}.p{i % 8}.weight": torch.randn(1024) for i in range(n)}
    sbytes = n * 4096
    say(f"\n## {n} small tensors of 4 KiB ({sbytes / MiB:.1f} MiB)")
    spdir = base / "np_small"

    def nps_write():
        spdir.mkdir()
        for i, t in enumerate(small.values()):
            t.numpy().tofile(spdir / str(i))
        os.sync()

    def nps_read():
        return [np.fromfile(spdir / str(i), dtype=np.float32) for i in range(n)]

    sts = base / "small.safetensors"

    def sts_write():
        save_file(small, str(sts))
        os.sync()

    def sts_read():
        return load_file(str(sts))

    cks = base / "ucp_small"

    def us_write():
        with create_checkpoint(cks) as w:
            for k, t in small.items():
                w.write_tensor(k, "param", t)

    def us_read():
        c = open_checkpoint(cks)
        return [c.read(k) for k in c.params]

    r = {}
    for name, fn, before in [("np_w", nps_write, spdir), ("np_r", nps_read, None), ("st_w", sts_write, sts),
                             ("st_r", sts_read, None), ("u_w", us_write, cks), ("u_r", us_read, None)]:
        r[name] = best(fn, a.reps, (lambda p=before: (rm(p), os.sync())) if before else None)[0]
    say(f"numpy one file each (+sync)  write {r['np_w'] * 1e3 / n:.3f} ms/tensor   read {r['np_r'] * 1e3 / n:.3f} ms/tensor")
    say(f"safetensors one file         write {r['st_w'] * 1e3 / n:.3f} ms/tensor   read {r['st_r'] * 1e3 / n:.3f} ms/tensor")
    say(f"ucp (one array each)         write {r['u_w'] * 1e3 / n:.3f} ms/tensor   read {r['u_r'] * 1e3 / n:.3f} ms/tensor")
    say(f"ucp ratio (throughput)       write {r['np_w'] / r['u_w']:.2f}x numpy, {r['st_w'] / r['u_w']:.2f}x safetensors;"
        f"  read {r['np_r'] / r['u_r']:.2f}x numpy, {r['st_r'] / r['u_r']:.2f}x safetensors")
    t_open = best(lambda: open_checkpoint(cks), a.reps)[0]
    say(f"ucp open (manifest of {n} arrays): {t_open * 1e3:.1f} ms (best of {a.reps})")
    c_w = cpu_best(us_write, a.reps, lambda: (rm(cks), os.sync()))
    c_r = cpu_best(us_read, a.reps)
    c_o = cpu_best(lambda: open_checkpoint(cks), a.reps)
    say(f"ucp CPU time (process, best of {a.reps})  write {c_w * 1e3 / n:.3f} ms/tensor   read {c_r * 1e3 / n:.3f} "
        f"ms/tensor   open {c_o * 1e3:.1f} ms")
    if a.out:
        pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        record(a.out, "\n".join(LINES))
    if not a.dir:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
