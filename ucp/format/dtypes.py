"""Logical torch dtypes <-> zarr v3 storage data types (bit-exact views)."""
from __future__ import annotations

import numpy as np
import torch

from ucp.errors import FormatError, UcpError

# logical name -> (torch dtype, storage torch dtype, zarr data_type)
_TABLE: dict[str, tuple[torch.dtype, torch.dtype, str]] = {}


def _add(name, storage, zarr_name=None):
    dt = getattr(torch, name, None)
    if dt is None:
        return
    st = getattr(torch, storage)
    _TABLE[name] = (dt, st, zarr_name or storage)


for _n in ["float16", "float32", "float64", "int8", "int16", "int32", "int64",
           "uint8", "uint16", "uint32", "uint64", "bool", "complex64", "complex128"]:
    _add(_n, _n)
_add("bfloat16", "uint16")
for _n in ["float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"]:
    _add(_n, "uint8")

BY_TORCH = {v[0]: k for k, v in _TABLE.items()}
SUPPORTED = tuple(_TABLE)


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return BY_TORCH[dtype]
    except KeyError:
        raise UcpError(f"dtype {dtype} is not supported by the ucp format; supported: {', '.join(SUPPORTED)}") from None


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _TABLE[name][0]
    except KeyError:
        raise FormatError(f"unknown logical dtype {name!r} (this ucp knows {', '.join(SUPPORTED)})") from None


def storage_torch_dtype(name: str) -> torch.dtype:
    return _TABLE[name][1]


def zarr_dtype(name: str) -> str:
    return _TABLE[name][2]


def itemsize(name: str) -> int:
    return _TABLE[name][1].itemsize


def numpy_storage_dtype(name: str) -> np.dtype:
    return np.dtype(_TABLE[name][2]).newbyteorder("<") if itemsize(name) > 1 else np.dtype(_TABLE[name][2])


def fill_value(name: str):
    z = zarr_dtype(name)
    if z == "bool":
        return False
    if z.startswith("complex"):
        return [0.0, 0.0]
    if z.startswith("float"):
        return 0.0
    return 0


def to_storage_numpy(t: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view of a CPU tensor in its storage dtype (strides kept)."""
    name = dtype_name(t.dtype)
    st = _TABLE[name][1]
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


def _last_dim_unit(t):
    return t.stride(-1) == 1 or t.shape[-1] <= 1
