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

``--size GIB`` picks the hidden size (a multiple of 64) whose checkpoint is closest to GIB GiB at
the given layers and vocabulary, since fixed start-up cost (the interpreter with torch imported)
dominates small checkpoints; ``--checkpoint DIR`` reuses a DeepSpeed save folder made earlier
(e.g. by ``--keep``) instead of training one.

Usage: python bench/bench_deepspeed.py [--hidden 512 | --size 2] [--layers 8] [--vocab 32003]
                                       [--stage 3] [--dtype bf16] [--ranks 2] [--dir /tmp]
                                       [--against main] [--keep | --checkpoint DIR]
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


def raw_copy(src: str, dst: str) -> None:
    """Copy every file of folder ``src`` into a new folder ``dst`` with pread + pwrite through one
    reused 64 MiB buffer: the least work any converter that moves the bytes through user space
    does (``cp`` copies inside the kernel with copy_file_range instead). Timed as its own process."""
    import numpy as np

    buf = np.empty(64 << 20, dtype=np.uint8)
    os.makedirs(dst)
    for name in sorted(os.listdir(src)):
        fi = os.open(os.path.join(src, name), os.O_RDONLY)
        fo = os.open(os.path.join(dst, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        size = os.fstat(fi).st_size
        for at in range(0, size, len(buf)):
            view = buf[:min(len(buf), size - at)]
            assert os.preadv(fi, [view], at) == len(view) and os.pwrite(fo, view, at) == len(view)
        os.close(fi)
        os.close(fo)


def size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2 ** 20


def free_port() -> int:
    """A free port per job: DeepSpeed's CPU shared-memory allreduce names its buffers by it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def n_params(hidden: int, layers: int, vocab: int) -> int:
    """Parameters of the bench's Llama shape (untied embeddings, 8 heads, 2 KV heads, SwiGLU)."""
    inter = hidden * 8 // 3
    per_layer = 2 * hidden * hidden + 2 * hidden * hidden // 4 + 3 * hidden * inter + 2 * hidden
    return 2 * vocab * hidden + layers * per_layer + hidden


def hidden_for(gib: float, layers: int, vocab: int) -> int:
    """The hidden size (multiple of 64) whose ZeRO checkpoint (fp32 master + two Adam moments,
    12 bytes per parameter) is closest to ``gib`` GiB."""
    return min(range(64, 16384, 64), key=lambda h: abs(12 * n_params(h, layers, vocab) - gib * 2 ** 30))


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
    ap.add_argument("--size", type=float, default=None, help="checkpoint size in GiB (sets --hidden)")
    ap.add_argument("--checkpoint", default=None, help="reuse this DeepSpeed save folder (no training)")
    ap.add_argument("--keep", action="store_true", help="keep the trained checkpoint (its path is printed)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32003)
    ap.add_argument("--stage", type=int, default=3)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--against", default=None, help="git revision whose ucp convert is timed too (A/B)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "deepspeed.txt"))
    a = ap.parse_args()
    if a.size is not None:
        a.hidden = hidden_for(a.size, a.layers, a.vocab)
    base = Path(tempfile.mkdtemp(prefix="ucp-bench-ds-", dir=a.dir))
    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    try:
        ck = Path(a.checkpoint) if a.checkpoint else make_checkpoint(a, base)
        tag = ck / (ck / "latest").read_text().strip()
        largest = 4 * a.vocab * a.hidden / 2 ** 20
        say(f"# DeepSpeed ZeRO-{a.stage} {a.dtype} checkpoint, {a.ranks} ranks, hidden {a.hidden}, {a.layers} layers, "
            f"vocab {a.vocab}: {size_mib(tag):.0f} MiB; largest parameter fp32 {largest:.0f} MiB"
            + (" (reused checkpoint)" if a.checkpoint else ""))
        cp = timed(["bash", "-c", f"cp -r {tag} {base / 'copy'} && sync"])
        runs = [("cp -r + sync (same bytes)", cp),
                ("python pread+pwrite + sync (same bytes)", timed([sys.executable, str(Path(__file__).resolve()), "--raw-copy",
                                                                   str(tag), str(base / "raw")])),
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
        base_rss = runs[2][1][1]
        say(f"# ucp convert is {ds[0] / ucp[0]:.2f}x faster than ds_to_universal; peak RSS "
            f"{ucp[1]:.0f} vs {ds[1]:.0f} MiB ({ucp[1] / largest:.1f}x vs {ds[1] / largest:.1f}x the largest "
            f"parameter's fp32 size). Both include interpreter and import start-up.")
        say(f"# memory the conversion adds to the bare interpreter with torch ({base_rss:.0f} MiB): "
            f"{ucp[1] - base_rss:.0f} MiB = {(ucp[1] - base_rss) / largest:.1f}x the largest parameter's fp32 size")
        if a.against:
            old_sec, old_rss = runs[4][1]
            say(f"# against {a.against} in the same run: {old_sec / ucp[0]:.2f}x faster, peak RSS {ucp[1]:.0f} vs "
                f"{old_rss:.0f} MiB")
        Path(a.out).write_text("\n".join(lines) + "\n")
    finally:
        if a.keep and not a.checkpoint:
            kept = base.with_name(base.name + "-checkpoint")
            (base / "ds").rename(kept)
            print(f"# checkpoint kept at {kept} (rerun with --checkpoint {kept})")
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--raw-copy"]:
        raw_copy(*sys.argv[2:4])
    else:
        main()
