"""One writer per root: an exclusive lock file naming its holder (spec/FORMAT.md §2.1).

A writer creates its lock file with O_EXCL before it touches anything else, removes it when it commits
or aborts, and checks that the file still names it right before it writes the manifest. A lock whose
holder ran on this host and is no longer alive (killed, or an abandoned writer object of this process)
is stale and is taken over; a lock of another host is never presumed stale, the error says how to
remove it. On object stores the exclusive create is check-then-put, so the check before commit (the
writer-id marker) is what catches a racing writer there.
"""
from __future__ import annotations

import datetime
import gc
import json
import os
import socket
import uuid
import weakref

from ucp.errors import UcpError

LOCK = "ucp.lock"
_LIVE: "weakref.WeakValueDictionary[str, object]" = weakref.WeakValueDictionary()


class WriterLockedError(UcpError):
    """Another writer holds the root (the message names it: host, pid, since when)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child its parent has not reaped yet is a zombie: dead for our purpose
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def describe(holder: dict) -> str:
    return (f"writer {holder.get('writer_id', '?')} (pid {holder.get('pid', '?')} on host "
            f"{holder.get('host', '?')}, since {holder.get('created', '?')})")


class WriterLock:
    """The lock file ``rel`` of ``store`` taken for ``owner`` (any object; its lifetime marks the lock live
    within this process)."""

    def __init__(self, store, rel: str, path, owner):
        self.store, self.rel, self.path = store, rel, path
        self.writer_id = uuid.uuid4().hex
        self.held = False
        _LIVE[self.writer_id] = owner

    def _body(self) -> bytes:
        return json.dumps({"writer_id": self.writer_id, "host": socket.gethostname(), "pid": os.getpid(),
                           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                               timespec="seconds")}).encode()

    def holder(self) -> dict | None:
        """The lock file's content, ``{}`` when unreadable, None when there is no lock."""
        try:
            raw = self.store.get(self.rel)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            doc = json.loads(raw)
            return doc if isinstance(doc, dict) else {}
        except ValueError:
            return {}

    def stale(self, holder: dict) -> bool:
        """Whether ``holder`` (a lock file's content) is gone: a dead process of this host, or an
        abandoned or closed writer of this process."""
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        if holder["pid"] != os.getpid():
            return not _alive(holder["pid"])
        wid = holder.get("writer_id")
        if wid in _LIVE:
            gc.collect()  # an abandoned writer in a reference cycle still counts until collected
        owner = _LIVE.get(wid)
        return owner is None or getattr(owner, "closed", False)

    def acquire(self) -> None:
        """Take the lock, replacing a stale one; raise ``WriterLockedError`` naming a live holder."""
        for _attempt in range(3):
            if self.store.create_exclusive(self.rel, self._body()):
                self.held = True
                return
            holder = self.holder()
            if holder is None:
                continue  # released meanwhile
            if not self.stale(holder):
                raise WriterLockedError(
                    f"{self.path}: another writer holds this checkpoint: {describe(holder)} "
                    f"({self.store.url}/{self.rel}). Wait for it to commit or abort; if it is gone for good "
                    f"(e.g. a crashed job on another host), delete {self.rel} and retry")
            self.store.delete(self.rel)
        raise WriterLockedError(f"{self.path}: could not take {self.rel}: other writers keep taking it")

    def check(self) -> None:
        """Before a commit: the lock must still name this writer (a racing writer on an object store,
        or someone who deleted a live lock, is caught here instead of committing a mixed checkpoint)."""
        holder = self.holder()
        if not self.held or holder is None or holder.get("writer_id") != self.writer_id:
            who = describe(holder) if holder else "nobody"
            raise WriterLockedError(f"{self.path}: this writer ({self.writer_id}) no longer holds {self.rel} "
                                    f"(it names {who}); not committing a checkpoint another writer may "
                                    "have written into")

    def release(self) -> None:
        if self.held:
            holder = self.holder()
            if holder is not None and holder.get("writer_id") == self.writer_id:
                self.store.delete(self.rel)
            self.held = False
        _LIVE.pop(self.writer_id, None)
