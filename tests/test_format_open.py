"""Opening a manifest checks every path in a few bulk calls (perf, issue 14): the bulk check must accept
exactly what the one-path check accepts, and a path smuggled past the bulk joining is still refused."""

import contextlib

import pytest
import torch
from hypothesis import given, settings, strategies as st

from ucp.errors import FormatError
from ucp.format import create_checkpoint, open_checkpoint
from ucp.format import manifest as M

from _manifest_edit import rewrite_manifest

# characters that matter to the path rule: separators, dots, newlines (the bulk joiner), a percent
paths = st.text(alphabet="a/.\n%-_", max_size=8)


@settings(deadline=None, max_examples=400)
@given(st.lists(paths, max_size=6))
def test_bulk_path_check_agrees_with_the_one_path_check(ps):
    assert M.all_safe_rel(ps) == all(M.safe_rel(p) for p in ps)


def test_bulk_path_check_length_and_types():
    assert M.all_safe_rel(["p" * 4095, "q"]) and not M.all_safe_rel(["p" * 4096, "q"])
    assert not M.all_safe_rel(["a", 5]) and not M.all_safe_rel(["a", None]) and M.all_safe_rel([])


@contextlib.contextmanager
def crafted(root, edit):
    """The manifest edited (and re-signed) for the block, then restored: the schema check at teardown of
    test_format_* tests must see a valid manifest."""
    original = (root / "ucp.manifest.json").read_bytes()
    rewrite_manifest(root, edit)
    try:
        yield
    finally:
        (root / "ucp.manifest.json").write_bytes(original)


@pytest.fixture
def ck(tmp_path):
    root = tmp_path / "ck"
    with create_checkpoint(root) as w:
        for i in range(3):
            w.write_tensor(f"layers.{i}.w", "param", torch.arange(8, dtype=torch.float32) + i)
    return root


@pytest.mark.parametrize("key", ["a\nb", "a/\nb", "\n", "x\n../../secret"])
def test_a_files_path_holding_a_newline_is_refused(ck, key):
    """Two safe paths joined by a newline look like one bulk match; one path holding it must not pass."""
    with crafted(ck, lambda d: d["files"].__setitem__(key, [1, 0])):
        with pytest.raises(FormatError, match=r"unsafe path in 'files'"):
            open_checkpoint(ck)


def test_state_error_names_parameter_and_state(ck):
    """Error locations are formatted only on error; the message still names the parameter and state."""
    with crafted(ck, lambda d: d["params"][1]["states"]["param"].__setitem__("dtype", "object")):
        with pytest.raises(FormatError, match=r"parameter 'layers.1.w' state 'param': unknown dtype 'object'"):
            open_checkpoint(ck)


def test_many_arrays_open_and_read_back(ck):
    c = open_checkpoint(ck)
    for i in range(3):
        assert torch.equal(c.read(f"layers.{i}.w"), torch.arange(8, dtype=torch.float32) + i)
