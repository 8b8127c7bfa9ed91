"""Behaviours of ucp/format that surviving mutants of bench/mutation.py showed no test checked.

Each test states a behaviour a user relies on; the mutants it kills are named in
bench/results/mutation.txt (survivors before, killed after).
"""
import io
import sys

import torch

from ucp.format import create_checkpoint, verify
from ucp.format.verify import verify_report


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal: where progress bars would be drawn."""

    def isatty(self):
        return True


def _small(path):
    with create_checkpoint(path) as w:
        w.write_tensor("w", "param", torch.arange(64, dtype=torch.float32).reshape(8, 8), chunks=(2, 8))
    return path


def test_library_verify_is_silent_even_on_a_terminal_unless_asked(tmp_path, monkeypatch):
    """Python callers get no output by default (the CLI asks for bars); progress=True draws one."""
    path = _small(tmp_path / "ck")
    err = _Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    assert verify(path) == []
    assert verify_report(path) == ([], [])
    assert err.getvalue() == ""
    assert verify(path, progress=True) == []
    assert "verify" in err.getvalue()


def test_verify_report_reads_every_chunk_by_default(tmp_path):
    """verify_report, like verify, is deep unless told otherwise: a flipped data byte (same size)
    is a problem; the quick check (sizes only) does not see it."""
    path = _small(tmp_path / "ck")
    f = path / "w" / "param" / "c" / "1" / "0"
    raw = bytearray(f.read_bytes())
    raw[0] ^= 1
    f.write_bytes(raw)
    problems, warnings = verify_report(path)
    assert len(problems) == 1 and "crc32c mismatch" in problems[0] and warnings == []
    assert verify_report(path, deep=False) == ([], [])


def test_stray_file_is_a_warning_not_a_problem_by_default(tmp_path):
    path = _small(tmp_path / "ck")
    (path / "w" / "notes.txt").write_text("left here by a user")
    assert verify(path) == []
    problems, warnings = verify_report(path)
    assert problems == [] and len(warnings) == 1 and "notes.txt" in warnings[0]
    (strict,) = verify(path, strict=True)
    assert "notes.txt" in strict
