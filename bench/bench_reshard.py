"""Resharded loads from a universal checkpoint: bytes read per target rank, and time.

For a Llama-shaped model stored once in the universal form, every rank of several target
layouts (tensor parallel, FSDP2, ZeRO-3 flat partitions) fills its local tensors through the
planner (``ucp.plan``) and ``Checkpoint.read_box``. Printed per layout, in one run:

- bytes read ÷ bytes needed for the worst and the mean rank (1.00 = exactly what it needs);
- load time of one rank with resharding, against the naive loader that reads every full
  tensor and narrows it (what a consolidated-file loader does), as a ratio;
- the same bytes read with plain numpy ``fromfile`` of a raw copy, as the I/O floor.

Usage: python bench/bench_reshard.py [--hidden 2048] [--layers 4] [--dir /tmp]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import drop_caches, record  # noqa: E402,F401  (also imported from here by bench_convert)

import ucp  # noqa: E402
from ucp.format import create_checkpoint  # noqa: E402
from ucp.engine import bind_layout  # noqa: E402
from ucp.plan import mesh_coords  # noqa: E402


def llama_shapes(hidden, layers, vocab, inter, kv_ratio=4):
    kv = hidden // kv_ratio
    s = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        s[p + "self_attn.q_proj.weight"] = (hidden, hidden)
        s[p + "self_attn.k_proj.weight"] = (kv, hidden)
        s[p + "self_attn.v_proj.weight"] = (kv, hidden)
        s[p + "self_attn.o_proj.weight"] = (hidden, hidden)
        s[p + "mlp.gate_proj.weight"] = (inter, hidden)
        s[p + "mlp.up_proj.weight"] = (inter, hidden)
        s[p + "mlp.down_proj.weight"] = (hidden, inter)
        s[p + "input_layernorm.weight"] = (hidden,)
        s[p + "post_attention_layernorm.weight"] = (hidden,)
    s["model.norm.weight"] = (hidden,)
    s["lm_head.weight"] = (vocab, hidden)
    return s


def machine_load() -> str:
    """The 1-minute load average against the core count: timings on a shared machine only
    compare within one run (hence the ratios), and this says how shared it was."""
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def model_args(result_name: str) -> argparse.Namespace:
    """The Llama-shaped model size and output options shared by the benchmarks."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--inter", type=int, default=5632)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--reps", type=int, default=3, help="timed figures are the best of this many runs")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / result_name))
    return ap.parse_args()


def best_of(fn, reps, before=None):
    """(shortest wall time of ``reps`` calls of ``fn``, its last result); ``before()`` runs untimed
    ahead of each call (drop the page cache, remove the last output)."""
    times, out = [], None
    for _ in range(max(1, reps)):
        if before is not None:
            before()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def rank_plan(spec_name, shapes, degrees, coords):
    return bind_layout(spec_name, list(shapes), degrees).rank_fragments(shapes, coords)


def load_rank(ck, spec_name, degrees, coords):
    """Fill one rank's local tensors with ucp.load_rank; return (bytes read, bytes needed)."""
    before = ck.bytes_read
    local = ucp.load_rank(ck, spec_name, degrees, coords)
    need = sum(t.numel() * t.element_size() for t in local["param"].values())
    return ck.bytes_read - before, need


def naive_rank(ck, frags):
    """Read every full tensor the rank touches, then narrow it."""
    got = 0
    for name in dict.fromkeys(f.name for f in frags):
        t = ck.read(name, "param")
        got += t.numel() * t.element_size()
        del t
    return got


def main():
    a = model_args("reshard.txt")
    base = Path(tempfile.mkdtemp(prefix="ucp-bench-reshard-", dir=a.dir))
    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    try:
        shapes = llama_shapes(a.hidden, a.layers, a.vocab, a.inter)
        total = sum(int(np.prod(s)) * 4 for s in shapes.values())
        g = torch.Generator().manual_seed(0)
        uni = base / "uni"
        raw = base / "raw"
        raw.mkdir()
        t0 = time.perf_counter()
        with create_checkpoint(uni) as w:
            for n, s in shapes.items():
                t = torch.randn(s, generator=g)
                w.add_param(n)
                w.write_tensor(n, "param", t)
                t.numpy().tofile(raw / n)
        t_write = time.perf_counter() - t0
        ck = ucp.open(uni)
        chunks = ck.array_info("model.layers.0.self_attn.o_proj.weight", "param").chunks
        cold = drop_caches()
        say(f"# ucp reshard benchmark  {total / 2**20:.0f} MiB fp32 Llama-shaped (hidden {a.hidden}, "
            f"{a.layers} layers, vocab {a.vocab})  o_proj chunks {list(chunks)}  cold: {'yes' if cold else 'no'}")
        say(f"# written in {t_write:.2f} s; reads below are {'cold (page cache dropped)' if cold else 'warm'}, "
            f"times best of {a.reps}; {machine_load()}")
        say(f"{'layout':28s} {'ranks':>5s} {'read/need worst':>16s} {'mean':>6s} | "
            f"{'rank0 load s':>12s} {'naive s':>8s} {'speedup':>7s} | {'raw fromfile s':>14s} {'ucp/raw':>7s}")
        layouts = [("torch_tp", {"tp": 2}), ("torch_tp", {"tp": 4}), ("torch_fsdp2", {"dp": 4}),
                   ("deepspeed_zero3", {"dp": 4}), ("torch_fsdp2_tp", {"dp": 2, "tp": 2})]
        for spec_name, deg in layouts:
            ratios = []
            plans = [rank_plan(spec_name, shapes, deg, c) for c in mesh_coords(deg)]
            for coords in mesh_coords(deg):
                ck = ucp.open(uni)
                got, need = load_rank(ck, spec_name, deg, coords)
                ratios.append(got / max(need, 1))
            # timed (best of --reps): rank 0 resharded vs naive, both cold when possible
            t_res, (got, need) = best_of(lambda: load_rank(ucp.open(uni), spec_name, deg, mesh_coords(deg)[0]),
                                         a.reps, drop_caches)
            t_naive, _ = best_of(lambda: naive_rank(ucp.open(uni), plans[0]), a.reps, drop_caches)
            # raw floor: numpy reads exactly the bytes ucp read for rank 0, as whole files
            names = list(dict.fromkeys(f.name for f in plans[0]))
            t_raw_full, _ = best_of(lambda: [np.fromfile(raw / n, dtype=np.float32) for n in names],
                                    a.reps, drop_caches)
            full_bytes = sum(int(np.prod(shapes[n])) * 4 for n in dict.fromkeys(f.name for f in plans[0]))
            t_raw = t_raw_full * got / full_bytes
            say(f"{spec_name + ' ' + ','.join(f'{k}={v}' for k, v in deg.items()):28s} {len(plans):5d} "
                f"{max(ratios):16.3f} {sum(ratios) / len(ratios):6.3f} | {t_res:12.3f} {t_naive:8.3f} "
                f"{t_naive / t_res:6.2f}x | {t_raw:14.3f} {t_raw / t_res:6.2f}x")
        say("# read/need: bytes ucp read from storage / bytes the rank's local tensors hold;"
            " speedup = naive (read full tensors, narrow) / resharded;"
            " raw = numpy fromfile time scaled to the bytes ucp read (the I/O floor), ucp/raw = its throughput ratio")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    record(a.out, "\n".join(lines))


if __name__ == "__main__":
    main()
