"""``torch.save`` files read without torch (``ucp.sources.torchfile``) and the recycled read
buffers the DeepSpeed source reads boxes into (``ucp.engine.buffers.ReadBuffers``).

Reference answers are torch's own: files written by ``torch.save`` and read back by
``torch.load(weights_only=True)``, compared bit for bit. A buffer may only be handed out again
once nothing views it: the engine holds a box as a dtype view, a slice or a strided view of it
until the box is staged or written. No DeepSpeed needed.
"""
from __future__ import annotations

import collections
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from ucp.engine.buffers import ReadBuffers
from ucp.format import dtypes
from ucp.sources.torchfile import RefusedGlobal, SavedTensor, TorchFile, TorchFileError, flat_span, materialise


def _saved(tmp_path, saved, name="states.pt"):
    """``saved`` written with ``torch.save``: its path, ``torch.load``'s answer, ucp's reader."""
    path = tmp_path / name
    torch.save(saved, path)
    return path, torch.load(path, weights_only=True), TorchFile(path)


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def _bits_equal(box: np.ndarray, ref: torch.Tensor) -> bool:
    """Bit-exact equality of a numpy box in the storage dtype and torch's tensor (NaN payloads and
    signed zeros included)."""
    return box.dtype == dtypes.numpy_storage_dtype(dtypes.dtype_name(ref.dtype)) and \
        tuple(box.shape) == tuple(ref.shape) and np.array_equal(np.ascontiguousarray(box).reshape(-1).view(np.uint8),
                                                               _bits(ref))


def _ptr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def test_buffer_reused_only_after_every_view_is_gone():
    pool = ReadBuffers()
    a = pool.take(4096)
    ptr = _ptr(a)
    # the views the engine makes: a dtype view reshaped (a gathered band), a slice of it, a strided view
    held = [a.view(np.uint16).reshape(64, 32)[10:20], a[5:9],
            np.lib.stride_tricks.as_strided(a, (8, 8), (64, 1)), torch.from_numpy(a).view(torch.bfloat16)]
    del a
    while held:  # any one view left keeps the buffer out of the pool
        b = pool.take(1000)
        assert _ptr(b) != ptr
        del b
        held.pop()
    assert _ptr(pool.take(2000)) == ptr  # best fit: the 4096-byte buffer, now free (the loop's are 1000)


def test_best_fit_and_keep_bound():
    pool = ReadBuffers(keep=10_000)
    big, small = pool.take(8000), pool.take(3000)
    small_ptr = _ptr(small)
    del big
    assert pool.free_bytes == 8000
    del small                    # 11000 bytes free, above keep: the largest is dropped
    assert pool.free_bytes == 3000
    again = pool.take(2000)      # the one free buffer large enough
    assert _ptr(again) == small_ptr and pool.free_bytes == 0
    assert _ptr(pool.take(5000)) != small_ptr


def test_the_pickle_reads_as_torch_load_does(tmp_path):
    """Containers, scalars, bytes, sets, dtypes, sizes and tensors of every storage kind (a
    parameter, a view into a shared storage, a non-contiguous one, a 0-d one) come back as
    ``torch.load(weights_only=True)`` gives them; tensors as ``SavedTensor`` with its dtype,
    shape, strides and bytes."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(10, 12, generator=g)
    saved = collections.OrderedDict(
        w=torch.nn.Parameter(torch.randn(5, 7, generator=g)), view=base[2:5], t=base.t(), step=torch.tensor(3.0),
        h=torch.randn(301, generator=g).bfloat16(), i=torch.arange(9, dtype=torch.int64), b=torch.ones(4).bool(),
        meta={"lr": 1e-3, "betas": (0.9, 0.95), "names": {"a", "b"}, "raw": b"\x00\xff", "dt": torch.bfloat16,
              "size": torch.Size([3, 4]), 7: None, "c": complex(1, 2), "counts": collections.Counter("aab")})
    path, want, got = _saved(tmp_path, saved)
    try:
        obj = got.obj
        assert type(obj) is collections.OrderedDict and list(obj) == list(want)
        for k, ref in want.items():
            if isinstance(ref, torch.Tensor):
                t = obj[k]
                assert isinstance(t, SavedTensor) and t.dtype.name == dtypes.dtype_name(ref.dtype)
                assert t.shape == tuple(ref.shape) and t.stride() == ref.stride()
                assert t.storage_offset() == ref.storage_offset() and t.is_contiguous() == ref.is_contiguous()
                assert _bits_equal(t.numpy(), ref)
        m = obj["meta"]
        assert m["dt"] == dtypes.Dtype("bfloat16") and m["size"] == (3, 4) and m["counts"] == want["meta"]["counts"]
        assert {k: v for k, v in m.items() if k not in ("dt", "size")} == \
            {k: v for k, v in want["meta"].items() if k not in ("dt", "size")}
        assert obj["step"].item() == 3.0
    finally:
        got.close()


def test_boxes_through_recycled_buffers_equal_torch_load(tmp_path):
    g = torch.Generator().manual_seed(7)
    saved = {"w": torch.randn(37, 53, generator=g), "h": torch.randn(301, generator=g).bfloat16(),
             "t": torch.randn(29, 41, generator=g).t()}        # a non-contiguous tensor too
    path, want, _ = _saved(tmp_path, saved)
    pool = ReadBuffers(keep=1 << 20)
    reader = TorchFile(path, buffers=pool)
    try:
        for _ in range(3):  # later rounds read into buffers the earlier rounds freed
            for name, start, stop in (("w", (3, 0), (20, 53)), ("w", (0, 5), (37, 17)), ("h", (7,), (300,)),
                                      ("t", (2, 3), (40, 20)), ("w", (0, 0), (37, 53))):
                box = reader.box(reader.obj[name], start, stop)
                assert _bits_equal(box, want[name][tuple(slice(a, b) for a, b in zip(start, stop))])
                del box
        assert pool.free_bytes > 0
    finally:
        reader.close()


def test_read_into_fills_flat_spans_in_place_and_declines_column_blocks(tmp_path):
    """``TorchFile.read_into`` (the engine's one-copy gather) reads a box that is one flat span
    of the saved tensor straight into ``out``, bit-exact against ``torch.load``; a column block
    is declined with ``out`` untouched (the engine then reads it with ``box``)."""
    g = torch.Generator().manual_seed(11)
    saved = {"w": torch.randn(37, 53, generator=g), "h": torch.randn(301, generator=g).bfloat16()}
    path, want, reader = _saved(tmp_path, saved)
    try:
        for name, start, stop in (("w", (3, 0), (20, 53)), ("w", (5, 10), (6, 40)), ("h", (7,), (300,)),
                                  ("h", (0,), (0,))):
            ref = want[name][tuple(slice(a, b) for a, b in zip(start, stop))]
            t = reader.obj[name]
            out = np.full(ref.shape, 7, dtype=t.dtype.storage)
            assert reader.read_into(t, start, stop, out)
            assert _bits_equal(out, ref)
        out = np.full((37, 12), 7.0, dtype=np.float32)
        assert not reader.read_into(reader.obj["w"], (0, 5), (37, 17), out)
        assert bool((out == 7.0).all())
    finally:
        reader.close()


def test_view_maps_flat_spans_bit_exact_with_no_copy(tmp_path):
    """``TorchFile.view`` (a band the engine writes as it is) gives the bytes ``torch.load``
    gives, over a private map of the file (no buffer of the pool is used), at any offset (maps
    start on the allocation granularity); the flat-span rule declines a column block."""
    g = torch.Generator().manual_seed(13)
    saved = {"w": torch.randn(37, 53, generator=g), "h": torch.randn(70001, generator=g).bfloat16()}
    path, want, _ = _saved(tmp_path, saved)
    pool = ReadBuffers()
    reader = TorchFile(path, buffers=pool)
    try:
        for name, start, stop in (("w", (3, 0), (20, 53)), ("w", (5, 10), (6, 40)), ("h", (7,), (70000,)),
                                  ("h", (40961,), (70001,))):
            t = reader.obj[name]
            lo, hi = flat_span(t, start, stop)
            box = reader.view(t, lo, hi)
            assert box.flags.writeable
            assert _bits_equal(box, want[name][tuple(slice(a, b) for a, b in zip(start, stop))].reshape(-1))
        assert pool.free_bytes == 0 and reader.view(reader.obj["h"], 5, 5).size == 0
        assert flat_span(reader.obj["w"], (0, 5), (37, 17)) is None
    finally:
        reader.close()


def test_a_file_cut_short_is_named(tmp_path):
    """Cut anywhere, the file fails to open naming it; cut after it was opened, a read of the
    missing bytes fails naming it (no zeros, no short box)."""
    saved = {"h": torch.randn(70001).bfloat16(), "w": torch.randn(300, 300)}
    path, _, whole = _saved(tmp_path, saved)
    whole.close()
    data = path.read_bytes()
    for keep in (len(data) - 300_000, len(data) - 100, 1000, 10):
        cut = tmp_path / "cut.pt"
        cut.write_bytes(data[:keep])
        with pytest.raises(TorchFileError, match="cut.pt: .*truncated"):
            TorchFile(cut)
    cut.write_bytes(data)
    reader = TorchFile(cut)
    try:
        os.truncate(cut, 1000)
        with pytest.raises(TorchFileError, match=r"cut.pt: truncated: .*data/\d+ ends at byte \d+, the file has 1000"):
            reader.read(reader.obj["w"])
    finally:
        reader.close()
    with pytest.raises(TorchFileError, match="missing"):
        TorchFile(tmp_path / "nothing.pt")


class RunsCode:
    """Unpickling this would call ``os.system``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Sub(torch.Tensor):
    pass


def test_globals_outside_the_allow_list_are_refused_and_never_called(tmp_path):
    """A pickled call of ``os.system`` is refused by name before it runs; a tensor subclass is
    refused too (torch's weights-only rule); a global the caller allows is taken."""
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"x": torch.zeros(2), "evil": RunsCode(marker)}, path)
    with pytest.raises(RefusedGlobal, match=r"evil.pt: refuses to unpickle global (posix|os)\.system") as e:
        TorchFile(path)
    assert e.value.global_name in ("posix.system", "os.system") and not marker.exists()
    sub = tmp_path / "sub.pt"
    torch.save({"x": torch.zeros(3).as_subclass(Sub)}, sub)
    with pytest.raises(TorchFileError, match="sub.pt"):
        TorchFile(sub)
    allowed = TorchFile(path, allowed={e.value.global_name: lambda cmd: ("not run", cmd)})
    try:
        assert allowed.obj["evil"][0] == "not run" and not marker.exists()
    finally:
        allowed.close()


def test_reading_never_imports_torch(tmp_path):
    """The point of the module: a process that reads a ``torch.save`` file's tensors with it
    never imports torch."""
    path, want, reader = _saved(tmp_path, {"w": torch.randn(4, 5), "h": torch.randn(3).bfloat16()})
    reader.close()
    code = ("import sys; from ucp.sources.torchfile import TorchFile; f = TorchFile(sys.argv[1]); "
            "w = f.obj['w'].numpy(); h = f.obj['h'].numpy(); f.close(); "
            "print(w.tobytes().hex(), h.tobytes().hex(), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True).stdout
    w, h, imported = out.split()
    assert imported == "False"
    assert bytes.fromhex(w) == _bits(want["w"]).tobytes() and bytes.fromhex(h) == _bits(want["h"]).tobytes()


def test_pickle_is_refused_by_pickle_module_rules_too(tmp_path):
    """A stream that is not a pickle at all fails naming the file."""
    path = tmp_path / "bad.pt"
    torch.save({"x": torch.zeros(2)}, path)
    import zipfile

    with zipfile.ZipFile(path) as z:
        entries = {i.filename: z.read(i) for i in z.infolist()}
    pkl = next(n for n in entries if n.endswith("data.pkl"))
    entries[pkl] = pickle.dumps({"x": 1})[:-5]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for n, data in entries.items():
            z.writestr(n, data)
    with pytest.raises(TorchFileError, match="bad.pt: cannot be unpickled"):
        TorchFile(path)


def test_metadata_tensors_keep_their_dtype(tmp_path):
    """``materialise`` (the DeepSpeed source's metadata: lr scheduler, client state) reads every
    tensor: numpy where numpy has the dtype, a torch tensor for bfloat16 (a ``uint16`` array
    would be stored as uint16), bit-exact, containers kept."""
    saved = {"sched": [torch.tensor(0.5), torch.arange(3)], "h": torch.randn(5).bfloat16(), "n": 3}
    path, want, reader = _saved(tmp_path, saved)
    try:
        got = materialise(reader.obj)
    finally:
        reader.close()
    assert isinstance(got["sched"], list) and got["n"] == 3
    assert isinstance(got["sched"][0], np.ndarray) and got["sched"][0].dtype == np.float32 and got["sched"][0] == 0.5
    assert isinstance(got["sched"][1], np.ndarray) and got["sched"][1].tolist() == [0, 1, 2]
    assert isinstance(got["h"], torch.Tensor) and got["h"].dtype == torch.bfloat16
    assert torch.equal(got["h"].view(torch.int16), want["h"].view(torch.int16))


def _rewrite(path, edit, compression=None):
    """Rewrite the zip archive at ``path`` entry by entry: ``edit(name, data)`` returns the new
    bytes, or None to drop the entry."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        entries = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w", compression=compression or zipfile.ZIP_STORED) as z:
        for name, data in entries:
            new = edit(name, data)
            if new is not None:
                z.writestr(name, new)


@pytest.mark.parametrize("damage", ["deflated", "missing storage", "no data.pkl", "big-endian", "entry header",
                                    "short storage"])
def test_archives_torch_did_not_write_are_refused_naming_the_file(tmp_path, damage):
    """A storage compressed, missing from the archive, no pickle, a big-endian save, or a local
    entry header overwritten: each is refused naming the file and what is wrong, never read as
    other bytes."""
    import zipfile

    path, _, reader = _saved(tmp_path, {"w": torch.randn(64, 64), "b": torch.randn(7)}, name="d.pt")
    reader.close()
    want = {"deflated": "is compressed", "missing storage": "storage 0 is missing", "no data.pkl": "no data.pkl",
            "big-endian": "big-endian", "entry header": "no zip entry header",
            "short storage": "truncated: storage .*data/0 needs 16384 bytes"}[damage]
    if damage == "deflated":
        _rewrite(path, lambda n, d: d, zipfile.ZIP_DEFLATED)
    elif damage == "missing storage":
        _rewrite(path, lambda n, d: None if n.endswith("/data/0") else d)
    elif damage == "no data.pkl":
        _rewrite(path, lambda n, d: None if n.endswith("data.pkl") else d)
    elif damage == "short storage":    # the archive is whole, the storage entry is not
        _rewrite(path, lambda n, d: d[:-4] if n.endswith("/data/0") else d)
    elif damage == "big-endian":
        _rewrite(path, lambda n, d: b"big" if n.endswith("/byteorder") else d)
    else:
        with zipfile.ZipFile(path) as z:
            at = next(i for i in z.infolist() if i.filename.endswith("/data/0")).header_offset
        raw = bytearray(path.read_bytes())
        raw[at:at + 4] = b"XXXX"
        path.write_bytes(bytes(raw))
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(TorchFileError, match=rf"d.pt: .*{want}"):
        TorchFile(path)
    assert len(os.listdir("/proc/self/fd")) == fds   # the failed open closed its file


def test_shapes_strides_and_reshape_as_torch_has_them(tmp_path):
    """``SavedTensor`` answers as the torch tensor does: strides with size-1 dimensions,
    contiguity, the extent of an empty tensor, ``reshape`` (``-1``, a tuple, a refused
    non-contiguous one or a wrong size), and ``read`` of the whole storage run by default."""
    base = torch.randn(6, 8)
    saved = {"col": torch.randn(5, 1), "t": base.t(), "empty": torch.zeros(0, 4), "w": base,
             "row": torch.randn(1, 9)[:, ::2], "half_rows": torch.randn(4, 8)[::2]}
    path, want, reader = _saved(tmp_path, saved)
    try:
        o = reader.obj
        for k, ref in want.items():
            assert o[k].is_contiguous() == ref.is_contiguous(), k
            assert o[k].numel() == ref.numel() and o[k].ndim == ref.dim() and o[k].element_size() == 4
        assert o["empty"].extent() == 0 and reader.box(o["empty"], (0, 0), (0, 4)).shape == (0, 4)
        flat = o["w"].reshape(-1)
        assert flat.shape == (48,) and flat.stride() == (1,) and _bits_equal(flat.numpy(), want["w"].reshape(-1))
        two = o["w"].reshape((4, 12))
        assert two.shape == (4, 12) and two.stride() == (12, 1) and _bits_equal(two.numpy(), want["w"].reshape(4, 12))
        assert o["w"].reshape(2, -1, 4).shape == (2, 6, 4)
        with pytest.raises(TorchFileError, match="cannot view"):
            o["t"].reshape(-1)
        with pytest.raises(TorchFileError, match="cannot view"):
            o["w"].reshape(5, 10)
        assert _bits_equal(reader.read(o["w"]), want["w"].reshape(-1))
        assert _bits_equal(reader.read(o["w"], 40), want["w"].reshape(-1)[40:])
        assert reader.read(o["w"], 5, 5).size == 0
        with pytest.raises(TorchFileError, match=r"states.pt: truncated: a tensor's bytes end at \d+, the file has"):
            reader.read(o["w"], 0, 10**8)   # a range no tensor of the file has: never read past its end
        assert _bits_equal(reader.box(o["w"], (2, 0), (3, 8)), want["w"][2:3])   # a dimension of 1
        assert "shape=(6, 8)" in repr(o["w"]) and "float32" in repr(o["w"])
        assert not reader.box(o["w"], (1, 2), (3, 5)).flags.writeable   # a view of a recycled read, not the file
    finally:
        fd = reader._fd
        reader.close()
    reader.close()   # twice: nothing left to close
    with pytest.raises(OSError):
        os.fstat(fd)  # closed


def test_tensors_with_attributes_load_and_subclasses_do_not(tmp_path):
    """A tensor carrying Python attributes (DeepSpeed's partitions do) is pickled through
    ``_rebuild_from_type_v2`` and reads as the tensor; a class other than torch's tensor classes
    there is refused even when its name is allowed (a subclass)."""
    t = torch.arange(6.0)
    t.ds_id = 3
    path, want, reader = _saved(tmp_path, {"t": t})
    try:
        assert _bits_equal(reader.obj["t"].numpy(), want["t"])
    finally:
        reader.close()
    sub = tmp_path / "sub.pt"
    torch.save({"x": torch.zeros(3).as_subclass(Sub)}, sub)
    with pytest.raises(TorchFileError, match="sub.pt: cannot be unpickled.*a tensor subclass"):
        TorchFile(sub, allowed={f"{Sub.__module__}.Sub": object})


def test_storage_and_persistent_id_checks(tmp_path):
    """A tensor that would run past its storage, or a persistent id that is not a storage, is
    refused (torch.save never writes either; a crafted file could)."""
    from ucp.sources import torchfile

    class Crafted(pickle.Pickler):
        def persistent_id(self, obj):
            return ("not-a-storage",) if obj == "marker" else None

    import io
    import zipfile

    buf = io.BytesIO()
    Crafted(buf, protocol=2).dump({"x": "marker"})
    path = tmp_path / "crafted.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("crafted/data.pkl", buf.getvalue())
    with pytest.raises(TorchFileError, match="crafted.pt: cannot be unpickled.*unknown persistent id"):
        TorchFile(path)
    storage = torchfile._Storage(None, dtypes.Dtype("float32"), 10, 0)
    assert torchfile._rebuild_tensor(storage, 2, (2, 4), (4, 1)).shape == (2, 4)
    with pytest.raises(pickle.UnpicklingError, match="runs past its storage of 10"):
        torchfile._rebuild_tensor(storage, 3, (2, 4), (4, 1))
    with pytest.raises(pickle.UnpicklingError, match="not a storage"):
        torchfile._rebuild_tensor("bytes", 0, (2,), (1,))


@pytest.mark.parametrize("field, value", [("offset", -12), ("size", -4), ("stride", -1)])
def test_negative_offsets_sizes_and_strides_are_refused_as_torch_load_refuses_them(tmp_path, field, value):
    """A crafted ``data.pkl`` whose tensor has a negative storage offset would read the bytes
    before its record (the zip headers) as values; torch.load refuses it, and so must we."""
    import pickletools
    import zipfile

    torch.save({"t": torch.arange(16, dtype=torch.float32)[4:8]}, tmp_path / "orig.pt")
    with zipfile.ZipFile(tmp_path / "orig.pt") as z:
        records = {i.filename: z.read(i.filename) for i in z.infolist()}
    pkl = next(n for n in records if n.endswith("data.pkl"))
    data = records[pkl]
    small = {"offset": 4, "size": 4, "stride": 1}[field]       # offset 4, size (4,), stride (1,)
    ops = [(op.name, arg, pos) for op, arg, pos in pickletools.genops(data)]
    i = [k for k, (name, arg, _) in enumerate(ops) if name == "BININT1" and arg == small]
    pos = ops[i[{"offset": 0, "size": 1, "stride": -1}[field]]][2]
    records[pkl] = data[:pos] + b"J" + value.to_bytes(4, "little", signed=True) + data[pos + 2:]
    with zipfile.ZipFile(tmp_path / "bad.pt", "w", zipfile.ZIP_STORED) as z:
        for name, raw in records.items():
            z.writestr(name, raw)
    with pytest.raises(Exception):
        torch.load(tmp_path / "bad.pt", weights_only=True)
    with pytest.raises(TorchFileError, match=r"bad\.pt: cannot be unpickled.*negative"):
        TorchFile(tmp_path / "bad.pt")
