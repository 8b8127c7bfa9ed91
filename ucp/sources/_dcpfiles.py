"""Reading the files of a torch DCP checkpoint safely: ``.metadata`` and ``*.distcp`` items.

Shared by the DCP source (``ucp.sources.dcp``) and the Megatron ``torch_dist`` source, whose
files are DCP's; ``ucp.dcp``'s reader asks :func:`is_dcp_dir` to refuse a stock DCP directory.

Why not ``pickle.load`` as DCP's own ``FileSystemReader`` does: a checkpoint is input, and
unpickling input runs whatever callables it names. Here:

* ``.metadata`` is a protocol-4 pickle of DCP's metadata dataclasses. torch's weights-only
  unpickler refuses protocol-4 opcodes (``FRAME``, ``STACK_GLOBAL``, measured on torch 2.13),
  so :func:`load_metadata` uses a restricted :class:`pickle.Unpickler` whose ``find_class``
  admits exactly :data:`METADATA_GLOBALS` (DCP's metadata classes, ``torch.Size``, torch
  dtypes and layouts, paths) plus those a caller names (``extra_globals``, plus anything
  registered with ``torch.serialization.add_safe_globals`` / ``safe_globals``), and refuses
  any other global by name. No persistent ids.
* Each stored item is a ``torch.save`` zip at ``(offset, length)`` of a ``.distcp`` file.
  :meth:`DcpFiles.tensor` parses the zip's directory, unpickles its small ``data.pkl`` with
  torch's weights-only unpickler (tensor rebuild functions only) and backs the storage with a
  copy-on-write memory map of the file: a caller that slices the tensor touches only the
  pages it reads. :meth:`DcpFiles.obj` loads non-tensor items with
  ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import io
import mmap
import pickle
import threading
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, TYPE_CHECKING

from ucp.errors import UcpError, value_globals, unpickling_refusal
from ucp.sources.torchfile import LOCAL_HEADER, record_data_start

if TYPE_CHECKING:
    import torch

METADATA_FILE = ".metadata"
DISTCP_SUFFIX = ".distcp"


class DcpFileError(UcpError):
    """A DCP checkpoint file is missing, malformed or names a global outside the allow-list."""


def _metadata_classes() -> list[Any]:
    import torch
    from torch.distributed.checkpoint import filesystem, metadata

    return [metadata.Metadata, metadata.TensorStorageMetadata, metadata.BytesStorageMetadata,
            metadata.ChunkStorageMetadata, metadata.TensorProperties, metadata.StorageMeta,
            metadata.MetadataIndex, metadata._MEM_FORMAT_ENCODING, filesystem._StorageInfo,
            filesystem._StoragePrefix, torch.Size,
            torch.serialization._get_layout]   # how torch pickles a layout: by its name


def metadata_globals(extra: Iterable[Any] = ()) -> dict[str, Any]:
    """``"module.qualname" -> object`` for every global a DCP ``.metadata`` may name: DCP's
    metadata classes, ``torch.Size``, torch dtypes / layouts / memory formats, pathlib paths
    (``StorageMeta.checkpoint_id``), ``collections.OrderedDict``, plus ``extra`` and torch's
    user-registered safe globals as they are now (a job may register its classes at any time)."""
    import torch

    if not _FIXED_GLOBALS:
        _FIXED_GLOBALS.update(_named(_fixed_globals()))
    return {**_FIXED_GLOBALS, **_named([*torch.serialization.get_safe_globals(), *extra])}


#: the allow-list's part that never changes (computed on first use: it walks torch's namespace)
_FIXED_GLOBALS: dict[str, Any] = {}


def _fixed_globals() -> list[Any]:
    import collections
    import pathlib
    import torch

    objs = _metadata_classes() + [collections.OrderedDict, pathlib.PosixPath, pathlib.PurePosixPath,
                                  pathlib.WindowsPath, pathlib.PureWindowsPath]
    return objs + [(v, f"torch.{name}") for name, v in vars(torch).items()
                   if isinstance(v, (torch.dtype, torch.layout, torch.memory_format))]


def _named(objs) -> dict[str, Any]:
    """``"module.qualname" -> object``; ``(obj, "module.name")`` pairs as torch's safe_globals allows."""
    out = {}
    for obj in objs:
        if isinstance(obj, tuple):
            out[obj[1]] = obj[0]
        elif hasattr(obj, "__module__") and hasattr(obj, "__qualname__"):
            out[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return out


class _RestrictedUnpickler(pickle.Unpickler):
    """``find_class`` admits only the allow-list; persistent ids are refused."""

    def __init__(self, file, allowed: dict[str, Any], where: str):
        super().__init__(file)
        self._allowed = allowed
        self._where = where

    def find_class(self, module, name):
        full = f"{module}.{name}"
        if full not in self._allowed:
            raise DcpFileError(f"{self._where}: refusing to unpickle global {full!r}: it is not one of "
                               "DCP's metadata classes (ucp never unpickles arbitrary objects; if you trust "
                               "it, register it with torch.serialization.add_safe_globals([...]))")
        return self._allowed[full]

    def persistent_load(self, pid):
        raise DcpFileError(f"{self._where}: unexpected persistent id {pid!r} in DCP metadata")


def load_metadata(path, extra_globals: Iterable[Any] = ()):
    """The ``torch.distributed.checkpoint.metadata.Metadata`` of the checkpoint directory
    ``path`` (or of the ``.metadata`` file itself), unpickled through the allow-list.

    Raises :class:`DcpFileError` naming the file for a missing / malformed file or a global
    outside the allow-list."""
    from torch.distributed.checkpoint.metadata import Metadata

    p = Path(path)
    file = p / METADATA_FILE if p.is_dir() else p
    if not file.is_file():
        raise DcpFileError(f"{file}: no DCP metadata file (a DCP checkpoint directory holds "
                           f"{METADATA_FILE} and *{DISTCP_SUFFIX} files)")
    allowed = metadata_globals(extra_globals)
    try:
        with open(file, "rb") as f:
            md = _RestrictedUnpickler(f, allowed, str(file)).load()
    except DcpFileError:
        raise
    except Exception as e:  # truncated / not a pickle / a class whose state does not fit
        raise DcpFileError(f"{file}: not a readable DCP metadata pickle ({type(e).__name__}: {e})") from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise DcpFileError(f"{file}: holds a {type(md).__name__}, not DCP Metadata")
    if not isinstance(md.storage_data, dict):
        raise DcpFileError(f"{file}: DCP metadata without storage_data (written by a storage "
                           "writer other than FileSystemWriter?)")
    return md


# ==================================================================== items of .distcp files
class _MapView(io.RawIOBase):
    """A seekable read-only file over ``buf[start:start + length]`` (no copy): what
    ``zipfile`` needs to read a ``torch.save`` archive stored inside a ``.distcp`` file."""

    def __init__(self, buf, start: int, length: int):
        super().__init__()
        self._buf, self._start, self._len, self._pos = buf, start, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._pos

    def seek(self, pos, whence=0):
        base = {0: 0, 1: self._pos, 2: self._len}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, b):
        n = max(0, min(len(b), self._len - self._pos))
        a = self._start + self._pos
        b[:n] = self._buf[a:a + n]
        self._pos += n
        return n


def _record_data_offset(view: _MapView, info: zipfile.ZipInfo, where: str) -> int:
    """Offset (inside the archive) of the bytes of a stored (uncompressed) zip record, checked
    to lie inside the archive."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise DcpFileError(f"{where}: record {info.filename} is compressed; torch.save stores tensors raw")
    view.seek(info.header_offset)
    start = record_data_start(view.read(LOCAL_HEADER), info)
    if start is None:
        raise DcpFileError(f"{where}: bad zip local header for {info.filename}")
    if start + info.file_size > view._len:
        raise DcpFileError(f"{where}: corrupt zip record {info.filename}: its {info.file_size} bytes at "
                           f"{start} lie beyond the item ({view._len} bytes)")
    return start


def _read_record(zf: zipfile.ZipFile, name: str, where: str) -> bytes:
    """The bytes of the zip record ``name``, CRC-checked by ``zipfile``."""
    try:
        return zf.read(name)
    except Exception as e:   # zipfile raises BadZipFile, EOFError, NotImplementedError, RuntimeError, ...
        raise DcpFileError(f"{where}: corrupt zip record {name} ({type(e).__name__}: {e})") from None


class DcpFiles:
    """Random access to the items of one DCP checkpoint directory.

    ``metadata`` is the safely loaded ``Metadata``; :meth:`tensor` / :meth:`obj` read one
    stored item by its ``MetadataIndex`` (the keys of ``metadata.storage_data``). Files are
    memory-mapped once and shared by every thread; :meth:`close` releases them.
    """

    def __init__(self, path, extra_globals: Iterable[Any] = (), metadata=None):
        self.path = Path(path)
        self.metadata = metadata if metadata is not None else load_metadata(self.path, extra_globals)
        self._maps: dict[str, mmap.mmap] = {}
        self._lock = threading.Lock()
        self._checked: set[tuple[str, str]] = set()   # (item, record) that passed its CRC-32

    # ---------------------------------------------------------------- lookup
    def storage_info(self, index):
        """``_StorageInfo`` (relative_path, offset, length) of the item ``index``."""
        info = self.metadata.storage_data.get(index)
        if info is None:
            raise DcpFileError(f"{self.path / METADATA_FILE}: no stored item for {index.fqn!r} at offset "
                               f"{tuple(index.offset) if index.offset is not None else None}")
        if getattr(info, "transform_descriptors", None):
            raise DcpFileError(f"{self.path / info.relative_path}: item {index.fqn!r} was written through "
                               f"stream transforms {list(info.transform_descriptors)}; not supported")
        return info

    def _map(self, rel: str) -> mmap.mmap:
        with self._lock:
            m = self._maps.get(rel)
            if m is None:
                file = self.path / rel
                if Path(rel).is_absolute() or ".." in Path(rel).parts:
                    raise DcpFileError(f"{self.path / METADATA_FILE}: item file {rel!r} lies outside "
                                       "the checkpoint directory")
                try:
                    with open(file, "rb") as f:
                        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                except (OSError, ValueError) as e:
                    raise DcpFileError(f"{file}: cannot map DCP data file ({e})") from None
                self._maps[rel] = m
            return m

    def _view(self, index) -> tuple[_MapView, str]:
        info = self.storage_info(index)
        m = self._map(info.relative_path)
        where = f"{self.path / info.relative_path} [{info.offset}, +{info.length}) ({index.fqn})"
        if info.offset < 0 or info.length < 0 or info.offset + info.length > len(m):
            raise DcpFileError(f"{where}: item lies beyond the end of the file ({len(m)} bytes)")
        return _MapView(m, info.offset, info.length), where

    # ---------------------------------------------------------------- reading
    def tensor(self, index) -> torch.Tensor:
        """The stored tensor of item ``index``, backed by a copy-on-write map of its file (no
        bytes are read until the caller touches them; writes never reach the file)."""
        view, where = self._view(index)
        try:
            zf = zipfile.ZipFile(view)
        except Exception as e:   # BadZipFile, or what a corrupt directory trips (UnicodeDecodeError, ...)
            raise DcpFileError(f"{where}: not a torch.save archive ({type(e).__name__}: {e}); only DCP's "
                               "default torch_save serialization is supported") from None
        def check(start: int, rec: zipfile.ZipInfo) -> None:
            """The record's CRC-32 (the zip directory's) over its bytes, once per record: neither
            ``torch.load`` nor DCP's FileSystemReader checks it, and a flipped byte would convert
            into a wrong value without a word."""
            record = (where, rec.filename)
            if not rec.CRC or record in self._checked:
                return
            with memoryview(view._buf) as mv:
                got = zlib.crc32(mv[start:start + rec.file_size])
            if got != rec.CRC:
                raise DcpFileError(f"{where}: corrupt zip record {rec.filename}: its bytes' CRC-32 is {got:#010x}, "
                                   f"the zip directory says {rec.CRC:#010x}")
            with self._lock:
                self._checked.add(record)

        with zf:
            return _load_mapped(zf, view, where, check)

    def obj(self, index) -> Any:
        """A non-tensor item (``BytesStorageMetadata``), through ``torch.load(weights_only=True)``."""
        import torch

        view, where = self._view(index)
        try:
            with torch.serialization.safe_globals(value_globals()):
                return torch.load(view, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise DcpFileError(f"{where}: refused to unpickle: {unpickling_refusal(e)}") from None
        except Exception as e:
            raise DcpFileError(f"{where}: unreadable item ({type(e).__name__}: {e})") from None

    def close(self) -> None:
        with self._lock:
            maps, self._maps = self._maps, {}
        for m in maps.values():
            try:
                m.close()
            except BufferError:     # a tensor still views it: the map is freed with that tensor
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _load_mapped(zf: zipfile.ZipFile, view: _MapView, where: str, check=None) -> torch.Tensor:
    """The tensor of one torch.save archive inside a mapped ``.distcp`` item, over the map;
    ``check(start, record)`` is called on each storage record before it is used."""
    import torch

    names = zf.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
        raise DcpFileError(f"{where}: torch.save archive without data.pkl")
    prefix = pkl[0][: -len("data.pkl")]
    order = "little"
    if prefix + "byteorder" in names:
        order = _read_record(zf, prefix + "byteorder", where).decode("utf-8", errors="replace")
    if order != "little":
        raise DcpFileError(f"{where}: tensor saved with byte order {order!r}; only little-endian is supported")
    infos = {i.filename: i for i in zf.infolist()}
    base = view._start

    def persistent_load(pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise DcpFileError(f"{where}: unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        dtype = storage_type.dtype if hasattr(storage_type, "dtype") else storage_type
        rec = infos.get(f"{prefix}data/{key}")
        if rec is None:
            raise DcpFileError(f"{where}: storage record data/{key} missing")
        nbytes = int(numel) * torch._utils._element_size(dtype)
        if rec.file_size < nbytes:
            raise DcpFileError(f"{where}: storage record data/{key} holds {rec.file_size} bytes, "
                               f"{nbytes} expected")
        start = base + _record_data_offset(view, rec, where)
        if check is not None:
            check(start, rec)
        raw = torch.frombuffer(view._buf, dtype=torch.uint8, count=nbytes, offset=start) if nbytes else \
            torch.empty(0, dtype=torch.uint8)
        return torch.storage.TypedStorage(wrap_storage=raw.untyped_storage(), dtype=dtype, _internal=True)

    from torch import _weights_only_unpickler as wo

    unpickler = wo.Unpickler(io.BytesIO(_read_record(zf, pkl[0], where)), encoding="utf-8")
    unpickler.persistent_load = persistent_load
    try:
        t = unpickler.load()
    except DcpFileError:
        raise
    except pickle.UnpicklingError as e:
        raise DcpFileError(f"{where}: refused to unpickle: {unpickling_refusal(e)}") from None
    except Exception as e:   # a data.pkl that passed its CRC yet does not rebuild a tensor
        raise DcpFileError(f"{where}: unreadable item ({type(e).__name__}: {e})") from None
    if not isinstance(t, torch.Tensor):
        raise DcpFileError(f"{where}: item holds a {type(t).__name__}, a tensor was expected")
    return t


def tensor_chunks(metadata) -> Iterator[tuple[str, Any, int, Any]]:
    """``(fqn, TensorStorageMetadata, chunk_number, MetadataIndex)`` for every stored tensor
    chunk, in the metadata's order."""
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            for k, ch in enumerate(md.chunks):
                yield fqn, md, k, MetadataIndex(fqn, ch.offsets, k)


def is_dcp_dir(path) -> bool:
    """True for a directory holding ``.metadata`` and at least one ``*.distcp`` file."""
    p = Path(path)
    return p.is_dir() and (p / METADATA_FILE).is_file() and any(p.glob(f"*{DISTCP_SUFFIX}"))


def chunk_box(chunk) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(start, stop)`` of a ``ChunkStorageMetadata`` in the global tensor."""
    start = tuple(int(o) for o in chunk.offsets)
    return start, tuple(o + int(s) for o, s in zip(start, chunk.sizes))


def optional_index(metadata, fqn: str) -> Optional[Any]:
    """The ``MetadataIndex`` of the non-tensor item ``fqn`` (``None`` when absent)."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    idx = MetadataIndex(fqn)
    return idx if idx in metadata.storage_data else None
