"""Who converts: this process alone, or every process of a job (``ucp.engine.jobs``).

A training job's ``if rank == 0: ucp.export(...)`` is refused at once instead of hanging;
``distributed=False`` / ``--single-process`` convert alone whatever the environment;
``distributed=True`` shares the work in the caller's group; a process started alone with a
torchrun environment fails after the roll call with the address and the fix.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _ports import free_port

import ucp
from ucp.cli import main
from ucp.engine.jobs import ROLLCALL_TIMEOUT_ENV, torchrun_rank
from ucp.errors import UcpError
from ucp.targets.ranks import save_ranks

DIST = Path(__file__).parent / "dist"
SHARDED = 'spec s\naxes tp\nparam "**" = shard(0, over=tp)\n'
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_USE_AGENT_STORE", ROLLCALL_TIMEOUT_ENV)


@pytest.fixture
def ckpt(tmp_path):
    """Rank files (tp=2), their universal checkpoint, and its single-process export at tp=3."""
    g = torch.Generator().manual_seed(11)
    states = {st: {f"l{i}": torch.randn(30 + i, 6, generator=g) for i in range(5)} for st in ("param", "exp_avg")}
    save_ranks(states, tmp_path / "src", spec_text=SHARDED, degrees={"tp": 2}, metadata={"iteration": 2})
    ucp.convert(tmp_path / "src", tmp_path / "uni")
    ucp.export(tmp_path / "uni", tmp_path / "one", "ranks", degrees={"tp": 3})
    return tmp_path


def _assert_same_rank_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert (a / "layout.json").read_text() == (b / "layout.json").read_text()
    for name in names:
        if name.startswith("rank"):
            x, y = (torch.load(d / name, weights_only=True) for d in (a, b))
            assert x.keys() == y.keys() and all(torch.equal(x[s][k], y[s][k]) for s in x for k in x[s]), name


def _env(**extra) -> dict:
    """This environment without any torchrun variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    return {**env, "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in extra.items()}}


def _torchrun_env(rank: int, world: int, port: int, **extra) -> dict:
    """What a process started from a training rank inherits (repro: `RANK=0 WORLD_SIZE=4 ... ucp`)."""
    return _env(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **extra)


def test_a_callers_group_needs_to_be_told_who_converts(ckpt):
    """Under the caller's process group, rank 0 alone calling ucp without ``distributed`` is
    refused at once with the fix (it used to hang); ``distributed=False`` exports alone and
    equals a single-process export; ``distributed=True`` from every rank shares the work in
    the caller's group, which is left as it was."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                        str(DIST / "caller_group.py"), str(ckpt / "src"), str(ckpt / "uni"), str(ckpt / "out")],
                       env=_env(), capture_output=True, text=True, timeout=300)   # timeout: a safety net only
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)
    for step in ("export default", "convert default"):
        assert lines[step].startswith("UcpError "), (step, r.stdout)
        msg = json.loads(lines[step].removeprefix("UcpError "))
        assert "2 processes" in msg and "distributed=True" in msg and "distributed=False" in msg, msg
    assert not (ckpt / "out" / "default").exists() and not (ckpt / "out" / "default-uni").exists()
    assert lines["alone"] == "exported"
    _assert_same_rank_files(ckpt / "one", ckpt / "out" / "alone")
    assert lines["shared"] == "done, group kept: 2"
    _assert_same_rank_files(ckpt / "one", ckpt / "out" / "shared")
    assert main(["diff", str(ckpt / "uni"), str(ckpt / "out" / "shared-uni"), "-q", "--ignore-metadata"]) == 0


@pytest.mark.parametrize("rank,says", [(0, "only 1 of the 4 processes"), (2, "could not reach")])
def test_a_lone_process_with_a_torchrun_environment_fails_after_the_roll_call(ckpt, rank, says):
    """`RANK=r WORLD_SIZE=4 MASTER_ADDR=.. MASTER_PORT=.. ucp export ...` with no other process:
    a clear error after UCP_RENDEZVOUS_TIMEOUT, naming the address and the fix; nothing written."""
    port = free_port()
    r = subprocess.run([sys.executable, "-m", "ucp", "export", str(ckpt / "uni"), str(ckpt / "x"),
                        "--to", "ranks", "--tp", "3", "-q"],
                       env=_torchrun_env(rank, 4, port, **{ROLLCALL_TIMEOUT_ENV: 3}),
                       capture_output=True, text=True, timeout=120)   # timeout: a safety net only
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith("ucp export: error:"), r.stderr[-3000:]
    for part in (says, f"127.0.0.1:{port}", "3 s", "torchrun", "--single-process", "distributed=False"):
        assert part in error, (part, error)
    assert not (ckpt / "x").exists()


def test_processes_started_by_hand_meet_at_process_0(ckpt):
    """Without torchrun's agent (no TORCHELASTIC_USE_AGENT_STORE) process 0 hosts the roll
    call: two `ucp export` processes started with RANK 0 and 1 share the work."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "ucp", "export", str(ckpt / "uni"), str(ckpt / "two"),
                               "--to", "ranks", "--tp", "3", "-q"], env=_torchrun_env(rank, 2, port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (1, 0)]
    outs = [p.communicate(timeout=180) for p in procs]   # timeout: a safety net only
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert "(2 processes)" in outs[1][0]
    _assert_same_rank_files(ckpt / "one", ckpt / "two")


def test_single_process_ignores_the_torchrun_environment(ckpt):
    """`--single-process` with an inherited torchrun environment (no other process anywhere):
    export and convert run alone and equal a plain single-process run."""
    env = _torchrun_env(0, 4, free_port(), **{ROLLCALL_TIMEOUT_ENV: 1})
    for argv in (["export", str(ckpt / "uni"), str(ckpt / "alone"), "--to", "ranks", "--tp", "3"],
                 ["convert", str(ckpt / "src"), str(ckpt / "alone-uni")]):
        r = subprocess.run([sys.executable, "-m", "ucp", *argv, "--single-process", "-q"], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert "processes)" not in r.stdout
    _assert_same_rank_files(ckpt / "one", ckpt / "alone")
    assert main(["diff", str(ckpt / "uni"), str(ckpt / "alone-uni"), "-q", "--ignore-metadata"]) == 0


def test_single_process_flag_has_help():
    for cmd in ("convert", "export"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])


def _set_torchrun_env(monkeypatch, **env):
    for k in TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))


def test_a_port_in_use_is_named(monkeypatch):
    """Process 0 hosts the roll call at MASTER_ADDR:MASTER_PORT; when that port is taken the
    error says so at once (no wait)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _set_torchrun_env(monkeypatch, RANK=0, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                          **{ROLLCALL_TIMEOUT_ENV: 60})
        with pytest.raises(UcpError, match=f"127.0.0.1:{port} is already in use") as e:
            torchrun_rank()
    assert "--single-process" in str(e.value) and "distributed=False" in str(e.value)


def test_what_each_setting_means_without_a_job(monkeypatch):
    _set_torchrun_env(monkeypatch)
    assert torchrun_rank() is None and torchrun_rank(False) is None
    with pytest.raises(UcpError, match="distributed=True.*no process group.*torchrun"):
        torchrun_rank(True)
    # a torchrun environment of one process is no job either
    _set_torchrun_env(monkeypatch, RANK=0, WORLD_SIZE=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    assert torchrun_rank() is None and torchrun_rank(True) is None


@pytest.mark.parametrize("env,says", [
    ({"WORLD_SIZE": 2, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 1234}, "RANK"),
    ({"WORLD_SIZE": 2, "MASTER_ADDR": "127.0.0.1", "RANK": 1}, "MASTER_PORT"),
    ({"WORLD_SIZE": 2, "MASTER_ADDR": "127.0.0.1", "RANK": 0, "MASTER_PORT": 1234,
      ROLLCALL_TIMEOUT_ENV: "soon"}, ROLLCALL_TIMEOUT_ENV),
])
def test_an_incomplete_torchrun_environment_is_named(monkeypatch, env, says):
    _set_torchrun_env(monkeypatch, **env)
    with pytest.raises(UcpError, match=says):
        torchrun_rank()
    assert torchrun_rank(False) is None


def _listening(port: int) -> bool:
    """Whether a socket listens on ``port`` (/proc/net/tcp and tcp6, state 0A), without connecting."""
    rows = [r for f in ("tcp", "tcp6") for r in Path(f"/proc/net/{f}").read_text().splitlines()[1:]]
    return any(r.split()[1].endswith(f":{port:04X}") and r.split()[3] == "0A" for r in rows)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_ctrl_c_while_waiting_for_partners_ends_at_once_in_one_line(ckpt, signame):
    """Process 0 of a job whose partners never come waits at the roll call (here up to 600 s);
    Ctrl-C or a scheduler's SIGTERM there used to wait out the whole wait (torch's store waits
    without returning to Python) and then print a traceback. It now ends at once: exit 130, one
    line with what to do, nothing written; the conversion then runs."""
    import signal

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ucp", "convert", str(ckpt / "src"), str(ckpt / "u"), "-q"],
                            env=_torchrun_env(0, 2, port, **{ROLLCALL_TIMEOUT_ENV: 600}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not _listening(port):      # the event: process 0 hosts the roll call's store
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        os.sched_yield()
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=60)   # timeout: a safety net only (the wait left is 600 s)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("ucp convert: "), err[-3000:]
    assert ("terminated (SIGTERM)" if signame == "SIGTERM" else "interrupted") in err and "--resume" in err
    assert main(["convert", str(ckpt / "src"), str(ckpt / "u"), "-q", "--resume"]) == 0
    assert main(["diff", str(ckpt / "uni"), str(ckpt / "u"), "-q", "--ignore-metadata"]) == 0


def test_a_process_interrupted_tells_its_partners_so_not_what_torch_made_of_it(monkeypatch):
    """SIGTERM while torch's zip writer writes turns into its "unexpected pos" error, which a job's
    other processes printed as a full disk: once the command line's handler saw the signal, the
    failure a process reports is that it was interrupted."""
    import signal

    from ucp import errors
    from ucp.engine.jobs import failure_text

    torn = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert failure_text(torn).startswith("RuntimeError: [enforce fail")
    monkeypatch.setattr(errors, "interrupted_by", signal.SIGTERM)
    assert failure_text(torn) == "interrupted (SIGTERM)"
