"""`ucp convert --from deepspeed` against DeepSpeed's own `ds_to_universal` on the same ZeRO
checkpoint, in one run, with `cp -r` of the same bytes as the floor.

The checkpoint is made by real DeepSpeed (tests/dist/ds_train.py, CPU, gloo, one AdamW step)
for a Llama-shaped model of the given size. Printed: wall time, ratio to `cp -r`, the speed-up
of ucp over ds_to_universal, and the peak RSS of each tool's process tree (measured by a
wrapper process per tool, so one tool's peak never counts for the other) against the size of
the largest parameter's fp32 state.

``--against REF`` (e.g. ``main``) also times ``ucp convert`` of git revision REF (exported
with ``git archive`` into the bench's temporary folder) on the same checkpoint in the same run,
for an A/B comparison on a loaded machine. The fixed base (the interpreter with torch and ucp
imported, no conversion) is measured too, so that the memory the conversion itself adds shows.

Usage: python bench/bench_deepspeed.py [--hidden 512] [--layers 8] [--vocab 32003]
                                       [--stage 3] [--dtype bf16] [--ranks 2] [--dir /tmp]
                                       [--against main]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port  # noqa: E402  (no ucp import: the ucp under test is chosen per job)

ROOT = Path(__file__).resolve().parents[1]
ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "0", "PYTHONPATH": str(ROOT),
       "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "ucp-torch-extensions")}
#: runs argv, then prints the peak RSS (KiB) of everything it waited for
WRAPPER = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
           "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def timed(cmd: list[str], root: Path = ROOT) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of ``cmd`` and its children, files synced. ucp is imported from
    ``root``: it is also the working directory, which ``python -m`` puts first on ``sys.path``."""
    os.sync()
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], check=True, capture_output=True, text=True,
                         env={**os.environ, **ENV, "PYTHONPATH": str(root)}, cwd=root)
    os.sync()
    return time.perf_counter() - t0, int(out.stdout.split()[-1]) / 1024


def size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2 ** 20


def make_checkpoint(a, base: Path) -> Path:
    cfg = {"hidden_size": a.hidden, "num_hidden_layers": a.layers, "vocab_size": a.vocab,
           "intermediate_size": a.hidden * 8 // 3, "num_attention_heads": 8, "num_key_value_heads": 2}
    out = base / "ds"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={a.ranks}",
                    "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                    str(ROOT / "tests" / "dist" / "ds_train.py"), "--out", str(out), "--stage", str(a.stage),
                    "--dtype", a.dtype, "--steps", "1", "--config", json.dumps(cfg)],
                   check=True, env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32003)
    ap.add_argument("--stage", type=int, default=3)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--against", default=None, help="git revision whose ucp convert is timed too (A/B)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "deepspeed.txt"))
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="ucp-bench-ds-", dir=a.dir))
    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    try:
        ck = make_checkpoint(a, base)
        tag = ck / (ck / "latest").read_text().strip()
        largest = 4 * a.vocab * a.hidden / 2 ** 20
        say(f"# DeepSpeed ZeRO-{a.stage} {a.dtype} checkpoint, {a.ranks} ranks, hidden {a.hidden}, {a.layers} layers, "
            f"vocab {a.vocab}: {size_mib(tag):.0f} MiB; largest parameter fp32 {largest:.0f} MiB")
        cp = timed(["bash", "-c", f"cp -r {tag} {base / 'copy'} && sync"])
        runs = [("cp -r + sync (same bytes)", cp),
                ("python: import torch + ucp (no work)", timed([sys.executable, "-c", "import torch, ucp.cli"]))]
        ucp = timed([sys.executable, "-m", "ucp", "convert", str(ck), str(base / "ucp"), "--from", "deepspeed"])
        runs.append(("ucp convert --from deepspeed", ucp))
        if a.against:
            old = base / "against"
            old.mkdir()
            subprocess.run(f"git -C {ROOT} archive {a.against} | tar -x -C {old}", shell=True, check=True)
            runs.append((f"ucp convert ({a.against})", timed([sys.executable, "-m", "ucp", "convert", str(ck),
                                                                str(base / "ucp-old"), "--from", "deepspeed"], old)))
        ds = timed([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag),
                    "--output_folder", str(base / "ds_universal")])
        runs.append(("python -m ...ds_to_universal (defaults)", ds))
        say(f"{'run':40s} {'seconds':>8s} {'vs cp':>7s} {'peak RSS MiB':>13s}")
        for name, (sec, rss) in runs:
            say(f"{name:40s} {sec:8.2f} {cp[0] / sec:6.2f}x {rss:13.0f}")
        base_rss = runs[1][1][1]
        say(f"# ucp convert is {ds[0] / ucp[0]:.2f}x faster than ds_to_universal; peak RSS "
            f"{ucp[1]:.0f} vs {ds[1]:.0f} MiB ({ucp[1] / largest:.1f}x vs {ds[1] / largest:.1f}x the largest "
            f"parameter's fp32 size). Both include interpreter and import start-up.")
        say(f"# memory the conversion adds to the bare interpreter with torch ({base_rss:.0f} MiB): "
            f"{ucp[1] - base_rss:.0f} MiB = {(ucp[1] - base_rss) / largest:.1f}x the largest parameter's fp32 size")
        if a.against:
            old_sec, old_rss = runs[3][1]
            say(f"# against {a.against} in the same run: {old_sec / ucp[0]:.2f}x faster, peak RSS {ucp[1]:.0f} vs "
                f"{old_rss:.0f} MiB")
        Path(a.out).write_text("\n".join(lines) + "\n")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
