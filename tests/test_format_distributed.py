"""Several writers under real torchrun (gloo): every rank writes its share of one checkpoint,
one collective commit; a failing rank makes every rank raise and leaves no manifest."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ucp
from ucp.format import verify

from _ports import free_port

SCRIPT = Path(__file__).parent / "dist" / "parts_writer.py"


def _run(out, nproc, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(SCRIPT), str(out), *extra]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [(out.parent / f"status{i}.txt").read_text() for i in range(nproc)]


def _full(world):
    spec = importlib.util.spec_from_file_location("parts_writer", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.full_tensors(world)


def test_torchrun_ranks_write_one_checkpoint(tmp_path):
    out = tmp_path / "ck"
    statuses = _run(out, 3)
    assert statuses[0].startswith("ok {") and all(s == "ok None" for s in statuses[1:]), statuses
    ck = ucp.open(out)
    shared, own = _full(3)
    for n, t in {**shared, **own}.items():
        got = ck.read(n)
        assert got.dtype == t.dtype and torch.equal(got.view(torch.uint8) if t.dtype == torch.bfloat16 else got,
                                                   t.view(torch.uint8) if t.dtype == torch.bfloat16 else t), n
    assert ck.metadata == {"iteration": 11, "world": 3}
    assert verify(out) == []
    assert not (out / "_ucp" / "parts").exists()


def test_a_failing_rank_fails_every_rank_and_commits_nothing(tmp_path):
    out = tmp_path / "ck"
    statuses = _run(out, 3, "1")
    assert all(s.startswith("error ") for s in statuses), statuses
    assert all("rank1.bias" in s for s in statuses), statuses
    assert not (out / "ucp.manifest.json").exists()
    with pytest.raises(ucp.UcpError, match="manifest"):
        ucp.open(out)
