"""`ucp convert --from deepspeed` against DeepSpeed's own `ds_to_universal` on the same ZeRO
checkpoint, in one run, with `cp -r` of the same bytes as the floor.

The checkpoint is made by real DeepSpeed (tests/dist/ds_train.py, CPU, gloo, one AdamW step)
for a Llama-shaped model of the given size. Printed: wall time, ratio to `cp -r`, the speed-up
of ucp over ds_to_universal, and the peak RSS of each tool's process tree (measured by a
wrapper process per tool, so one tool's peak never counts for the other) against the size of
the largest parameter's fp32 state.

``--against REF`` (e.g. ``main``) also times ``ucp convert`` of git revision REF (exported
with ``git archive`` into the bench's temporary folder) on the same checkpoint in the same run,
for an A/B comparison on a loaded machine. The fixed bases (the interpreter with ucp's modules
imported, no conversion; and with torch imported, the floor of any tool that reads DeepSpeed's
files through torch) are measured too, so that the time and memory the conversion itself adds show.

``--size GIB`` picks the hidden size (a multiple of 64) whose checkpoint is closest to GIB GiB at
the given layers and vocabulary, since fixed start-up cost (the interpreter and its imports)
dominates small checkpoints; ``--checkpoint DIR`` reuses a DeepSpeed save folder made earlier
(e.g. by ``--keep``; the model sizes it was trained with are read from its ``bench_model.json``)
instead of training one.

Usage: python bench/bench_deepspeed.py [--hidden 512 | --size 2] [--layers 8] [--vocab 32003]
                                       [--stage 3] [--dtype bf16] [--ranks 2] [--dir /tmp]
                                       [--against main] [--keep | --checkpoint DIR]
                                       [--repeat 3] [--repeat-ds]
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
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, record  # noqa: E402  (no ucp import: the ucp under test is chosen per job)

ROOT = Path(__file__).resolve().parents[1]
ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "0", "PYTHONPATH": str(ROOT),
       "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "ucp-torch-extensions")}
#: runs argv, then prints the peak RSS (KiB) and the user + system CPU seconds of everything it waited for
WRAPPER = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
           "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
           "u = resource.getrusage(resource.RUSAGE_CHILDREN); print(u.ru_maxrss, u.ru_utime + u.ru_stime)")


#: the start-up rows: what ``ucp convert --from deepspeed`` imports (not torch), and what any tool
#: that reads DeepSpeed's files with torch imports first
UCP_BARE = "python: import ucp's modules (no work)"
TORCH_BARE = "python: import torch (no work)"
UCP_IMPORTS = "import ucp.cli, ucp.engine, ucp.format, ucp.sources.deepspeed"


class Run(NamedTuple):
    seconds: float      # wall clock, files synced
    rss_mib: float      # peak RSS of the process tree
    cpu: float          # user + system CPU seconds: steadier than wall time on a loaded machine


def timed(cmd: list[str], root: Path = ROOT) -> Run:
    """Wall time, peak RSS and CPU of ``cmd`` and its children, files synced. ucp is imported from
    ``root``: it is also the working directory, which ``python -m`` puts first on ``sys.path``."""
    os.sync()
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], check=True, capture_output=True, text=True,
                         env={**os.environ, **ENV, "PYTHONPATH": str(root)}, cwd=root)
    os.sync()
    rss, cpu = out.stdout.split()[-2:]
    return Run(time.perf_counter() - t0, int(rss) / 1024, float(cpu))


def best(runs: list[Run]) -> Run:
    """Best of repeated runs: least wall time, least CPU, the highest peak RSS (memory is not luck)."""
    return Run(min(r.seconds for r in runs), max(r.rss_mib for r in runs), min(r.cpu for r in runs))


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
    (out / MODEL_FILE).write_text(json.dumps(cfg))
    return out


#: the model config a checkpoint of this bench was trained with, kept in its folder for ``--checkpoint``
MODEL_FILE = "bench_model.json"


def measure(a, ck: Path, tag: Path, base: Path) -> dict[str, Run]:
    """Every row, best of ``a.repeat``; the ucp conversions (this tree's and ``a.against``'s)
    alternate within each repeat, so that both see the same load."""
    rows: dict[str, list[Run]] = {}
    old = None
    if a.against:
        old = base / "against"
        old.mkdir()
        subprocess.run(f"git -C {ROOT} archive {a.against} | tar -x -C {old}", shell=True, check=True)
    for tree in [ROOT] + ([old] if old else []):
        # the bytecode ``pip install`` leaves: with PYTHONDONTWRITEBYTECODE set (as in CI and the sessions'
        # shells), each run would otherwise compile the ~30 modules convert imports lazily (0.2-0.4 CPU s)
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "ucp")], check=True,
                       stdout=subprocess.DEVNULL)
    for i in range(a.repeat):
        jobs = [("cp -r + sync (same bytes)", ["bash", "-c", f"cp -r {tag} {base / f'copy{i}'} && sync"], ROOT),
                ("python pread+pwrite + sync (same bytes)",
                 [sys.executable, str(Path(__file__).resolve()), "--raw-copy", str(tag), str(base / f"raw{i}")], ROOT),
                (UCP_BARE, [sys.executable, "-c", UCP_IMPORTS], ROOT),
                (TORCH_BARE, [sys.executable, "-c", "import torch"], ROOT),
                ("ucp convert --from deepspeed",
                 [sys.executable, "-m", "ucp", "convert", str(ck), str(base / f"ucp{i}"), "--from", "deepspeed"], ROOT)]
        if old is not None:
            jobs.append((f"ucp convert ({a.against})", [sys.executable, "-m", "ucp", "convert", str(ck),
                                                         str(base / f"ucp-old{i}"), "--from", "deepspeed"], old))
        if i == 0 or a.repeat_ds:
            jobs.append(("python -m ...ds_to_universal (defaults)",
                         [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag),
                          "--output_folder", str(base / f"ds_universal{i}")], ROOT))
        for name, cmd, root in jobs:
            rows.setdefault(name, []).append(timed(cmd, root))
            r = rows[name][-1]  # as it comes: a later row failing (a full disk at 4 GB) loses none
            print(f"#   {name}: {r.seconds:.2f} s, {r.cpu:.2f} CPU s, {r.rss_mib:.0f} MiB", flush=True)
            for f in base.iterdir():  # this row's output: keep the disk from filling at 4 GB
                if f.name != "ds" and f.name != "against":
                    shutil.rmtree(f, ignore_errors=True)
    return {name: best(r) for name, r in rows.items()}


def report(a, runs: dict[str, Run], largest: float, say) -> None:
    cp, bare, torch_bare = runs["cp -r + sync (same bytes)"], runs[UCP_BARE], runs[TORCH_BARE]
    ucp, ds = runs["ucp convert --from deepspeed"], runs["python -m ...ds_to_universal (defaults)"]
    say(f"# best of {a.repeat} (ds_to_universal: {a.repeat if a.repeat_ds else 1}); CPU = user + system seconds")
    say(f"{'run':40s} {'seconds':>8s} {'vs cp':>7s} {'CPU s':>7s} {'peak RSS MiB':>13s}")
    for name, r in runs.items():
        say(f"{name:40s} {r.seconds:8.2f} {cp.seconds / r.seconds:6.2f}x {r.cpu:7.2f} {r.rss_mib:13.0f}")
    say(f"# ucp convert is {ds.seconds / ucp.seconds:.2f}x faster than ds_to_universal ({ds.cpu / ucp.cpu:.2f}x less "
        f"CPU); peak RSS {ucp.rss_mib:.0f} vs {ds.rss_mib:.0f} MiB ({ucp.rss_mib / largest:.1f}x vs "
        f"{ds.rss_mib / largest:.1f}x the largest parameter's fp32 size). Both include interpreter and import start-up.")
    say(f"# without the start-up (the interpreter with what each imports: ucp's modules; torch for "
        f"ds_to_universal): ucp {ucp.seconds - bare.seconds:.2f} s / {ucp.cpu - bare.cpu:.2f} CPU s, ds_to_universal "
        f"{ds.seconds - torch_bare.seconds:.2f} s / {ds.cpu - torch_bare.cpu:.2f} CPU s: "
        f"{(ds.seconds - torch_bare.seconds) / (ucp.seconds - bare.seconds):.2f}x")
    say(f"# memory the conversion adds to the bare interpreter with ucp's modules ({bare.rss_mib:.0f} MiB): "
        f"{ucp.rss_mib - bare.rss_mib:.0f} MiB = {(ucp.rss_mib - bare.rss_mib) / largest:.1f}x the largest "
        f"parameter's fp32 size")
    if a.against:
        old = runs[f"ucp convert ({a.against})"]
        say(f"# against {a.against} in the same run: {old.seconds / ucp.seconds:.2f}x faster, "
            f"{old.cpu / ucp.cpu:.2f}x less CPU ({ucp.cpu:.2f} vs {old.cpu:.2f} s), peak RSS {ucp.rss_mib:.0f} "
            f"vs {old.rss_mib:.0f} MiB")


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
    ap.add_argument("--repeat", type=int, default=1, help="best of this many runs of each row")
    ap.add_argument("--repeat-ds", action="store_true", help="repeat ds_to_universal too (slow)")
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
        if a.checkpoint and (ck / MODEL_FILE).exists():   # its sizes, not the command line's defaults
            cfg = json.loads((ck / MODEL_FILE).read_text())
            a.hidden, a.layers, a.vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
        tag = ck / (ck / "latest").read_text().strip()
        largest = 4 * a.vocab * a.hidden / 2 ** 20
        say(f"# DeepSpeed ZeRO-{a.stage} {a.dtype} checkpoint, {a.ranks} ranks, hidden {a.hidden}, {a.layers} layers, "
            f"vocab {a.vocab}: {size_mib(tag):.0f} MiB; largest parameter fp32 {largest:.0f} MiB"
            + (" (reused checkpoint)" if a.checkpoint else ""))
        runs = measure(a, ck, tag, base)
        report(a, runs, largest, say)
        record(a.out, "\n".join(lines))
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
