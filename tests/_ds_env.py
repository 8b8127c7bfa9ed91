"""The environment of every DeepSpeed job the tests start: the CPU accelerator, no prebuilt ops, and
one cache for the comm op DeepSpeed JIT-builds with g++ on its first CPU run (~20 s), so that it is
built once per machine rather than once per job."""
import os
import subprocess
import sys
from pathlib import Path

from _ports import free_port

ROOT = Path(__file__).resolve().parents[1]
DS_ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "0",
          "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "ucp-torch-extensions")}


def run_ds_job(script: Path, nproc: int, *args, cwd=None, timeout: int = 600) -> None:
    """One torchrun job of a DeepSpeed script; returns when every rank has exited. Each job gets
    its own port: DeepSpeed's CPU shared-memory allreduce names its buffers after
    MASTER_ADDR/MASTER_PORT, so two jobs on one port would share (and corrupt) them."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), *map(str, args)]
    env = {**os.environ, **DS_ENV, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")


def run_ds_to_universal(folder: Path, out: Path, timeout: int = 600) -> None:
    """DeepSpeed's own ``ds_to_universal`` on the tag folder ``folder`` (one extract and one merge
    worker: the tests' 2 cores), the reference answer several tests compare ucp with."""
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(folder),
           "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    res = subprocess.run(cmd, env={**os.environ, **DS_ENV}, capture_output=True, text=True, timeout=timeout)
    if res.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
