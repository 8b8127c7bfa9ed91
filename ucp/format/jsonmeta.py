"""Non-tensor state <-> JSON (never pickle).

Encoding: dict with str keys -> object (a dict with a non-str key, or a key starting with '$',
becomes {"$dict": [[key, value], ...]}); list/tuple -> array; None/bool/int/str as is;
float -> number, non-finite as {"$float": "nan"|"inf"|"-inf"}; numpy/torch scalars -> Python
numbers; bytes -> {"$bytes": base64}; torch.Tensor / numpy.ndarray -> {"$tensor": "_ucp/meta/<n>"}
stored as a small array; torch.dtype -> {"$dtype": name}.
"""
from __future__ import annotations

import base64
import math

import numpy as np
import torch

from ucp.errors import MetadataEncodingError


def _float(x: float):
    if math.isnan(x):
        return {"$float": "nan"}
    if math.isinf(x):
        return {"$float": "inf" if x > 0 else "-inf"}
    return x


def encode(obj, add_tensor, where="metadata"):
    """``add_tensor(tensor) -> path`` stores a tensor and returns its array path."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return _float(float(obj))
    if isinstance(obj, torch.Tensor):
        return {"$tensor": add_tensor(obj)}
    if isinstance(obj, np.ndarray):
        return {"$tensor": add_tensor(torch.from_numpy(np.ascontiguousarray(obj)))}
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return _float(float(obj))
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, torch.dtype):
        return {"$dtype": str(obj).removeprefix("torch.")}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: encode(v, add_tensor, f"{where}.{k}") for k, v in obj.items()}
        return {"$dict": [[encode(k, add_tensor, f"{where}[key]"), encode(v, add_tensor, f"{where}[{k!r}]")]
                          for k, v in obj.items()]}
    if isinstance(obj, (list, tuple, torch.Size)):
        return [encode(v, add_tensor, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise MetadataEncodingError(
        f"{where}: cannot store a {type(obj).__module__}.{type(obj).__qualname__} in ucp metadata "
        "(JSON values, bytes, numpy/torch scalars and tensors only; ucp never pickles)")


def _hashable(k):
    return tuple(_hashable(x) for x in k) if isinstance(k, list) else k


def decode(obj, get_tensor):
    if isinstance(obj, list):
        return [decode(v, get_tensor) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            (k, v), = obj.items()
            if k == "$float":
                return float(v)
            if k == "$tensor":
                return get_tensor(v)
            if k == "$bytes":
                return base64.b64decode(v)
            if k == "$dtype":
                return getattr(torch, v)
            if k == "$dict":
                return {_hashable(decode(a, get_tensor)): decode(b, get_tensor) for a, b in v}
        return {k: decode(v, get_tensor) for k, v in obj.items()}
    return obj
