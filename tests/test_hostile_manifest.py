"""A manifest with a valid checksum can still be crafted: readers refuse paths that leave the
checkpoint, and malformed shapes, before reading anything."""
import json

import pytest
import torch

from ucp.errors import FormatError
from ucp.format import create_checkpoint, open_checkpoint, verify
from ucp.format import manifest as M


def _rewrite(root, edit):
    raw = (root / "ucp.manifest.json").read_bytes()
    doc = json.loads(raw)
    doc.pop("crc32c")
    edit(doc)
    (root / "ucp.manifest.json").write_bytes(M.dump(doc))


@pytest.fixture
def ck(tmp_path):
    (tmp_path / "secret").write_bytes(b"\0" * 64)
    root = tmp_path / "ck"
    with create_checkpoint(root) as w:
        w.add_param("w", meta={})
        w.write_tensor("w", "param", torch.arange(16, dtype=torch.float32))
    return root


@pytest.mark.parametrize("edit", [
    lambda d: d["params"][0]["states"]["param"].__setitem__("path", "../secret"),
    lambda d: d["params"][0].__setitem__("path", ".."),
    lambda d: d["params"][0]["states"]["param"].__setitem__("path", "/etc/passwd"),
    lambda d: d["params"][0]["states"]["param"]["chunk_table"].__setitem__("../../secret", [64, 0]),
    lambda d: d["params"][0]["states"]["param"].__setitem__("shape", [-1]),
    lambda d: d["params"][0]["states"]["param"].__setitem__("chunks", [0]),
    lambda d: d["params"][0]["states"]["param"].__setitem__("dtype", "object"),
    lambda d: d.__setitem__("files", {"../secret": [64, 0]}),
], ids=["state-path-up", "param-path-dotdot", "absolute", "chunk-key", "negative-shape", "zero-chunk",
        "bad-dtype", "files-up"])
def test_crafted_manifest_is_refused(ck, edit):
    assert open_checkpoint(ck).read("w").tolist() == list(range(16))
    _rewrite(ck, edit)
    with pytest.raises(FormatError):
        open_checkpoint(ck)
    assert verify(ck)  # reported, not crashed
