"""``torch.save`` files read without torch: the pickle, with every tensor a :class:`SavedTensor`
(dtype, shape, strides, where its bytes lie in the file), and byte ranges of them as numpy.

Why not ``torch.load(map_location="meta")``: converting a DeepSpeed checkpoint is bound by the
disk, and importing torch took 1.5-2 s of the 5 s a 4 GiB conversion takes; nothing in it needs
torch's math, only where each tensor's bytes lie. The file format (torch >= 1.6, the only one
DeepSpeed's ZeRO checkpoints use): a zip archive stored without compression, ``<name>/data.pkl``
the pickled object, ``<name>/data/<key>`` one entry per storage.

Safety is ``torch.load(weights_only=True)``'s: the unpickler resolves only the globals of
:data:`TORCH_GLOBALS` (torch's tensor, storage and dtype names, rebuilt as stand-ins) and those
the caller allows; any other global is refused, named, before anything is called.
"""
from __future__ import annotations

import codecs
import math
import mmap
import os
import pickle
import struct
import threading
import zipfile
import zlib
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from ucp.errors import UcpError
from ucp.format import dtypes
from ucp.format.dtypes import SUPPORTED, Dtype


#: bytes read at a time to check a record's CRC-32
CRC_BLOCK = 8 << 20


class TorchFileError(UcpError):
    """A ``torch.save`` file that cannot be read (names the file), or names a refused global."""


class RefusedGlobal(TorchFileError):
    def __init__(self, path, name: str):
        super().__init__(f"{path}: refuses to unpickle global {name}")
        self.global_name = name


#: legacy storage class -> logical dtype (``torch.FloatStorage`` is what torch pickles for a float32 tensor)
STORAGES = {"FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
            "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
            "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
            "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8"}


class _StorageType:
    __slots__ = ("dtype",)

    def __init__(self, name: str):
        self.dtype = Dtype(name)


class _Storage:
    """One ``data/<key>`` entry: its dtype, elements and where its bytes start in the file; the
    record's size and CRC-32 from the zip directory, and whether its bytes were checked."""
    __slots__ = ("file", "dtype", "numel", "offset", "name", "size", "crc", "checked", "lock")

    def __init__(self, file, dtype: Dtype, numel: int, offset: int, info: Optional[zipfile.ZipInfo] = None):
        self.file, self.dtype, self.numel, self.offset = file, dtype, numel, offset
        self.name = info.filename if info is not None else ""
        self.size = info.file_size if info is not None else 0
        self.crc = info.CRC if info is not None else 0
        self.checked = info is None or info.CRC == 0   # 0: written with torch's CRC-32 turned off
        self.lock = threading.Lock()


class SavedTensor:
    """A tensor as ``torch.save`` stored it; no byte is read until asked (:meth:`numpy`, or the
    file's :meth:`TorchFile.read` and friends)."""
    __slots__ = ("storage", "shape", "_stride", "_offset")

    def __init__(self, storage: _Storage, offset: int, shape, stride):
        self.storage, self._offset = storage, int(offset)
        self.shape, self._stride = tuple(int(n) for n in shape), tuple(int(s) for s in stride)

    @property
    def dtype(self) -> Dtype:
        return self.storage.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def stride(self) -> tuple:
        return self._stride

    def storage_offset(self) -> int:
        return self._offset

    def element_size(self) -> int:
        return self.dtype.itemsize

    def extent(self) -> int:
        """Elements of the storage the tensor spans from its first one."""
        return 1 + sum((n - 1) * s for n, s in zip(self.shape, self._stride)) if self.numel() else 0

    def is_contiguous(self) -> bool:
        want = 1
        for n, s in zip(reversed(self.shape), reversed(self._stride)):
            if n != 1 and s != want:
                return False
            want *= n
        return True

    def reshape(self, *shape) -> "SavedTensor":
        """A contiguous tensor with another shape (one dimension may be -1), as ``torch.reshape``."""
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        if -1 in shape:
            known = math.prod(n for n in shape if n != -1)
            shape = tuple(self.numel() // max(known, 1) if n == -1 else n for n in shape)
        if not self.is_contiguous() or math.prod(shape) != self.numel():
            raise TorchFileError(f"{self.storage.file.path}: cannot view a tensor of shape {self.shape} "
                                 f"(strides {self._stride}) as {shape}")
        strides = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        return SavedTensor(self.storage, self._offset, shape, strides)

    def numpy(self) -> np.ndarray:
        """The tensor read from the file, as numpy in its storage dtype (bfloat16 as ``uint16``)."""
        return self.storage.file.box(self, (0,) * self.ndim, self.shape).copy()

    def item(self):
        return self.numpy().item()

    def __repr__(self) -> str:
        return f"SavedTensor(shape={self.shape}, dtype={self.dtype})"


def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor rebuilt from something that is not a storage")
    if storage_offset < 0 or min((*size, *stride), default=0) < 0:
        raise pickle.UnpicklingError(f"a tensor with a negative storage offset, size or stride (offset "
                                     f"{storage_offset}, size {tuple(size)}, stride {tuple(stride)})")
    t = SavedTensor(storage, storage_offset, size, stride)
    if t.numel() and storage_offset + t.extent() > storage.numel:
        raise pickle.UnpicklingError(f"a tensor of shape {t.shape} runs past its storage of {storage.numel} "
                                     f"elements")
    return t


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


class _TensorClass:
    """``torch.Tensor`` / ``torch.nn.Parameter`` named in a pickle: only compared against."""


_TENSOR_CLASSES = (_TensorClass(), _TensorClass())


def _rebuild_from_type(func, new_type, args, state):
    """``torch._tensor._rebuild_from_type_v2``: a plain tensor with attributes (``state``, e.g.
    what DeepSpeed sets on its partitions) is the tensor; a subclass is refused."""
    if new_type not in _TENSOR_CLASSES:
        raise pickle.UnpicklingError("a tensor subclass")
    return func(*args)


#: ``module.name`` -> what the unpickler makes of it: the globals ``torch.load(weights_only=True)``
#: allows that ``torch.save`` writes for plain tensors and containers
TORCH_GLOBALS: dict[str, Any] = {
    "collections.OrderedDict": OrderedDict, "collections.Counter": Counter,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor, "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type,
    "torch.Tensor": _TENSOR_CLASSES[0], "torch.nn.parameter.Parameter": _TENSOR_CLASSES[1],
    "torch.Size": tuple, "torch.device": str,
    "_codecs.encode": codecs.encode, "builtins.bytearray": bytearray, "builtins.set": set,
    "builtins.complex": complex,
    **{f"torch.{n}": Dtype(n) for n in SUPPORTED},
    **{f"torch.{s}": _StorageType(d) for s, d in STORAGES.items()},
}


class TorchFile:
    """One ``torch.save`` file: :attr:`obj` is what it pickled (tensors as :class:`SavedTensor`),
    and the read methods give byte ranges of those tensors as numpy, with ``pread`` into fresh
    (or recycled: ``buffers``, a ``ReadBuffers``) memory or a private map.

    Why ``pread`` and not a map of the whole file: mapped pages stay resident (and count in the
    process's memory) until the map goes; reading each box into a buffer freed once written keeps
    memory bounded by the largest box.

    ``allowed``: more globals (``{"module.name": stand-in}``) beyond :data:`TORCH_GLOBALS`."""

    def __init__(self, path, allowed: Optional[Mapping[str, Any]] = None, buffers=None):
        self.path = Path(path)
        if not self.path.is_file():
            raise TorchFileError(f"{self.path}: file is missing")
        self._buffers = buffers
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self.size = os.fstat(self._fd).st_size
            self.obj = self._load({**TORCH_GLOBALS, **(allowed or {})})
        except BaseException:
            self.close()
            raise

    # -- the pickle
    def _load(self, allowed):
        try:
            with zipfile.ZipFile(self.path) as z:
                infos = {i.filename: i for i in z.infolist()}
                pkl = [n for n in infos if n.endswith("/data.pkl") or n == "data.pkl"]
                if len(pkl) != 1:
                    raise TorchFileError(f"{self.path}: not a torch.save file (no data.pkl in the zip archive)")
                prefix = pkl[0][:-len("data.pkl")]
                order = infos.get(prefix + "byteorder")
                if order is not None and z.read(order).strip() not in (b"little", b""):
                    raise TorchFileError(f"{self.path}: saved big-endian; ucp reads little-endian files only")
                data = z.read(pkl[0])
        except zipfile.BadZipFile as e:
            raise TorchFileError(f"{self.path}: not a zip torch.save file, truncated or corrupt? ({e}; files of "
                                 f"torch < 1.6's legacy format are not read)") from None
        unpickler = _Unpickler(self, allowed, infos, prefix, data)
        try:
            return unpickler.load()
        except TorchFileError:
            raise
        except Exception as e:  # pickle raises many types for truncated or hostile bytes
            raise TorchFileError(f"{self.path}: cannot be unpickled, truncated or corrupt? "
                                 f"({type(e).__name__}: {e})") from None

    def _storage(self, info: zipfile.ZipInfo, dtype: Dtype, numel: int) -> _Storage:
        if info.compress_type != zipfile.ZIP_STORED:
            raise TorchFileError(f"{self.path}: {info.filename} is compressed (torch.save stores its "
                                 f"tensors uncompressed)")
        offset = _record_offset(self._fd, info, self.path)
        if numel * dtype.itemsize > info.file_size or offset + info.file_size > self.size:
            raise TorchFileError(f"{self.path}: truncated: storage {info.filename} needs "
                                 f"{numel * dtype.itemsize} bytes at byte {offset}, the file has {self.size}")
        return _Storage(self, dtype, numel, offset, info)

    # -- tensor bytes
    def _check(self, s: _Storage) -> None:
        """Check the record's CRC-32 (the zip directory's) over all its bytes, once, before any of
        them is used. ``torch.load`` never checks it: a flipped byte inside a DeepSpeed rank file
        converted without a word into NaNs that only ``ucp diff`` saw. Costs one pass over the
        record at ~2 GB/s a thread (``zlib.crc32``, GIL released); a record is checked by the
        first thread that reads it while the others wait for it."""
        if s.checked:
            return
        with s.lock:
            if s.checked:
                return
            check_record(self._fd, s.offset, s.size, s.crc, self.path, s.name)
            s.checked = True

    def _offset(self, t: SavedTensor, lo: int, n: int) -> int:
        """The file offset of element ``lo`` of ``t``, checked to have ``n`` bytes after it (and
        its record's CRC-32 checked, :meth:`_check`)."""
        self._check(t.storage)
        offset = t.storage.offset + (t.storage_offset() + lo) * t.element_size()
        if offset + n > self.size:
            raise TorchFileError(f"{self.path}: truncated: a tensor's bytes end at {offset + n}, "
                                 f"the file has {self.size}")
        return offset

    def _pread(self, t: SavedTensor, lo: int, out: np.ndarray) -> None:
        """Fill ``out`` (contiguous, any dtype) from the file, from element ``lo`` of ``t`` on."""
        raw = out.reshape(-1).view(np.uint8)
        offset = self._offset(t, lo, raw.size)
        got = os.preadv(self._fd, [raw], offset) if raw.size else 0
        if got != raw.size:
            raise TorchFileError(f"{self.path}: short read at byte {offset} (truncated?)")

    def read(self, t: SavedTensor, lo: int = 0, hi: Optional[int] = None) -> np.ndarray:
        """Elements ``[lo, hi)`` of the storage run that starts at ``t``'s first element (a
        contiguous tensor's flat elements), as a new 1-D array in the storage dtype."""
        hi = t.numel() if hi is None else hi
        n = (hi - lo) * t.element_size()
        out = self._buffers.take(n) if self._buffers else np.empty(n, dtype=np.uint8)
        self._pread(t, lo, out)
        return out.view(t.dtype.storage)

    def read_into(self, t: SavedTensor, start, stop, out: np.ndarray) -> bool:
        """Read the box ``[start, stop)`` of contiguous ``t`` straight into ``out`` (a contiguous
        array of the box's shape), with no buffer in between. False, with ``out`` untouched,
        when the box is not one flat span of ``t`` (a column block of a 2-D tensor): the caller
        reads it with :meth:`box`."""
        if not out.size:
            return True
        span = flat_span(t, start, stop)
        if span is None:
            return False
        self._pread(t, span[0], out)
        return True

    def view(self, t: SavedTensor, lo: int, hi: int) -> np.ndarray:
        """Elements ``[lo, hi)`` of the storage run that starts at ``t``'s first element, over a
        private map of just those bytes of the file: no copy, where :meth:`read` copies them
        into a buffer (a write to the array would copy the page it touches, never reach the
        file). The map goes when the last view of it does.

        Why: the engine hands a band that one piece covers to the writer as it is, and the
        writer copies it once more into the file it builds: the page cache -> the file's bytes
        in one copy instead of two (2 GiB in 32 MiB windows: 0.28 CPU s against 0.64 with
        ``preadv`` into a reused buffer and a copy; populating a shared map when made, no faster)."""
        n = (hi - lo) * t.element_size()
        offset = self._offset(t, lo, n)
        if not n:
            return np.empty(0, dtype=t.dtype.storage)
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        window = mmap.mmap(self._fd, offset + n - start, flags=mmap.MAP_PRIVATE,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        return np.frombuffer(window, dtype=np.uint8, count=n, offset=offset - start).view(t.dtype.storage)

    def box(self, t: SavedTensor, start, stop) -> np.ndarray:
        """The box ``[start, stop)`` of ``t``, reading only the span of the storage it covers."""
        shape = tuple(b - a for a, b in zip(start, stop))
        if 0 in shape:
            return np.empty(shape, dtype=t.dtype.storage)
        if not t.is_contiguous():  # DeepSpeed saves clones; read the extent and view it as saved
            whole = _strided(self.read(t, 0, t.extent()), t.shape, t.stride())
            return whole[tuple(slice(a, b) for a, b in zip(start, stop))]
        lo = sum(a * s for a, s in zip(start, t.stride()))
        hi = sum((b - 1) * s for b, s in zip(stop, t.stride())) + 1
        return _strided(self.read(t, lo, hi), shape, t.stride())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


#: bytes of a zip local file header, before the record's name and extra field
LOCAL_HEADER = 30


def record_data_start(head: bytes, info: zipfile.ZipInfo) -> Optional[int]:
    """Where the bytes of the zip record ``info`` start, from its local header ``head`` (the
    :data:`LOCAL_HEADER` bytes at ``info.header_offset``): after the name and the extra field, whose
    lengths only that header gives (torch pads the extra field to align tensor data, so the central
    directory's copy does not tell). None where ``head`` is no local header."""
    if len(head) != LOCAL_HEADER or head[:4] != b"PK\x03\x04":
        return None
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + LOCAL_HEADER + name_len + extra_len


def _record_offset(fd: int, info: zipfile.ZipInfo, path) -> int:
    """Where the bytes of zip record ``info`` start in the open file ``fd`` (``path``)."""
    start = record_data_start(os.pread(fd, LOCAL_HEADER, info.header_offset), info)
    if start is None:
        raise TorchFileError(f"{path}: no zip entry header for {info.filename}, truncated or corrupt?")
    return start


def check_record(fd: int, offset: int, size: int, crc: int, path, name: str) -> None:
    """The ``size`` bytes at ``offset`` of open file ``fd`` (zip record ``name`` of ``path``) against
    the CRC-32 ``crc`` of the zip directory, read ``CRC_BLOCK`` at a time; raises naming both."""
    buf = memoryview(bytearray(min(CRC_BLOCK, max(size, 1))))
    got, at, end = 0, offset, offset + size
    while at < end:
        n = os.preadv(fd, [buf[:min(len(buf), end - at)]], at)
        if n <= 0:
            raise TorchFileError(f"{path}: truncated: {name} ends at byte {end}, the file has {os.fstat(fd).st_size}")
        got = zlib.crc32(buf[:n], got)
        at += n
    if got != crc:
        raise TorchFileError(f"{path}: {name} is corrupt: its bytes' CRC-32 is {got:#010x}, the zip directory "
                             f"says {crc:#010x}")


def check_records(path) -> None:
    """Every stored record of the ``torch.save`` zip at ``path`` against its CRC-32 (records
    written with torch's CRC-32 turned off, ``CRC == 0``, are skipped): for readers that hand the
    file to ``torch.load``, which never checks them."""
    path = Path(path)
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as z:
            fd = f.fileno()
            for info in z.infolist():
                if not info.CRC or info.compress_type != zipfile.ZIP_STORED:
                    continue
                check_record(fd, _record_offset(fd, info, path), info.file_size, info.CRC, path, info.filename)
    except zipfile.BadZipFile as e:
        raise TorchFileError(f"{path}: not a zip torch.save file, truncated or corrupt? ({e})") from None


def _strided(flat: np.ndarray, shape, stride) -> np.ndarray:
    isz = flat.itemsize
    return np.lib.stride_tricks.as_strided(flat, shape=tuple(shape), strides=tuple(s * isz for s in stride),
                                           writeable=False)


def flat_span(t, start, stop) -> Optional[tuple[int, int]]:
    """``[lo, hi)``: the elements of contiguous tensor ``t`` that its box ``[start, stop)``
    (not empty) covers, when they are one flat span; None otherwise (a column block)."""
    lo = sum(a * s for a, s in zip(start, t.stride()))
    hi = sum((b - 1) * s for b, s in zip(stop, t.stride())) + 1
    return (lo, hi) if hi - lo == math.prod(b - a for a, b in zip(start, stop)) else None


def materialise(obj):
    """``obj`` with every :class:`SavedTensor` in its containers read: a numpy array where numpy
    has the dtype, else (bfloat16, float8) a torch tensor, so that metadata keeps the logical
    dtype (torch is imported only then)."""
    if isinstance(obj, SavedTensor):
        a = obj.numpy()
        return a if a.dtype.name == obj.dtype.name else dtypes.to_torch(a, obj.dtype.name)
    if type(obj) in (dict, OrderedDict, list, tuple):
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        done = [(k, materialise(v)) for k, v in items]
        return type(obj)(done) if isinstance(obj, dict) else type(obj)(v for _, v in done)
    return obj


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: TorchFile, allowed, infos, prefix, data: bytes):
        import io

        super().__init__(io.BytesIO(data))
        self._file, self._allowed, self._infos, self._prefix = file, allowed, infos, prefix
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        import _compat_pickle   # protocol 2 names Python 2's modules (``__builtin__.set``), as pickle maps them

        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        if full not in self._allowed:
            raise RefusedGlobal(self._file.path, full)
        return self._allowed[full]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unknown persistent id {str(pid)[:80]}")
        _, kind, key, _location, numel = pid
        if key not in self._storages:
            info = self._infos.get(f"{self._prefix}data/{key}")
            if info is None:
                raise TorchFileError(f"{self._file.path}: storage {key} is missing from the archive "
                                     f"(truncated or corrupt?)")
            self._storages[key] = self._file._storage(info, kind.dtype, int(numel))
        return self._storages[key]
