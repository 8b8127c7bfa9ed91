"""An array writer takes torch tensors only: anything else (a numpy array, a list) is refused with
a ``UcpError`` naming the array and what it got, and the checkpoint can still be written.
A surviving mutant of ucp/format/array_writer.py (bench/mutation.py) showed no test tried it.
"""
import numpy as np
import pytest
import torch

from ucp.errors import UcpError
from ucp.format import create_checkpoint, open_checkpoint


def test_write_refuses_what_is_not_a_tensor(tmp_path):
    """A torch tensor, or a numpy array in the storage dtype (bfloat16 as uint16: what sources
    that read without torch give), is written; anything else is refused, naming it."""
    t = torch.arange(6, dtype=torch.float32)
    h = torch.arange(4, dtype=torch.bfloat16)
    with create_checkpoint(tmp_path / "ck") as w:
        a = w.add_array("w", "param", (6,), torch.float32)
        b = w.add_array("h", "param", (4,), torch.bfloat16)
        for bad, kind in ((t.tolist(), "list"), (np.float32(1.0), "float32")):
            with pytest.raises(UcpError, match=rf"param 'w'.*write\(\) needs a torch.Tensor or a numpy array, "
                                               rf"got {kind}$"):
                a.write((0,), bad)
        with pytest.raises(UcpError, match=r"param 'w'.*array dtype float64 differs from the storage dtype float32"):
            a.write((0,), t.double().numpy())
        with pytest.raises(UcpError, match=r"param 'h'.*array dtype float32 differs from the storage dtype uint16"):
            b.write((0,), h.float().numpy())
        a.write((0,), t[:3])
        a.write((3,), t[3:].numpy())
        b.write((0,), h.view(torch.uint16).numpy())
    ck = open_checkpoint(tmp_path / "ck")
    assert torch.equal(ck.read("w"), t) and torch.equal(ck.read("h").view(torch.uint16), h.view(torch.uint16))
