"""Logical dtypes <-> zarr v3 storage data types (bit-exact views), with or without torch.

The table is by name, so that code that never touches a torch tensor (a source reading
``torch.save`` files through ``ucp.sources.torchfile``, and the writer under it) runs
without importing torch (1.5-2 s of a 5 s conversion); torch dtypes are looked up only when a
caller holds one, so torch is imported by then.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Optional

import numpy as np

from ucp.errors import FormatError, UcpError

# logical name -> zarr data_type of its storage (the same bits as an unsigned int where numpy
# and zarr have no such float)
_TABLE: dict[str, str] = {n: n for n in ["float16", "float32", "float64", "int8", "int16", "int32", "int64",
                                         "uint8", "uint16", "uint32", "uint64", "bool", "complex64",
                                         "complex128"]}
_TABLE["bfloat16"] = "uint16"
for _n in ["float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"]:
    _TABLE[_n] = "uint8"

SUPPORTED = tuple(_TABLE)


@dataclasses.dataclass(frozen=True)
class Dtype:
    """A logical dtype by name, for arrays held as numpy in their storage dtype (a bfloat16
    box is a ``uint16`` array): what ``torch.bfloat16`` is to a torch tensor, where torch is
    not imported."""
    name: str

    def __post_init__(self):
        if self.name not in _TABLE:
            raise UcpError(f"dtype {self.name} is not supported by the ucp format; supported: {', '.join(SUPPORTED)}")

    @property
    def itemsize(self) -> int:
        return itemsize(self.name)

    @property
    def storage(self) -> np.dtype:
        return numpy_storage_dtype(self.name)

    def __str__(self) -> str:
        return self.name


@functools.cache
def _by_torch() -> dict:
    import torch

    return {getattr(torch, n): n for n in _TABLE if hasattr(torch, n)}


def is_torch_dtype(dtype) -> bool:
    torch = sys.modules.get("torch")   # no torch imported: nothing is a torch dtype
    return torch is not None and isinstance(dtype, torch.dtype)


def is_dtype(obj) -> bool:
    """Whether ``obj`` is a logical dtype object: a torch dtype or a :class:`Dtype` (metadata
    stores either as ``{"$dtype": name}``)."""
    return isinstance(obj, Dtype) or is_torch_dtype(obj)


def dtype_name(dtype) -> str:
    """The logical name of a torch dtype, a :class:`Dtype`, or a numpy dtype (taken as it is:
    a numpy array holds its storage dtype)."""
    if isinstance(dtype, Dtype):
        return dtype.name
    name = _by_torch().get(dtype) if is_torch_dtype(dtype) else None
    if name is None and (isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic))):
        name = np.dtype(dtype).name
    if name not in _TABLE:
        raise UcpError(f"dtype {dtype} is not supported by the ucp format; supported: {', '.join(SUPPORTED)}")
    return name


def is_supported(dtype) -> bool:
    try:
        dtype_name(dtype)
    except UcpError:
        return False
    return True


def scalar_dtype_name(dtype) -> str:
    """The name ``scalar_dtypes`` records for the torch dtype of a per-parameter scalar (FORMAT.md
    §6.1): any torch dtype, as a scalar is a JSON number and no array."""
    return str(dtype).removeprefix("torch.")


def scalar_dtype(value, name: Optional[str] = None, where: str = "scalar_dtypes"):
    """The torch dtype of a per-parameter scalar (``scalars``, FORMAT.md §6.1) as the 0-d tensor
    torch's optimizers keep it: its ``scalar_dtypes`` entry ``name``, else float32 for a float and
    int64 for an int (a scalar recorded without its dtype). One rule for the reader and the
    exports. ``where`` names the entry in an error (checkpoint, parameter, state)."""
    import torch

    if name is None:
        return torch.float32 if isinstance(value, float) else torch.int64
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise FormatError(f"{where}: unknown torch dtype {name!r}")
    return dt


def torch_dtype(name: str):
    if name not in _TABLE:
        raise FormatError(f"unknown logical dtype {name!r} (this ucp knows {', '.join(SUPPORTED)})")
    import torch

    return getattr(torch, name)


def storage_torch_dtype(name: str):
    import torch

    return getattr(torch, _TABLE[name])


def zarr_dtype(name: str) -> str:
    return _TABLE[name]


def itemsize(name: str) -> int:
    return np.dtype(_TABLE[name]).itemsize


def numpy_storage_dtype(name: str) -> np.dtype:
    return np.dtype(_TABLE[name]).newbyteorder("<") if itemsize(name) > 1 else np.dtype(_TABLE[name])


def fill_value(name: str):
    z = zarr_dtype(name)
    if z == "bool":
        return False
    if z.startswith("complex"):
        return [0.0, 0.0]
    if z.startswith("float"):
        return 0.0
    return 0


def to_storage_numpy(t) -> np.ndarray:
    """Zero-copy numpy view of a CPU tensor in its storage dtype (strides kept)."""
    name = dtype_name(t.dtype)
    st = storage_torch_dtype(name)
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if st != t.dtype:
        if t.dim() == 0:
            t = t.reshape(1).view(st).reshape(())
        elif not _last_dim_unit(t):
            t = t.contiguous()
            t = t.view(st)
        else:
            t = t.view(st)
    return t.numpy()


def to_torch(arr: np.ndarray, name: str):
    """The tensor of logical dtype ``name`` over the numpy array ``arr`` of its storage dtype
    (no copy): where a numpy box meets torch math (replica averaging)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(arr))
    want = torch_dtype(name)
    return t if t.dtype == want else t.view(want)


def _last_dim_unit(t):
    return t.stride(-1) == 1 or t.shape[-1] <= 1
