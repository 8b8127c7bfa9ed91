"""Issue 13 item 2: one writer per root. A second writer (another process, or overwrite=True racing) gets
a clear ``WriterLockedError`` naming the holder; a lock of a dead process is taken over; on an object
store a writer whose marker was replaced refuses to commit. Processes synchronise on pipes, never time."""
import json
import os
import signal
import subprocess
import sys

import fsspec
import pytest
import torch

from ucp.errors import DestinationNotEmptyError, NotCommittedError
from ucp.format import WriterLockedError, create_checkpoint, open_checkpoint, verify

# A writer process: takes the root, writes its value, says "locked", waits for a line on stdin
# ("commit" or "abort"); it can also be killed while it waits.
HOLDER = r'''
import json, sys, torch
from ucp.format import create_checkpoint
a = json.loads(sys.argv[1])
try:
    w = create_checkpoint(a["path"], overwrite=a.get("overwrite", False), durable=False)
except Exception as e:
    print("refused", type(e).__name__, e, flush=True)
    sys.exit(0)
for i in range(4):
    w.write_tensor(f"p{i}", "param", torch.full((8, 8), float(a["value"])))
print("locked", flush=True)
cmd = sys.stdin.readline().strip()
w.commit() if cmd == "commit" else w.abort()
print("committed" if cmd == "commit" else "aborted", flush=True)
'''


def spawn(path, value, **kw):
    return subprocess.Popen([sys.executable, "-c", HOLDER, json.dumps({"path": str(path), "value": value, **kw})],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p, cmd):
    out, err = p.communicate(cmd + "\n", timeout=300)
    assert p.returncode == 0, err
    return out


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    path = tmp_path / "ck"
    a = spawn(path, 1)
    assert a.stdout.readline() == "locked\n"
    for kw in ({}, {"overwrite": True}, {"resume": True}):  # racing overwrite=True too: no raw OSError
        with pytest.raises(WriterLockedError, match=rf"another writer holds this checkpoint: .*pid {a.pid} on host"):
            create_checkpoint(path, **kw)
    b = spawn(path, 2)
    assert b.stdout.readline().startswith("refused WriterLockedError")
    b.communicate(timeout=300)
    assert finish(a, "commit").endswith("committed\n")
    ck = open_checkpoint(path)
    assert all(torch.equal(ck.read(f"p{i}"), torch.full((8, 8), 1.0)) for i in range(4))  # one writer's values
    assert verify(path, strict=True) == []  # the lock is gone with the commit
    assert not (path / "ucp.lock").exists()


def test_two_writers_racing_never_commit_a_mix(tmp_path):
    path = tmp_path / "ck"
    procs = [spawn(path, v) for v in (1, 2)]
    first = [p.stdout.readline() for p in procs]
    assert sorted(first)[0] == "locked\n" and sorted(first)[1].startswith("refused")
    outs = [finish(p, "commit") for p in procs]
    assert sum("committed" in o for o in outs) == 1
    winner = 1 if "committed" in outs[0] else 2
    ck = open_checkpoint(path)
    assert all(torch.equal(ck.read(f"p{i}"), torch.full((8, 8), float(winner))) for i in range(4))


def test_lock_of_a_killed_writer_is_stale_and_taken_over(tmp_path):
    path = tmp_path / "ck"
    a = spawn(path, 1)
    assert a.stdout.readline() == "locked\n"
    holder = json.loads((path / "ucp.lock").read_text())
    assert holder["pid"] == a.pid and holder["writer_id"]
    a.send_signal(signal.SIGKILL)
    a.communicate(timeout=300)
    assert a.returncode == -signal.SIGKILL
    with pytest.raises(NotCommittedError):
        open_checkpoint(path)
    with pytest.raises(DestinationNotEmptyError):  # the lock was stale; the files are still there
        create_checkpoint(path)
    w = create_checkpoint(path, resume=True, durable=False)  # takes the stale lock over
    assert json.loads((path / "ucp.lock").read_text())["pid"] == os.getpid()
    for i in range(4):
        w.write_tensor(f"p{i}", "param", torch.full((8, 8), 1.0))
    w.commit()
    assert verify(path, strict=True) == []


def test_abandoned_writer_in_this_process_and_abort_release(tmp_path):
    w = create_checkpoint(tmp_path / "ck", durable=False)
    with pytest.raises(WriterLockedError, match=f"pid {os.getpid()}"):
        create_checkpoint(tmp_path / "ck", resume=True)
    w.abort()  # releases the lock, keeps the files for a resume
    assert not (tmp_path / "ck" / "ucp.lock").exists()
    w2 = create_checkpoint(tmp_path / "ck", resume=True, durable=False)
    del w2  # abandoned without abort: its lock is stale once the object is gone
    create_checkpoint(tmp_path / "ck", resume=True, durable=False).abort()


def test_object_store_writer_checks_its_marker_before_commit(tmp_path):
    url = f"memory://ucp-lock-test/{tmp_path.name}/ck"
    w = create_checkpoint(url, durable=False)
    w.write_tensor("p", "param", torch.ones(4))
    fs = fsspec.filesystem("memory")
    root = url[len("memory://"):]
    assert json.loads(fs.cat_file(f"{root}/ucp.lock"))["writer_id"] == w.writer_lock.writer_id
    # another writer that raced the check-then-put of the lock now holds the marker
    fs.pipe_file(f"{root}/ucp.lock", json.dumps({"writer_id": "other", "pid": 1, "host": "elsewhere"}).encode())
    with pytest.raises(WriterLockedError, match="no longer holds ucp.lock .*writer other"):
        w.commit()
    assert not fs.exists(f"{root}/ucp.manifest.json")
    w.abort()
    fs.rm(f"/ucp-lock-test/{tmp_path.name}", recursive=True)


def test_a_file_in_the_way_is_a_clear_error(tmp_path):
    from ucp.errors import UcpError

    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(UcpError, match=r"exists and is a file, not a checkpoint directory"):
        create_checkpoint(tmp_path / "f")
