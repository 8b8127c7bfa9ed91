"""Non-tensor state <-> JSON (never pickle).

Encoding: dict with str keys -> object (a dict with a non-str key, or a key starting with '$',
becomes {"$dict": [[key, value], ...]}); list -> array; tuple (torch.Size too) -> {"$tuple":
array}, read back as a tuple (``random.getstate()`` must come back a tuple); None/bool/int/str as is;
float -> number, non-finite as {"$float": "nan"|"inf"|"-inf"}; numpy/torch scalars -> Python
numbers; bytes -> {"$bytes": base64}; torch.Tensor -> {"$tensor": "_ucp/meta/<n>"} stored as a small
array, numpy.ndarray -> {"$ndarray": ...} stored the same way and read back as numpy; torch.dtype
(or ``dtypes.Dtype``) -> {"$dtype": name}. Encoding never imports torch: where it is not
imported, no value is a torch object.
"""
from __future__ import annotations

import base64
import binascii
import math

import sys

import numpy as np

from ucp.errors import FormatError, MetadataEncodingError
from ucp.format import dtypes


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
    if isinstance(obj, np.ndarray):
        return {"$ndarray": add_tensor(obj)}
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return {"$tensor": add_tensor(obj)}
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return _float(float(obj))
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(obj)).decode("ascii")}
    if dtypes.is_dtype(obj):
        if not dtypes.is_supported(obj):
            raise MetadataEncodingError(f"{where}: dtype {obj} is not a ucp dtype ({', '.join(dtypes.SUPPORTED)})")
        return {"$dtype": dtypes.dtype_name(obj)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: encode(v, add_tensor, f"{where}.{k}") for k, v in obj.items()}
        return {"$dict": [[encode(k, add_tensor, f"{where}[key]"), encode(v, add_tensor, f"{where}[{k!r}]")]
                          for k, v in obj.items()]}
    if isinstance(obj, tuple):   # torch.Size is one
        return {"$tuple": [encode(v, add_tensor, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, add_tensor, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise MetadataEncodingError(
        f"{where}: cannot store a {type(obj).__module__}.{type(obj).__qualname__} in ucp metadata "
        "(JSON values, bytes, numpy/torch scalars and tensors only; ucp never pickles)")


def _hashable(k):
    return tuple(_hashable(x) for x in k) if isinstance(k, list) else k


_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _wrapper(k, v, get_tensor, where):
    """Decode one ``{"$...": v}`` wrapper; every malformed one is a FormatError naming ``where``."""
    if k == "$float":
        if isinstance(v, str) and v in _FLOATS:
            return _FLOATS[v]
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        raise FormatError(f"{where}: $float {str(v)[:40]!r} is not 'nan', 'inf', '-inf' or a number")
    if k in ("$tensor", "$ndarray"):
        try:
            if not isinstance(v, str):
                raise LookupError(v)
            t = get_tensor(v)
        except LookupError:
            raise FormatError(f"{where}: {k} {str(v)[:80]!r} names no metadata array of the manifest") from None
        return t if k == "$tensor" or isinstance(t, np.ndarray) else t.numpy()
    if k == "$bytes":
        try:
            return base64.b64decode(v, validate=True)
        except (TypeError, ValueError, binascii.Error):
            raise FormatError(f"{where}: $bytes is not valid base64") from None
    if k == "$dtype":
        if not isinstance(v, str) or v not in dtypes.SUPPORTED:
            raise FormatError(f"{where}: $dtype {str(v)[:40]!r} is not a ucp dtype (FORMAT.md §4.1: "
                              f"{', '.join(dtypes.SUPPORTED)})")
        return dtypes.torch_dtype(v)
    if k == "$tuple":
        if not isinstance(v, list):
            raise FormatError(f"{where}: $tuple is not an array")
        return tuple(decode(x, get_tensor, f"{where}[{i}]") for i, x in enumerate(v))
    if k == "$dict":
        if not isinstance(v, list) or not all(isinstance(p, list) and len(p) == 2 for p in v):
            raise FormatError(f"{where}: $dict is not a list of [key, value] pairs")
        out = {}
        for i, (a, b) in enumerate(v):
            key = _hashable(decode(a, get_tensor, f"{where}.$dict[{i}][0]"))
            try:
                out[key] = decode(b, get_tensor, f"{where}.$dict[{i}][1]")
            except TypeError:
                raise FormatError(f"{where}.$dict[{i}]: key {str(key)[:40]} is not hashable") from None
        return out
    raise FormatError(f"{where}: unknown wrapper {k!r} (keys starting with '$' are reserved)")


def decode(obj, get_tensor, where="metadata"):
    """Inverse of ``encode``. ``get_tensor(path)`` reads a stored tensor (raising LookupError for an
    unknown path). Malformed input raises ``FormatError`` naming the key path (``where``)."""
    if isinstance(obj, list):
        return [decode(v, get_tensor, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if len(obj) == 1:
            (k, v), = obj.items()
            if isinstance(k, str) and k.startswith("$"):
                return _wrapper(k, v, get_tensor, f"{where}.{k}")
        return {k: decode(v, get_tensor, f"{where}.{k}") for k, v in obj.items()}
    return obj
