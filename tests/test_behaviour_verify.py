"""``verify`` reports a manifest it must not read (a symbolic link) as a problem, like a reader
refuses it, instead of raising or passing. A surviving mutant of ucp/format/verify.py showed no
test reached that branch."""
import pytest
import torch

from ucp.errors import FormatError
from ucp.format import create_checkpoint, open_checkpoint, verify
from ucp.format.verify import verify_report


def test_manifest_replaced_by_a_symlink_is_a_problem(tmp_path):
    root = tmp_path / "ck"
    with create_checkpoint(root) as w:
        w.write_tensor("w", "param", torch.ones(4))
    outside = tmp_path / "elsewhere.json"
    manifest = root / "ucp.manifest.json"
    outside.write_bytes(manifest.read_bytes())  # the same bytes: only the link is wrong
    manifest.unlink()
    manifest.symlink_to(outside)
    with pytest.raises(FormatError, match=r"ucp.manifest.json is a symbolic link"):
        open_checkpoint(root)
    problems, warnings = verify_report(root)
    assert len(problems) == 1 and "ucp.manifest.json is a symbolic link" in problems[0] and warnings == []
    assert verify(root, strict=True) == problems
