"""Loading a universal checkpoint into GPU tensors, against the raw I/O and PCIe rates and the peers.

One process, one GPU. The state: a slice of a Llama-3-8B-shaped model in bf16 (``--layers``
decoder layers of hidden 4096, FFN 14336, 8 KV heads of 128, the 128256-row embedding and LM
head), written once as a universal checkpoint (``dcp.save`` with ``UniversalWriter``), as a DCP
checkpoint (``FileSystemWriter``) and as one safetensors file. Then, best of ``--repeat``, each
warm (every file read once just before the load) or, with ``--cold``, after dropping the page
cache (root; refused in some sandboxes, which the report says):

- raw: reading every file of the universal checkpoint once (one thread, 16 MiB reads): the
  page-cache (or disk) rate; pinned and pageable host-to-device copies of 1 GiB: the PCIe rates;
- ``dcp.load`` into CUDA tensors from the universal checkpoint with ``UniversalReader`` (its
  default threads, and ``--threads``), and from the DCP checkpoint with ``FileSystemReader``;
- ``UniversalReader`` into CPU tensors, then ``.to("cuda")`` (what staging replaced);
- ``safetensors.torch.load_file(device="cuda")``.

Every GPU load is checked bit-exactly against the source on the GPU. Runs without a GPU too
(then every "cuda" is the CPU, for trying the script at a small ``--layers 0 --vocab 1000``).

Usage: python bench/bench_cuda.py [--layers 8] [--vocab 128256] [--repeat 3] [--threads 16]
       [--cold] [--dir /tmp] [--out bench/results/cuda.txt]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import drop_caches, read_tree, record  # noqa: E402

sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=14336)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=16, help="UniversalReader threads of the second ucp row")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each load (root)")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cuda.txt"))
    return ap.parse_args(argv)


def shapes(a) -> dict[str, tuple]:
    """Llama-3 parameter shapes (GQA with 8 KV heads of 128, SwiGLU); vocabulary not a power of 2."""
    h, f, kv = a.hidden, a.ffn, 8 * 128 if a.hidden >= 1024 else a.hidden // 4
    out = {"model.embed_tokens.weight": (a.vocab, h)}
    for i in range(a.layers):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                    p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                    p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,)})
    out.update({"model.norm.weight": (h,), "lm_head.weight": (a.vocab, h)})
    return out


def source_state(a) -> dict[str, torch.Tensor]:
    """Random bf16 tensors, made on the GPU (fast) and kept on the host: the state that is saved."""
    g = torch.Generator(device=DEV).manual_seed(0)
    return {k: torch.randn(s, generator=g, device=DEV, dtype=torch.bfloat16).cpu() for k, s in shapes(a).items()}


def empty_like_on(src, device) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v.shape, dtype=v.dtype, device=device) for k, v in src.items()}


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def best(fn, repeat, before=None):
    """Best wall time of ``fn`` over ``repeat`` calls (``before`` untimed before each)."""
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def check(got: dict, src_dev: dict, label: str) -> None:
    for k, v in src_dev.items():
        if not torch.equal(got[k].view(torch.int16), v.view(torch.int16)):
            raise SystemExit(f"{label}: {k} differs from the saved tensor")


def copy_rates(nbytes=1 << 30, repeat=5) -> tuple[float, float]:
    """Host-to-device GB/s from pinned and from pageable memory."""
    if DEV != "cuda":
        return float("nan"), float("nan")
    dst = torch.empty(nbytes, dtype=torch.uint8, device=DEV)
    out = []
    for pin in (True, False):
        src = torch.ones(nbytes, dtype=torch.uint8, pin_memory=pin)
        out.append(nbytes / best(lambda: dst.copy_(src, non_blocking=pin), repeat) / 1e9)
    return out[0], out[1]


def main(argv=None):
    a = parse(argv)
    from safetensors.torch import load_file, save_file
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

    from ucp.dcp import UniversalReader, UniversalWriter, rank_threads

    base = Path(tempfile.mkdtemp(prefix="ucp-bench-cuda-", dir=a.dir))
    try:
        src = source_state(a)
        nbytes = sum(v.numel() * v.element_size() for v in src.values())
        paths = {"ucp": base / "ucp", "dcp": base / "dcp", "st": base / "st"}
        t_ucp = best(lambda: dcp.save(src, storage_writer=UniversalWriter(paths["ucp"], overwrite=True),
                                      no_dist=True), 1)
        t_dcp = best(lambda: dcp.save(src, storage_writer=FileSystemWriter(paths["dcp"], overwrite=True),
                                      no_dist=True), 1)
        paths["st"].mkdir()
        t_st = best(lambda: save_file(src, str(paths["st"] / "model.safetensors")), 1)
        src_dev = {k: v.to(DEV) for k, v in src.items()}

        def warm(p):
            return (lambda: drop_caches()) if a.cold else (lambda: read_tree(p))

        cold_ok = drop_caches() if a.cold else None
        rows = []
        t = best(lambda: read_tree(paths["ucp"]), a.repeat, (lambda: drop_caches()) if a.cold else None)
        raw = nbytes / t / 1e9
        rows.append(("raw read of the universal files (1 thread)", t))
        pinned, pageable = copy_rates()

        def ucp_load(threads):
            sd = empty_like_on(src, DEV)
            dcp.load(sd, storage_reader=UniversalReader(paths["ucp"], workers=threads), no_dist=True)
            return sd

        def ucp_cpu_then_copy():
            sd = empty_like_on(src, "cpu")
            dcp.load(sd, storage_reader=UniversalReader(paths["ucp"]), no_dist=True)
            return {k: v.to(DEV) for k, v in sd.items()}

        def fs_load():
            sd = empty_like_on(src, DEV)
            dcp.load(sd, storage_reader=FileSystemReader(paths["dcp"]), no_dist=True)
            return sd

        def st_load():
            return load_file(str(paths["st"] / "model.safetensors"), device=DEV)

        default_threads = rank_threads(paths["ucp"])
        cases = [(f"ucp UniversalReader -> {DEV} ({default_threads} threads, default)", "ucp",
                  lambda: ucp_load(None)),
                 (f"ucp UniversalReader -> {DEV} ({a.threads} threads)", "ucp", lambda: ucp_load(a.threads)),
                 (f"ucp UniversalReader -> cpu, then .to({DEV})", "ucp", ucp_cpu_then_copy),
                 (f"DCP FileSystemReader -> {DEV}", "dcp", fs_load),
                 (f"safetensors load_file(device={DEV})", "st", st_load)]
        timed = {}
        for label, which, fn in cases:
            got = {}

            def run(fn=fn, got=got):
                got.clear()
                got.update(fn())

            timed[label] = best(run, a.repeat, warm(paths[which]))
            check(got, src_dev, label)
            got.clear()
            rows.append((label, timed[label]))
        fs = timed[f"DCP FileSystemReader -> {DEV}"]
        st = timed[f"safetensors load_file(device={DEV})"]

        gpu = torch.cuda.get_device_name() if DEV == "cuda" else "none"
        lines = [f"state: {len(src)} bf16 tensors, {nbytes / 2**30:.2f} GiB (Llama-3-8B shapes, {a.layers} layers, "
                 f"vocab {a.vocab}); device {gpu}; {os.cpu_count()} cores; "
                 f"{'cold (page cache dropped)' if a.cold and cold_ok else 'warm (files read just before)'}"
                 + (" -- --cold asked but dropping the page cache was refused: warm" if a.cold and not cold_ok else ""),
                 f"saves: UniversalWriter {t_ucp:.2f} s, FileSystemWriter {t_dcp:.2f} s, safetensors {t_st:.2f} s",
                 f"host->device copy of 1 GiB: pinned {pinned:.1f} GB/s, pageable {pageable:.1f} GB/s",
                 f"{'load':<56}{'s':>8}{'GB/s':>8}{'vs FSReader':>13}{'vs safetensors':>16}{'of raw read':>13}"]
        for label, t in rows:
            lines.append(f"{label:<56}{t:>8.3f}{nbytes / t / 1e9:>8.2f}{fs / t:>12.2f}x{st / t:>15.2f}x"
                         f"{(nbytes / t / 1e9) / raw:>12.2f}x")
        text = "\n".join(lines)
        print(text)
        head = (f"== {time.strftime('%Y-%m-%d %H:%M')} commit {_commit()} -- python bench/bench_cuda.py "
                f"{' '.join(sys.argv[1:])}\n")
        record(a.out, head + text + "\n")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
