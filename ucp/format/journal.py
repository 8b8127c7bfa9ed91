"""The run journal: what an uncommitted write was doing, so that a resume adopts only its own chunks.

At the start of a write the writer records the source's fingerprint (any JSON value the caller passes:
file names, sizes and mtimes from ``source_fingerprint``, or the source's iteration/tag), then one line
per declared array with its layout (shape, dtype, chunks, inner chunks). A resume refuses a fingerprint
or a layout that differs, naming what changed, and adopts chunk files only of arrays whose layout it
finds recorded. The journal (``_ucp/run.json``, ``_ucp/parts/<rank>.run.json``) is JSON lines, removed
once the checkpoint is committed. spec/FORMAT.md §11.
"""
from __future__ import annotations

import json
import os

from ucp.errors import UcpError
from ucp.format.layout import canonical

RUN = "_ucp/run.json"


class ResumeMismatchError(UcpError):
    """``resume=True`` found an interrupted write of another source or of another layout."""


#: the parts of a job's writers (FORMAT.md §13): their records, journals and locks
PARTS = "_ucp/parts"


def journal_rel(rank=None) -> str:
    return RUN if rank is None else f"{PARTS}/{int(rank)}.run.json"


def source_fingerprint(path) -> dict:
    """``{relative file name: [size, mtime_ns]}`` of every file under ``path`` (or of the one file): what
    a resume compares to tell the same source from a changed one."""
    path = os.fspath(path)
    if os.path.isfile(path):
        st = os.stat(path)
        return {os.path.basename(path): [st.st_size, st.st_mtime_ns]}
    out = {}
    for dp, _dn, fns in os.walk(path):
        for fn in fns:
            p = os.path.join(dp, fn)
            st = os.stat(p)
            out[os.path.relpath(p, path).replace(os.sep, "/")] = [st.st_size, st.st_mtime_ns]
    return dict(sorted(out.items()))


def _differences(old, new, limit=5) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new), key=str)
        diff = [f"{k}: {json.dumps(old.get(k, '<absent>'))} -> {json.dumps(new.get(k, '<absent>'))}"
                for k in keys if old.get(k) != new.get(k)]
        more = f" (and {len(diff) - limit} more)" if len(diff) > limit else ""
        return "; ".join(diff[:limit]) + more
    return f"{json.dumps(old)[:200]} -> {json.dumps(new)[:200]}"


class RunJournal:
    """The journal of one writer (``rel``) in ``store``."""

    def __init__(self, store, rel: str, path):
        self.store, self.rel, self.path = store, rel, path
        self.layouts: dict[str, dict] = {}
        self._out = None  # the store's appender, opened at the first declared array

    def start(self, fingerprint) -> None:
        """A fresh write: record the fingerprint (replacing any earlier journal)."""
        self.close()
        self.layouts = {}
        self.store.put(self.rel, [canonical({"fingerprint": fingerprint}) + b"\n"])

    def resume(self, fingerprint) -> None:
        """Continue the write recorded here; refuse another source. No journal: nothing is adopted."""
        try:
            lines = self.store.get(self.rel).splitlines()
        except (FileNotFoundError, NotADirectoryError):
            return self.start(fingerprint)
        try:
            head = json.loads(lines[0])
            entries = [json.loads(x) for x in lines[1:] if x.strip()]
        except (ValueError, IndexError):
            return self.start(fingerprint)  # torn by a crash: adopt nothing
        if head.get("fingerprint") != fingerprint:
            raise ResumeMismatchError(
                f"{self.path}: cannot resume: the interrupted write was of another source "
                f"({_differences(head.get('fingerprint'), fingerprint)}); start afresh with overwrite=True")
        self.layouts = {e["path"]: e["layout"] for e in entries if isinstance(e, dict) and "path" in e}

    def declare(self, path: str, layout: dict) -> bool:
        """Record an array's layout; True when the interrupted write had declared it the same way (its
        chunk files may be adopted). Raises ``ResumeMismatchError`` when it had another layout."""
        old = self.layouts.get(path)
        if old is None:
            self.layouts[path] = layout
            if self._out is None:
                self._out = self.store.appender(self.rel)
            self._out.write(canonical({"path": path, "layout": layout}) + b"\n")
            return False
        if old != layout:
            raise ResumeMismatchError(
                f"{self.path}: cannot resume: array {path} was written with another layout "
                f"({_differences(old, layout)}); start afresh with overwrite=True")
        return True

    def close(self) -> None:
        """Close the appender (the journal stays for a resume)."""
        if self._out is not None:
            self._out.close()
            self._out = None

    def remove(self) -> None:
        self.close()
        self.store.delete(self.rel)
