"""torch DCP on the universal format vs DCP's own FileSystemWriter / FileSystemReader.

One torchrun job (4 ranks, gloo, CPU) on one model state (``ucp.demo_dcp.TinyGPT`` at a
larger size, AdamW state initialised), sharded FSDP2 x4:

- ``dcp.save`` time: ``FileSystemWriter`` (the peer) vs ``ucp.dcp.UniversalWriter`` with its
  default chunking and with ``chunk_bytes=--chunk-kib`` ("fine"), all durable (fsync), each into
  a fresh directory, best of ``--repeat``; ratio to FileSystemWriter (aim <= 1.2).
- reshard load into each target layout (2-D dp2 x tp2, TP x4) of that same state:
  ``dcp.load`` from the FileSystemWriter checkpoint with ``FileSystemReader`` vs from each
  UniversalWriter checkpoint with ``UniversalReader``; time (max over ranks, best of
  ``--repeat``; warm: every file of the checkpoint read once just before each load, since
  UniversalWriter's O_DIRECT shard files are not left in the page cache by the save as
  FileSystemWriter's are; ``--cold``: page cache dropped before each load, root) and the speedup
  (aim >= 1.5x); bytes read / bytes needed per rank for both readers (aim <= 1.1 for ucp).
  FileSystemReader's bytes are the saved items it deserialises: it loads a whole saved chunk
  for every read request and narrows it (pytorch issue 76331).

Every load is checked: ``full_tensor()`` of a few parameters equals the saved state.

``--compare-with DIR``: the same job is also run with the ``ucp`` of another checkout (e.g.
``/work/main``), alternating launches, each launch measuring ``FileSystemWriter`` /
``FileSystemReader`` again: an A/B of two ucp versions in one run, each against the peer.

``--models``: one section per model size, ``HIDDENxFFN`` (default: the 571 MiB ``768x2048`` and the
~1.6 GB ``1536x4096``, both with saves and loads; ``:save``: saves only): per-array costs dominate the
small one, bytes the large one. Loads are timed and their CPU seconds (all ranks) shown.

Usage: python bench/bench_dcp.py [--models 768x2048,1536x4096] [--layers 4] [--vocab 16003]
       [--dir /tmp] [--repeat 2] [--cold] [--chunk-kib 1024] [--workers 0] [--reader-workers 0]
       [--compare-with DIR] [--out bench/results/dcp.txt]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import drop_caches, free_port, read_tree, record  # noqa: E402  (no ucp import: safe before the path below)

sys.path.insert(0, os.environ.get("UCP_BENCH_ROOT", str(ROOT)))   # the ucp under test (--compare-with)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="768x2048,1536x4096",
                    help="model sizes HIDDENxFFN, comma-separated, one section each; ':save': save rows only")
    ap.add_argument("--hidden", type=int, default=768, help=argparse.SUPPRESS)    # set per model (--models)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=2048, help=argparse.SUPPRESS)
    ap.add_argument("--save-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, default=16003)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each load (root)")
    ap.add_argument("--chunk-kib", type=int, default=1024, help="UniversalWriter chunk_bytes (KiB)")
    ap.add_argument("--workers", type=int, default=0,
                    help="threads per rank of UniversalWriter (0: its default, ucp.dcp.rank_threads)")
    ap.add_argument("--reader-workers", type=int, default=0,
                    help="threads per rank of UniversalReader (0: its default, ucp.dcp.rank_threads)")
    ap.add_argument("--compare-with", default=None, help="also run the job with the ucp of this checkout")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dcp.txt"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ============================================================================ worker (under torchrun)
def cpu_seconds() -> float:
    """User + system CPU of this process, all its threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn, cpu=False):
    """Max over ranks of ``fn``'s wall time; with ``cpu``: also the CPU seconds it took summed
    over the ranks (on a shared machine a steadier measure of the work done than the time).

    Every rank collects its garbage first (untimed), so that each call starts from the same
    collector state: the state dict built before each load leaves tens of thousands of new
    objects, and a full collection falling inside one call and not the next (0.1-0.15 CPU s a
    rank, walking torch's and the model's objects) decided more of a 0.5 s load than the reader
    did (rank 0 of a 2-D load: 0.33 CPU s against 0.15 on the other ranks, in the same call)."""
    import gc

    import torch.distributed as dist

    gc.collect()
    dist.barrier()
    c0, t0 = cpu_seconds(), time.perf_counter()
    fn()
    dt, dc = time.perf_counter() - t0, cpu_seconds() - c0
    got = [None] * dist.get_world_size()
    dist.all_gather_object(got, (dt, dc))
    wall = max(g[0] for g in got)
    return (wall, sum(g[1] for g in got)) if cpu else wall


#: the row of ``floor_reader``
FLOOR = "floor: 1 pread per byte"


def counting_fs_reader(path):
    """FileSystemReader that counts the saved bytes it deserialises (one whole item per request)."""
    from torch.distributed.checkpoint import FileSystemReader

    class Counting(FileSystemReader):
        bytes_read = 0
        bytes_needed = 0

        def read_data(self, plan, planner):
            for req in plan.items:
                if req.type.name == "TENSOR":
                    self.bytes_read += self.storage_data[req.storage_index].length
                    n = 1
                    for x in req.lengths:
                        n *= int(x)
                    self.bytes_needed += n * planner.resolve_tensor(req).element_size()
            return super().read_data(plan, planner)

    return Counting(path)


def fresh_state(cfg, layout):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from ucp.demo_dcp import build, optimizer, parallelize

    model = build(cfg, seed=1)
    parallelize(model, layout)
    opt = optimizer(model)
    msd, osd = get_state_dict(model, opt)     # initialises AdamW's state (zeros, step 0)
    return {"model": msd, "optim": osd}


def floor_reader(ucp_reader):
    """Not a reader: the floor under any reader of the universal checkpoint. DCP plans the load on
    UniversalReader's metadata as for a real load, then every tensor destination is filled by
    ``pread`` straight into it from the checkpoint's data files, read on from where the last
    destination stopped, a file after another (each rank starting at its own place in the list):
    each byte needed read once, never a byte twice, so that a cold run (``--cold``) reads the disk
    as much as a reader reading exactly what it needs. Warm: one kernel copy per byte needed. No
    index, checksum or tiling; values NOT loaded. A reader that reads what it needs and nothing
    more can come near this and not below it; the rows above it say how far each real reader is."""
    import torch
    import torch.distributed as dist

    class Floor(ucp_reader):
        @property
        def bytes_read(self):
            return self.bytes_needed        # it reads exactly the bytes of each destination

        def read_data(self, plan, planner):
            from torch.distributed.checkpoint.planner import LoadPlan
            from torch.futures import Future

            super().read_data(LoadPlan([r for r in plan.items if r.type.name != "TENSOR"]), planner)
            files = _DataFiles(self.path, *((dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)))
            try:
                for req in plan.items:
                    if req.type.name == "TENSOR":
                        target = planner.resolve_tensor(req).detach()
                        raw = memoryview(target.contiguous().reshape(-1).view(torch.uint8).numpy()) \
                            if target.numel() else b""
                        files.fill(raw)
                        self.bytes_needed += len(raw)
                        planner.commit_tensor(req, target)
            finally:
                files.close()
            fut = Future()
            fut.set_result(None)
            return fut

    return Floor


class _DataFiles:
    """The data files of a universal checkpoint read on, a file after another, each byte once
    (``floor_reader``); rank ``rank`` of ``world`` starts at its own place in the list."""

    def __init__(self, root, rank, world):
        paths = sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names if not n.endswith(".json"))
        k = rank * len(paths) // world
        self.paths, self.i, self.fd, self.off = paths[k:] + paths[:k], 0, None, 0

    def fill(self, raw) -> None:
        pos = 0
        while pos < len(raw):
            if self.fd is None:
                self.fd, self.off = os.open(self.paths[self.i % len(self.paths)], os.O_RDONLY), 0
                self.i += 1
            n = os.preadv(self.fd, [raw[pos:]], self.off)
            if n == 0:              # this file is used up
                self.close()
            pos, self.off = pos + n, self.off + n

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


#: checkpoint directory of each writer; each reader reads the one of the same name
DIRS = {"FileSystemWriter": "fs", "UniversalWriter": "ucp", "UniversalWriter fine": "ucp-fine"}
READS = {"FileSystemReader": "FileSystemWriter", "UniversalReader": "UniversalWriter",
         "UniversalReader fine": "UniversalWriter fine", FLOOR: "UniversalWriter"}


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    from ucp.dcp import UniversalReader, UniversalWriter
    from ucp.demo_dcp import GPTConfig

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    base = Path(args.worker)
    cfg = GPTConfig(vocab=args.vocab, hidden=args.hidden, heads=12 if args.hidden % 12 == 0 else 8,
                    kv_heads=4, ffn=args.ffn, layers=args.layers)
    sd = fresh_state(cfg, "fsdp")
    with torch.no_grad():                      # distinct values, so that a wrong slice cannot pass
        for i, t in enumerate(sd["model"].values()):
            t.to_local().copy_(torch.randn(t.to_local().shape, generator=torch.Generator().manual_seed(rank * 997 + i)))
    ref = {k: v.full_tensor() for k, v in list(sd["model"].items())[:6]}
    report = {"ranks": dist.get_world_size(), "save": {}, "save_cpu": {}, "load": {}, "load_avg": os.getloadavg()[0]}

    w = {"workers": args.workers} if args.workers else {}      # else the version's default
    writers = {"FileSystemWriter": lambda path: FileSystemWriter(path),
               "UniversalWriter": lambda path: UniversalWriter(path, **w),
               "UniversalWriter fine": lambda path: UniversalWriter(path, chunk_bytes=args.chunk_kib << 10, **w)}
    for _ in range(args.repeat):
        for name, make in writers.items():
            path = base / DIRS[name]
            if rank == 0:                    # each save into a fresh directory, cleared untimed
                shutil.rmtree(path, ignore_errors=True)
            t, c = timed(lambda: dcp.save(sd, storage_writer=make(path)), cpu=True)
            report["save"][name] = min(t, report["save"].get(name, t))
            report["save_cpu"][name] = min(c, report["save_cpu"].get(name, c))
    sd = None                                  # the save state is not needed by the loads
    for layout in () if args.save_only else ("2d", "tp"):
        report["load"][layout] = load_layout(args, cfg, layout, base, ref, counting_fs_reader, UniversalReader)
    if rank == 0:
        (base / "report.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def load_layout(args, cfg, layout, base, ref, fs_reader, ucp_reader) -> dict:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    out = {}
    for _ in range(args.repeat):
        for name, written_by in READS.items():
            sd = fresh_state(cfg, layout)
            path = base / DIRS[written_by]
            opts = {"workers": args.reader_workers} if args.reader_workers else {}   # else the version's default
            reader = fs_reader(path) if name == "FileSystemReader" else \
                floor_reader(ucp_reader)(path, **opts) if name == FLOOR else ucp_reader(path, **opts)
            if dist.get_rank() == 0:   # cold: nothing cached; warm: every file cached, whoever wrote it
                drop_caches() if args.cold else read_tree(path)
            dist.barrier()
            t, c = timed(lambda: dcp.load(sd, storage_reader=reader), cpu=True)
            for k, v in ref.items() if name != FLOOR else ():
                got = sd["model"][k]
                got = got.full_tensor() if hasattr(got, "full_tensor") else got
                if not torch.equal(got, v):
                    raise SystemExit(f"{name} {layout}: {k} differs from the saved state")
            ratios = [None] * dist.get_world_size()
            dist.all_gather_object(ratios, reader.bytes_read / max(1, reader.bytes_needed))
            prev = out.get(name)
            out[name] = {"time": min(t, prev["time"]) if prev else t, "read_over_need": ratios,
                         "cpu": min(c, prev["cpu"]) if prev else c}
    return out


# ============================================================================ driver
def main(argv=None) -> None:
    args = parse(argv)
    if args.worker:
        worker(args)
        return
    base = Path(tempfile.mkdtemp(prefix="ucp-bench-dcp-", dir=args.dir))
    roots = {"this checkout": ROOT}
    if args.compare_with:
        roots[f"{args.compare_with}"] = Path(args.compare_with).resolve()
    try:
        text = "\n".join(run_model(args, argv, roots, base, model) for model in args.models.split(","))
        print(text)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        record(args.out, text)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run_model(args, argv, roots: dict, base: Path, model: str) -> str:
    """The sections of one model size (``HIDDENxFFN[:save]``), every ucp version of ``roots``."""
    size, _, only = model.partition(":")
    hidden, ffn = (int(x) for x in size.split("x"))
    extra = ["--hidden", str(hidden), "--ffn", str(ffn)] + (["--save-only"] if only == "save" else [])
    margs = parse([*(argv if argv is not None else sys.argv[1:]), *extra])
    reps = {label: [] for label in roots}
    for i in range(args.repeat if len(roots) > 1 else 1):      # alternate the versions' launches
        for label, root in roots.items():
            job = base / f"{hidden}-{len(reps[label])}-{list(roots).index(label)}"
            job.mkdir()
            launch([*(argv if argv is not None else sys.argv[1:]), *extra], root, job,
                   repeat=1 if len(roots) > 1 else args.repeat)
            reps[label].append(json.loads((job / "report.json").read_text()))
            nbytes = sum(f.stat().st_size for f in (job / "fs").iterdir())
            shutil.rmtree(job, ignore_errors=True)
    return "\n".join(render(margs, best_of(r), nbytes, label if len(roots) > 1 else None)
                     for label, r in reps.items())


def launch(argv, root: Path, job: Path, repeat: int) -> None:
    """One torchrun job of this script's worker with the ucp of ``root``."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UCP_BENCH_ROOT": str(root),
           "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = [a for a in (argv if argv is not None else sys.argv[1:])]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_addr", "127.0.0.1",
           "--master_port", str(port), __file__, *args, "--repeat", str(repeat), "--worker", str(job)]
    subprocess.run(cmd, env=env, check=True)


def best_of(reports: list) -> dict:
    """Per measurement, the best time over the launches (read/need of that launch)."""
    out = reports[0]
    for r in reports[1:]:
        for name, t in r["save"].items():
            out["save"][name] = min(out["save"][name], t)
            out["save_cpu"][name] = min(out["save_cpu"][name], r["save_cpu"][name])
        for layout, readers in r["load"].items():
            for name, x in readers.items():
                cpu = min(x["cpu"], out["load"][layout][name]["cpu"])
                if x["time"] < out["load"][layout][name]["time"]:
                    out["load"][layout][name] = x
                out["load"][layout][name]["cpu"] = cpu
    return out


def render(args, rep, nbytes, label=None) -> str:
    s = rep["save"]
    fs = s["FileSystemWriter"]
    head = [f"## ucp of {label} (launches alternating with the other version's; best of {args.repeat})", ""] \
        if label else []
    lines = head + [f"# ucp DCP benchmark  TinyGPT hidden {args.hidden}, {args.layers} layers, ffn {args.ffn}, vocab "
             f"{args.vocab}; model + AdamW state {nbytes / 2**20:.0f} MiB (DCP files); saved from FSDP2 x4, "
             f"{rep['ranks']} ranks, gloo/CPU; loads {'cold (page cache dropped)' if args.cold else 'warm (files read just before)'}; "
             f"best of {args.repeat}; load average {rep.get('load_avg', 0.0):.1f} on {os.cpu_count()} cores",
             "# UniversalWriter: its default layout (since this session: one shard per saved FSDP2 box, inner "
             "chunks in column blocks; before: plain chunks aligned with the boxes); "
             f"'fine': chunk_bytes {args.chunk_kib} KiB, last dim in column blocks; UniversalWriter threads per rank: "
             f"{args.workers or 'the version default (since dcpsave2: ucp.dcp.rank_threads, as for reading; before: 4)'} "
             "(FileSystemWriter: its default, 1); UniversalReader threads per rank: "
             f"{args.reader_workers or 'the version default (ucp.dcp.rank_threads, named reader_threads before dcpsave2: the cores shared among the node ranks on local files; before that: 4)'}",
             "",
             "dcp.save FSDP2 x4 (durable)      seconds  vs FileSystemWriter (aim <= 1.2) | CPU s, all ranks  vs FSW"]
    cpu = rep["save_cpu"]
    for name, t in s.items():
        lines.append(f"{name:<32} {t:8.3f}  {t / fs:6.2f}x                           | {cpu[name]:16.3f}  "
                     f"{cpu[name] / cpu['FileSystemWriter']:5.2f}x")
    names = {"2d": "FSDP2 x4 -> 2-D dp2 x tp2", "tp": "FSDP2 x4 -> TP x4"}
    for layout, r in rep["load"].items():
        base, bcpu = r["FileSystemReader"]["time"], r["FileSystemReader"]["cpu"]
        lines += ["", f"dcp.load {names[layout]:<23} seconds  speedup vs FileSystemReader (aim >= 1.5) | "
                      "read/need worst   mean (aim <= 1.1) | CPU s, all ranks  vs FSR"]
        for name, x in r.items():
            ratios = x["read_over_need"]
            lines.append(f"{name + ' (' + DIRS[READS[name]] + ')':<32} {x['time']:8.3f}  {base / x['time']:6.2f}x"
                         f"                           | {max(ratios):15.3f}  {sum(ratios) / len(ratios):6.3f}"
                         f"            | {x['cpu']:16.3f}  {x['cpu'] / bcpu:5.2f}x")
    lines += ["", "# times: max over ranks of the dcp.* call (planning collectives included), best of the runs; CPU s: "
              "user + system CPU of that call summed over the ranks, least of the runs; read/need: bytes the "
              "reader read from storage / bytes of the rank's local tensors it filled (FileSystemReader: the saved "
              "items it deserialised whole, once per read request); " + FLOOR + ": not a reader, DCP's planning on "
              "UniversalReader's metadata and one pread per byte needed straight into each tensor (values not "
              "loaded): the floor under any reader of these bytes (bench_dcp.floor_reader)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
