"""torch DCP in one process: safe reading of DCP files, the key mapping, UniversalWriter /
UniversalReader without a process group, the DCP source and target. Real DCP writes every
fixture (``dcp.save`` with its default FileSystemWriter); DCP's own ``FileSystemReader`` /
``dcp_to_torch_save`` are the reference answers. The torchrun half is tests/test_dcp_dist.py.
"""
from __future__ import annotations

import ctypes
import os
import pickle
import re

import crc32c
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.state_dict import get_state_dict

import ucp
from ucp.dcp import DcpKey, UniversalReader, UniversalWriter, parse_key, rank_threads
from ucp.demo_dcp import GPTConfig, build, optimizer, train_step
from ucp.errors import UcpError
from ucp.format import verify
from ucp.sources._dcpfiles import DcpFileError, DcpFiles, load_metadata, tensor_chunks

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def trained(variant=GPTConfig(), steps=2):
    model = build(variant)
    opt = optimizer(model)
    for s in range(steps):
        train_step(model, opt, s)
    msd, osd = get_state_dict(model, opt)
    return model, opt, {"model": msd, "optim": osd}


@pytest.fixture(scope="module")
def tied_frozen(tmp_path_factory):
    """A tied + frozen TinyGPT trained 2 steps, saved by stock DCP, plus DCP's consolidation."""
    root = tmp_path_factory.mktemp("dcp1")
    _, _, sd = trained(GPTConfig(tied=True, frozen=True))
    sd["extra"] = {"iteration": 2, "rng": torch.get_rng_state(), "bf16": torch.randn(5).to(torch.bfloat16)}
    dcp.save(sd, checkpoint_id=root / "dcp")
    dcp_to_torch_save(root / "dcp", root / "ref.pt")
    return root, sd, torch.load(root / "ref.pt", weights_only=True)


# ---------------------------------------------------------------------------- safe file reading
def test_metadata_through_allow_list_equals_dcps_own(tied_frozen):
    root, _, _ = tied_frozen
    ours, theirs = load_metadata(root / "dcp"), FileSystemReader(root / "dcp").read_metadata()
    assert ours.state_dict_metadata == theirs.state_dict_metadata
    assert ours.storage_data == theirs.storage_data


def test_metadata_refuses_other_globals_by_name(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(DcpFileError, match=r"ck/\.metadata: refusing to unpickle global 'posix\.system'"):
        load_metadata(tmp_path / "ck")
    assert not (tmp_path / "pwned").exists()


class TrustedPlannerData:
    """A class a job pickles into its .metadata (a custom planner's data)."""

    def __init__(self, n):
        self.n = n


def test_metadata_admits_what_torch_safe_globals_admits_at_each_load(tied_frozen, tmp_path):
    """The allow-list takes torch's safe globals as they are at each load: a class registered after
    an earlier load is admitted, and the refusal says how to register one."""
    root, _, _ = tied_frozen
    load_metadata(root / "dcp")     # an earlier load, before the class is registered
    md = FileSystemReader(root / "dcp").read_metadata()
    md.planner_data = {"custom": TrustedPlannerData(3)}
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(DcpFileError, match=r"TrustedPlannerData'.*torch\.serialization\.add_safe_globals"):
        load_metadata(tmp_path / "ck")
    with torch.serialization.safe_globals([TrustedPlannerData]):
        assert load_metadata(tmp_path / "ck").planner_data["custom"].n == 3


def test_metadata_truncated_or_missing_names_the_file(tied_frozen, tmp_path):
    root, _, _ = tied_frozen
    raw = (root / "dcp" / ".metadata").read_bytes()
    (tmp_path / ".metadata").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DcpFileError, match=r"\.metadata: not a readable DCP metadata pickle"):
        load_metadata(tmp_path)
    with pytest.raises(DcpFileError, match="no DCP metadata file"):
        load_metadata(tmp_path / "nowhere")


def test_items_are_memory_mapped_and_equal_dcps_reads(tied_frozen):
    """Every stored chunk read through the map equals what FileSystemReader's torch.load gives,
    and its storage lies inside the file's map (no copy was made)."""
    root, _, _ = tied_frozen
    files = DcpFiles(root / "dcp")
    fs = FileSystemReader(root / "dcp")
    fs.set_up_storage_reader(fs.read_metadata(), True)
    n = 0
    for fqn, md, k, idx in tensor_chunks(files.metadata):
        t = files.tensor(idx)
        info = files.metadata.storage_data[idx]
        with open(root / "dcp" / info.relative_path, "rb") as f:
            f.seek(info.offset)
            import io
            ref = torch.load(io.BytesIO(f.read(info.length)), weights_only=True)
        assert same(t, ref), fqn
        mm = files._map(info.relative_path)
        base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        assert base + info.offset <= t.data_ptr() < base + info.offset + info.length, fqn
        n += 1
    assert n == sum(len(m.chunks) for m in files.metadata.state_dict_metadata.values() if hasattr(m, "chunks"))


def test_non_tensor_item_refuses_pickled_objects(tmp_path):
    torch.serialization.clear_safe_globals()
    dcp.save({"w": torch.ones(3), "obj": {"when": __import__("datetime").date(2024, 1, 2)}},
             checkpoint_id=tmp_path / "ck")
    files = DcpFiles(tmp_path / "ck")
    with pytest.raises(DcpFileError, match=r"__0_0\.distcp .*obj\.when.*refused to unpickle.*datetime\.date"):
        files.obj(MetadataIndex("obj.when"))


class _Runs:
    def __reduce__(self):
        return (os.system, ("true",))


def test_a_refused_global_is_named_whatever_torch_calls_it(tmp_path):
    """torch words a global of a blocked module ("Trying to load unsupported GLOBAL posix.system whose
    module posix is blocked") otherwise than any other ("Unsupported global: GLOBAL ..."); the error
    names it either way, and never passes on torch's advice to load with weights_only=False."""
    dcp.save({"w": torch.ones(3), "obj": _Runs()}, checkpoint_id=tmp_path / "ck")
    with pytest.raises(DcpFileError, match=r"obj.*refused to unpickle: it holds a pickled posix\.system") as e:
        DcpFiles(tmp_path / "ck").obj(MetadataIndex("obj"))
    assert "weights_only" not in str(e.value)


def _corrupt_zip_record(root, fqn: str, record: str, where: str) -> tuple[str, int, int]:
    """Corrupt the zip record ``record`` (``archive/data.pkl``, ...) of the stored item ``fqn``:
    flip the first byte of its local header (``where="header"``) or of its bytes (``"data"``),
    or the high byte of its header's extra-field length (``"extra"``). Returns the item's file
    name and byte range."""
    import io
    import zipfile

    info = next(v for k, v in load_metadata(root).storage_data.items() if k.fqn == fqn)
    path = root / info.relative_path
    raw = bytearray(path.read_bytes())
    item = bytes(raw[info.offset:info.offset + info.length])
    at = info.offset + zipfile.ZipFile(io.BytesIO(item)).getinfo(record).header_offset
    if where == "extra":
        at += 29
    elif where == "data":
        name_len, extra_len = (int.from_bytes(raw[at + i:at + i + 2], "little") for i in (26, 28))
        at += 30 + name_len + extra_len
    raw[at] ^= 0x5A
    path.write_bytes(bytes(raw))
    return info.relative_path, info.offset, info.length


@pytest.mark.parametrize("record, where, problem", [
    ("archive/data.pkl", "header", "BadZipFile: Bad magic number for file header"),
    ("archive/data.pkl", "data", "BadZipFile: Bad CRC-32 for file 'archive/data.pkl'"),
    ("archive/byteorder", "data", "BadZipFile: Bad CRC-32 for file 'archive/byteorder'"),
    ("archive/data/0", "extra", "lie beyond the item"),
    ("archive/data/0", "data", "its bytes' CRC-32 is"),   # a flipped byte of the tensor itself
])
def test_corrupt_zip_record_of_an_item_names_file_range_and_key(tmp_path, record, where, problem):
    from ucp.cli import main

    dcp.save({"model": {"w": torch.randn(64, 64)}}, checkpoint_id=tmp_path / "dcp")
    rel, start, length = _corrupt_zip_record(tmp_path / "dcp", "model.w", record, where)
    want = rf"dcp/{rel} \[{start}, \+{length}\) \(model\.w\): corrupt zip record {record}\b"
    want += f".*{re.escape(problem)}"
    with DcpFiles(tmp_path / "dcp") as files, pytest.raises(DcpFileError, match=want):
        files.tensor(next(iter(files.metadata.storage_data)))
    assert main(["convert", "--from", "dcp", str(tmp_path / "dcp"), str(tmp_path / "u"), "--quiet"]) == 2


# ---------------------------------------------------------------------------- keys
@pytest.mark.parametrize("fqn, want", [
    ("model.blocks.0.attn.q.weight", DcpKey("param", "blocks.0.attn.q.weight", "param")),
    ("optim.state.blocks.0.attn.q.weight.exp_avg", DcpKey("state", "blocks.0.attn.q.weight", "exp_avg")),
    ("optim.state.embed.weight.step", DcpKey("state", "embed.weight", "step")),
    ("optim.param_groups.1.betas", DcpKey("group", state="betas", group=1)),
    # per parameter (flatten_optimizer_state_dict=True); "0.weight"'s is not group 0's key "weight.lr"
    ("optim.param_groups.x.lr", DcpKey("hyper", "x", "lr")),
    ("optim.param_groups.0.weight.lr", DcpKey("hyper", "0.weight", "lr")),
    ("optim.param_groups.lr", DcpKey("extra", "optim.param_groups.lr")),
    ("extra.rng", DcpKey("extra", "extra.rng")),
])
def test_parse_key(fqn, want):
    assert parse_key(fqn) == want


# ---------------------------------------------------------------------------- writer / reader, one process
def check_universal(path, ref: dict, variant: GPTConfig) -> None:
    """A universal checkpoint holds exactly the model's state-dict keys (in model order), and
    every tensor, optimizer state, step and hyper-parameter of DCP's consolidation ``ref``."""
    ck = ucp.open(path)
    assert ck.params == list(build(variant).state_dict())
    for name, t in ref["model"].items():
        assert same(ck.read(name, "param"), t), name   # an alias reads its holder's tensor (FORMAT.md 6.1)
    for name, states in ref["optim"]["state"].items():
        assert set(ck.states(name)) - {"param"} == {s for s, v in states.items() if v.dim()}, name
        for state, t in states.items():
            if t.dim():
                assert same(ck.read(name, state), t), (name, state)
            else:
                meta = ck.param_meta(name)
                assert meta["scalars"][state] == t.item() and meta["scalar_dtypes"][state] == "float32"
    groups = ck.metadata["optimizer"]["param_groups"]
    assert groups == ref["optim"]["param_groups"]     # betas a tuple, as saved
    flags = {n: {k: v for k, v in ck.param_meta(n).items() if k in ("frozen", "tied_to")} for n in ck.params}
    for alias in (n for n in ck.params if "tied_to" in flags[n]):     # stored once, as its tied_to
        meta = ck.param_meta(alias)
        assert ck.states(alias) == [], alias
        for state in ck.states(meta["tied_to"]):
            assert same(ck.read(alias, state), ck.read(meta["tied_to"], state)), (alias, state)
        assert (meta["shape"], meta["dtype"]) == (list(ref["model"][alias].shape), "float32"), alias
    expect = {n: {} for n in ck.params}
    if variant.frozen:
        for n in ("blocks.0.ln1.weight", "blocks.0.ln1.bias", "blocks.0.attn.q.bias", "blocks.0.attn.k.bias"):
            expect[n] = {"frozen": True}
    if variant.tied:
        expect["head.weight"] = {"tied_to": "embed.weight"}
    assert flags == expect
    assert verify(path) == []


def test_writer_reader_roundtrip_one_process(tied_frozen, tmp_path):
    root, sd, ref = tied_frozen
    dcp.save(sd, storage_writer=UniversalWriter(tmp_path / "u"))
    check_universal(tmp_path / "u", ref, GPTConfig(tied=True, frozen=True))
    ck = ucp.open(tmp_path / "u")
    sharded = 0
    for name in ck.params:            # default layout: one shard per saved box, inner column blocks
        for state in ck.states(name):
            info = ck.array_info(name, state)
            if len(info.shape) == 2:  # one process: the box is the whole tensor; 8 blocks of >= 256 B
                k = next(k for k in range(8, 0, -1) if info.shape[1] % k == 0 and info.shape[1] // k * 4 >= 256)
                assert tuple(info.chunks) == tuple(info.shape), (name, state)
                want = None if k == 1 else (info.shape[0], info.shape[1] // k)
                assert (tuple(info.inner_chunks) if info.inner_chunks else None) == want, (name, state)
                sharded += want is not None
    assert sharded == 2 * 3      # mlp.down of both blocks (64 x 170: 2 blocks of 85), param and Adam states
    md = ucp.open(tmp_path / "u").metadata["dcp"]
    assert md["extra.iteration"] == 2 and same(md["extra.rng"], sd["extra"]["rng"])
    assert same(md["extra.bf16"], sd["extra"]["bf16"])

    _, _, fresh = trained(GPTConfig(tied=True, frozen=True), steps=1)
    fresh["extra"] = {"iteration": 0, "rng": torch.zeros_like(sd["extra"]["rng"]),
                      "bf16": torch.zeros(5, dtype=torch.bfloat16)}
    reader = UniversalReader(tmp_path / "u")
    dcp.load(fresh, storage_reader=reader)
    for k, t in sd["model"].items():
        assert same(fresh["model"][k], t), k
    for p, states in sd["optim"]["state"].items():
        for s, t in states.items():
            assert same(fresh["optim"]["state"][p][s], t), (p, s)
    assert fresh["extra"]["iteration"] == 2 and same(fresh["extra"]["rng"], sd["extra"]["rng"])
    assert same(fresh["extra"]["bf16"], sd["extra"]["bf16"])
    assert reader.bytes_needed > 0 and reader.bytes_read >= reader.bytes_needed

    # DCP's own consolidation tool reads the universal checkpoint through UniversalReader too
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
    back: dict = {}
    _load_state_dict(back, storage_reader=UniversalReader(tmp_path / "u"), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    assert same(back["model"]["embed.weight"], ref["model"]["embed.weight"])


def test_writer_refuses_non_empty_destination_unless_overwrite(tmp_path):
    sd = {"model": {"w": torch.arange(6.0)}}
    dcp.save(sd, storage_writer=UniversalWriter(tmp_path / "u"))
    with pytest.raises(BaseException, match="is a committed ucp checkpoint; pass UniversalWriter"):
        dcp.save(sd, storage_writer=UniversalWriter(tmp_path / "u"))
    sd["model"]["w"] = torch.arange(6.0) * 2
    dcp.save(sd, storage_writer=UniversalWriter(tmp_path / "u", overwrite=True))
    assert same(ucp.open(tmp_path / "u").read("w"), torch.arange(6.0) * 2)


def test_writer_threads_default_to_the_ranks_share_of_the_cores(monkeypatch, tmp_path):
    """Without ``workers`` a rank writes on as many threads as it would read with (``rank_threads``:
    4 ranks of 4 threads on 2 cores only hand the GIL around); ``workers`` still wins."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * len(os.sched_getaffinity(0))))
    assert UniversalWriter(tmp_path / "u").threads == rank_threads(tmp_path / "u") == 1
    assert UniversalWriter(tmp_path / "u", workers=3).threads == 3
    sd = {"model": {"w": torch.arange(24.0).view(4, 6)}}
    dcp.save(sd, storage_writer=UniversalWriter(tmp_path / "u"))
    assert same(ucp.open(tmp_path / "u").read("w"), sd["model"]["w"])


class Opaque:
    """A value with no JSON form (picklable, so DCP itself serialises it)."""


def test_writer_failure_leaves_no_manifest(tmp_path):
    with pytest.raises(BaseException, match=r"'extra\.x': ucp stores non-tensor values as JSON"):
        dcp.save({"model": {"w": torch.ones(4)}, "extra": {"x": Opaque()}},
                 storage_writer=UniversalWriter(tmp_path / "u"))
    assert not (tmp_path / "u" / "ucp.manifest.json").exists()
    with pytest.raises(UcpError):
        ucp.open(tmp_path / "u")


def test_save_path_writes_each_array_document_once_before_commit(tmp_path):
    """The several-writers path UniversalWriter takes: a rank writes the ``zarr.json`` of each
    array whose first chunk it wrote as soon as it wrote it (``write_doc``, on its writer
    thread), never again in ``commit``; the coordinator's records reach ``commit_parts`` in
    memory (no part file); the checkpoint reads back and verifies."""
    from ucp.format import commit_parts, create_checkpoint

    path = tmp_path / "u"
    data = torch.arange(24.0).reshape(6, 4)
    ranks = [create_checkpoint(path, rank=r, world_size=2, durable=True) for r in range(2)]
    arrs = [w.add_array("w", "param", (6, 4), torch.float32, chunks=(3, 4)) for w in ranks]
    for r, (w, a) in enumerate(zip(ranks, arrs)):
        a.write((3 * r, 0), data[3 * r:3 * r + 3])
        w.write_doc(a)
        w.add_param("w")
    doc = path / "w" / "param" / "zarr.json"
    first = os.stat(doc)
    with pytest.raises(UcpError, match="record_file=False.*needs sync=False"):
        ranks[0].commit(record_file=False)
    ranks[1].commit()
    ranks[0].commit(sync=False, record_file=False)
    assert not (path / "_ucp" / "parts" / "0.json").exists() and (path / "_ucp" / "parts" / "1.json").exists()
    on_disk = doc.read_bytes()
    assert ranks[0].records[0][2] == {"w/param/zarr.json": (len(on_disk), crc32c.crc32c(on_disk))}
    assert ranks[1].records[0][2] == {}                  # rank 1 wrote no first chunk: no document
    commit_parts(path, 2, parts={0: ranks[0].records})
    again = os.stat(doc)
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)   # never rewritten
    ck = ucp.open(path)
    assert same(ck.read("w"), data)
    assert verify(path, deep=True) == []


def test_ranks_write_their_arrays_from_staggered_starts_and_report_them_in_plan_order(tmp_path):
    """Issue 17: each rank starts at another array (ranks creating the same directories at the
    same moment wait for each other's mkdir): rank r of w starts at item len*r//w. The write
    results still come back in plan order, each with its own byte count, and every array's
    box is in the checkpoint."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorProperties
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    from ucp.dcp.writer import _write_arrays
    from ucp.format import commit_parts, create_checkpoint

    path = tmp_path / "u"
    full = {f"model.p{i}": torch.randn(3 * (i + 1), 4, generator=torch.Generator().manual_seed(i)) for i in range(7)}
    world = 3
    for rank in range(world):
        w = create_checkpoint(path, rank=rank, world_size=world, durable=False)
        items = []
        for fqn, t in full.items():
            n = t.shape[0] // world
            box = t[rank * n:(rank + 1) * n]
            chunk = ChunkStorageMetadata(torch.Size([rank * n, 0]), box.shape)
            items.append((WriteItem(MetadataIndex(fqn, [rank * n, 0]), WriteItemType.SHARD, tensor_data=
                                    TensorWriteData(chunk, TensorProperties(dtype=t.dtype), t.shape)), box))
        results = _write_arrays(w, items, {}, workers=2)
        assert [r.index.fqn for r in results] == list(full)
        assert [r.size_in_bytes for r in results] == [b.numel() * 4 for _, b in items]
        for fqn in full:
            w.add_param(fqn[len("model."):])
        w.commit()
    commit_parts(path, world)
    ck = ucp.open(path)
    for fqn, t in full.items():
        assert same(ck.read(fqn[len("model."):]), t)


def test_array_documents_are_spread_over_the_ranks_that_write_the_arrays(tmp_path, monkeypatch):
    """Issue 17: under FSDP rank 0 holds the first chunk of every array, so by the format's default
    rule it would write every ``zarr.json`` while the other ranks wait for it. The coordinator
    names one writer per array among the ranks writing a box of it, the fewest documents each: each
    document is written once, by that rank, recorded in its part, never again by the coordinator,
    and a rank with an empty box of an array is never its writer."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    from ucp.dcp.saveplan import doc_writers as _doc_writers, saved_arrays as _saved_arrays
    from ucp.dcp.writer import _write_arrays
    from ucp.format import commit_parts, create_checkpoint, store

    puts, real = [], store.LocalStore.put
    monkeypatch.setattr(store.LocalStore, "put", lambda self, rel, bufs, fsync=False:
                        puts.append(rel) or real(self, rel, bufs, fsync))
    path, world = tmp_path / "u", 3
    full = {f"model.p{i}": torch.randn(3 * (i + 1), 4, generator=torch.Generator().manual_seed(i)) for i in range(8)}
    full["model.short"] = torch.randn(2, 4)           # rows for ranks 0 and 1 only: rank 2's box is empty

    def items(rank):
        out = []
        for fqn, t in full.items():
            n = -(-t.shape[0] // world)
            box = t[rank * n:(rank + 1) * n]
            chunk = ChunkStorageMetadata(torch.Size([min(rank * n, t.shape[0]), 0]), box.shape)
            out.append((WriteItem(MetadataIndex(fqn, [rank * n, 0]), WriteItemType.SHARD, tensor_data=
                                  TensorWriteData(chunk, TensorProperties(dtype=t.dtype), t.shape)), box))
        return out

    plans = [SavePlan([item for item, _ in items(r)]) for r in range(world)]
    docs = _doc_writers(_saved_arrays(plans), world)
    assert docs[("short", "param")] in (0, 1)
    assert sorted(list(docs.values()).count(r) for r in range(world)) == [3, 3, 3]
    writers = []
    for rank in range(world):
        w = create_checkpoint(path, rank=rank, world_size=world, durable=False)
        _write_arrays(w, items(rank), {}, workers=2, docs=docs)
        for fqn in full:
            w.add_param(fqn[len("model."):])
        w.commit()
        writers.append(w)
    for rank, w in enumerate(writers):               # each rank recorded exactly the documents named to it
        recorded = {rel for _, _, d in w.records for rel in d}
        assert recorded == {f"{name}/{state}/zarr.json" for (name, state), r in docs.items() if r == rank}
    commit_parts(path, world)
    array_docs = [p for p in puts if p.endswith("/param/zarr.json")]
    assert sorted(array_docs) == sorted(f"{fqn[len('model.'):]}/param/zarr.json" for fqn in full)  # once each
    assert verify(path, deep=True) == []
    ck = ucp.open(path)
    for fqn, t in full.items():
        assert same(ck.read(fqn[len("model."):]), t)


# ---------------------------------------------------------------------------- source and target
def test_convert_equals_dcp_to_torch_save(tied_frozen, tmp_path):
    root, sd, ref = tied_frozen
    ucp.convert(root / "dcp", tmp_path / "u")            # --from auto detects DCP
    check_universal(tmp_path / "u", ref, GPTConfig(tied=True, frozen=True))
    md = ucp.open(tmp_path / "u").metadata
    assert md["source"]["format"] == "dcp" and same(md["dcp"]["extra.rng"], sd["extra"]["rng"])


def test_source_ties_only_what_equal_bytes_can_show(tmp_path):
    """Stock DCP saves a tied tensor under each of its names, so the source finds ties by equal
    bytes. A tensor of one repeated value shows nothing: BatchNorm's buffers start as ones and
    zeros, the very bytes of a fresh LayerNorm's weight and bias, and must not become their
    aliases; a real tie (random values) still does."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(7, 4), torch.nn.LayerNorm(4), torch.nn.BatchNorm1d(4),
                                torch.nn.Linear(4, 7, bias=False))
    model[3].weight = model[0].weight
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp_path / "dcp")
    ucp.convert(tmp_path / "dcp", tmp_path / "u")
    ck = ucp.open(tmp_path / "u")
    tied = {n: ck.param_meta(n)["tied_to"] for n in ck.params if "tied_to" in ck.param_meta(n)}
    assert tied == {"3.weight": "0.weight"}
    for n in ("2.running_var", "2.running_mean"):
        assert same(ck.read(n, "param"), msd[n]), n


def test_source_refuses_a_spec_and_unknown_options(tied_frozen):
    root, _, _ = tied_frozen
    with pytest.raises(UcpError, match="describes its own layout"):
        ucp.convert(root / "dcp", root / "x", source="dcp", spec="torch_fsdp2")
    with pytest.raises(UcpError, match="does not take"):
        ucp.convert(root / "dcp", root / "x", source="dcp", zero_stage=2)


@pytest.mark.parametrize("target, options", [("dcp", {}), ("deepspeed", {"zero_stage": 2}), ("ranks", {})])
def test_export_into_a_folder_that_holds_anything_is_refused_and_leaves_it_alone(tied_frozen, tmp_path, target,
                                                                                  options):
    root, _, _ = tied_frozen
    ucp.convert(root / "dcp", tmp_path / "u")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(UcpError, match=r"out: destination is not empty"):
        ucp.export(tmp_path / "u", tmp_path / "out", target, **options)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


def test_neither_command_writes_over_or_into_what_it_reads(tied_frozen, tmp_path):
    """``convert SRC DST --overwrite`` with SRC inside DST deleted SRC while reading it; an export into
    a folder inside its universal checkpoint left stray files there. Both are refused up front."""
    root, _, _ = tied_frozen
    ucp.convert(root / "dcp", tmp_path / "u")
    with pytest.raises(UcpError, match=r"u/sub: the destination lies inside the universal checkpoint"):
        ucp.export(tmp_path / "u", tmp_path / "u" / "sub", "dcp")
    ucp.export(tmp_path / "u", tmp_path / "d", "dcp")
    ucp.convert(tmp_path / "d", tmp_path / "u2")
    (tmp_path / "d").rename(tmp_path / "u2" / "src")
    with pytest.raises(UcpError, match=r"u2: overwrite would delete the source .*u2/src, which lies inside it"):
        ucp.convert(tmp_path / "u2" / "src", tmp_path / "u2", overwrite=True)
    assert (tmp_path / "u2" / "src" / ".metadata").is_file() and verify(tmp_path / "u") == []


@pytest.mark.parametrize("options, message", [({"zero_stage": True}, "zero_stage"), ({"zero_stage": "2"}, "zero_stage"),
                                              ({"zero_stage": 2.0}, "zero_stage"),
                                              ({"zero_stage": 2, "sub_group_size": 0}, "sub_group_size"),
                                              ({"zero_stage": 2, "sub_group_size": -5}, "sub_group_size")])
def test_deepspeed_options_from_python_are_checked_as_the_command_line_checks_them(tied_frozen, tmp_path, options,
                                                                                   message):
    """``zero_stage=True`` wrote a ZeRO-1 checkpoint; ``sub_group_size=-5`` went into ds_config."""
    root, _, _ = tied_frozen
    ucp.convert(root / "dcp", tmp_path / "u")
    with pytest.raises(UcpError, match=message):
        ucp.export(tmp_path / "u", tmp_path / "out", "deepspeed", **options)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["dcp", "ranks"])
@pytest.mark.parametrize("degree", [0, -2, 1.5, "2"])
def test_export_refuses_a_degree_that_is_no_whole_number_of_at_least_1(tied_frozen, tmp_path, target, degree):
    """From Python as from the command line (which refuses --dp 0 itself): ``dp=0`` was read as 1."""
    root, _, _ = tied_frozen
    ucp.convert(root / "dcp", tmp_path / "u")
    with pytest.raises(UcpError, match=rf"degree dp={re.escape(repr(degree))}: .*whole number of at least 1"):
        ucp.export(tmp_path / "u", tmp_path / "out", target, degrees={"dp": degree})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dp", [1, 3])
def test_export_to_dcp_loads_with_filesystem_reader(tied_frozen, tmp_path, dp):
    root, sd, ref = tied_frozen
    ucp.convert(root / "dcp", tmp_path / "u")
    ucp.export(tmp_path / "u", tmp_path / "out", "dcp", degrees={"dp": dp})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        sorted([".metadata"] + [f"__{r}_0.distcp" for r in range(dp)])
    dcp_to_torch_save(tmp_path / "out", tmp_path / "back.pt")
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert back["model"].keys() == ref["model"].keys()
    for k, t in ref["model"].items():
        assert same(back["model"][k], t), k
    for p, states in ref["optim"]["state"].items():
        for s, t in states.items():
            assert same(back["optim"]["state"][p][s], t), (p, s)
    assert same(back["extra"]["rng"], sd["extra"]["rng"]) and back["extra"]["iteration"] == 2
    chunks = load_metadata(tmp_path / "out").state_dict_metadata["model.embed.weight"].chunks
    assert sorted(int(c.sizes[0]) for c in chunks) == sorted(len(x) for x in torch.arange(1003).chunk(dp))


@pytest.mark.parametrize("dp", [1, 2])
def test_export_to_dcp_writes_zero_size_tensors_once_as_dcp_save_does(tmp_path, dp):
    """A 0x4 / 4x0 tensor is stored as stock ``dcp.save`` stores it: one chunk at offsets 0 of
    the full (empty) size, in file 0, so that FileSystemReader loads it."""
    sd = {"model": {"w": torch.ones(4, 3), "e0": torch.empty(0, 4),
                    "e1": torch.empty(4, 0, dtype=torch.bfloat16)},
          "optim": {"state": {"w": {"exp_avg": torch.ones(4, 3)}, "e0": {"exp_avg": torch.empty(0, 4)}},
                    "param_groups": [{"lr": 0.1, "params": ["w", "e0", "e1"]}]}}
    dcp.save(sd, checkpoint_id=tmp_path / "dcp")
    ucp.convert(tmp_path / "dcp", tmp_path / "u")
    ucp.export(tmp_path / "u", tmp_path / "out", "dcp", degrees={"dp": dp})
    stock, ours = load_metadata(tmp_path / "dcp"), load_metadata(tmp_path / "out")
    for key in ("model.e0", "model.e1", "optim.state.e0.exp_avg"):
        assert ours.state_dict_metadata[key] == stock.state_dict_metadata[key], key
        assert [(i.offset, i.index, ours.storage_data[i].relative_path) for i in ours.storage_data
                if i.fqn == key] == [(torch.Size([0, 0]), 0, "__0_0.distcp")], key
    back = {"model": {k: torch.full_like(t, 7) for k, t in sd["model"].items()},
            "optim": {"state": {p: {s: torch.full_like(t, 7) for s, t in st.items()}
                                for p, st in sd["optim"]["state"].items()},
                      "param_groups": [{"lr": 0.0, "params": ["w", "e0", "e1"]}]}}
    dcp.load(back, checkpoint_id=tmp_path / "out")
    for k, t in sd["model"].items():
        assert same(back["model"][k], t), k
    assert same(back["optim"]["state"]["e0"]["exp_avg"], sd["optim"]["state"]["e0"]["exp_avg"])
