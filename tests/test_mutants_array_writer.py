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
    t = torch.arange(6, dtype=torch.float32)
    with create_checkpoint(tmp_path / "ck") as w:
        a = w.add_array("w", "param", (6,), torch.float32)
        for bad, kind in ((t.numpy(), "ndarray"), (t.tolist(), "list"), (np.float32(1.0), "float32")):
            with pytest.raises(UcpError, match=rf"param 'w'.*write\(\) needs a torch.Tensor, got {kind}$"):
                a.write((0,), bad)
        a.write((0,), t)
    assert torch.equal(open_checkpoint(tmp_path / "ck").read("w"), t)
