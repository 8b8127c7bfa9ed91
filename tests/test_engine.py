"""The one engine: any Source in, any Target out. The rules written once here — coverage,
replica averaging, per-parameter metadata, the torchrun split, abort on failure — hold for
every plug-in, shown with the rank-files plug-ins and with small plug-ins written the way a
framework author writes one (CONTRIBUTING.md)."""
import os
import subprocess
import sys

import pytest
import torch

import ucp
from ucp.engine import MAX_LISTED_FRAGMENTS, bind_layout, convert, export
from ucp.errors import UcpError
from ucp.format import verify
from ucp.plan import CoverageError, assemble
from ucp.sources import Source, SourceLayout, SourceParam, detect, sources
from ucp.sources.ranks import load_ranks_full, rank_file_name
from ucp.targets import Target, TargetUnit, targets
from ucp.targets.ranks import save_ranks

from _ports import free_port


def _bits(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


# ------------------------------------------------------------------ the averaging rule
AVG_SPEC = 'spec avg\naxes tp\nparam "count" = average(over=tp)\nparam "w" = shard(0, over=tp)\n'


@pytest.mark.parametrize("replicas,rounded", [
    # means 1/3, 1, 5/3: rounded, not truncated to [0, 1, 1]
    ([[0, 1, 1], [0, 1, 2], [1, 1, 2]], [0, 1, 2]),
    # means 0.5, 1.5, 2.5, 3.5: half to even, not truncated to [0, 1, 2, 3]
    ([[0, 1, 2, 3], [1, 2, 3, 4]], [0, 2, 2, 4]),
])
def test_integer_replicas_average_by_one_rule_on_every_path(tmp_path, replicas, rounded):
    """Integer replicas under `average(over=tp)`: convert, export, load_rank, assemble and
    load_ranks_full all give the float64 mean rounded half to even."""
    tp = len(replicas)
    vals = [torch.tensor(r, dtype=torch.int64) for r in replicas]
    want = torch.tensor(rounded, dtype=torch.int64)
    assert torch.equal(torch.stack([v.double() for v in vals]).mean(0).round().long(), want)
    w = torch.arange(6 * tp, dtype=torch.int32).reshape(2 * tp, 3)
    save_ranks({"param": {"count": torch.zeros_like(vals[0]), "w": w}}, tmp_path / "src",
               spec_text=AVG_SPEC, degrees={"tp": tp})
    for r, v in enumerate(vals):  # what each rank of a sequence-parallel run would have saved
        f = tmp_path / "src" / rank_file_name({"tp": r})
        d = torch.load(f, weights_only=True)
        d["param"]["count"] = v
        torch.save(d, f)
    ucp.convert(tmp_path / "src", tmp_path / "uni")
    ck = ucp.open(tmp_path / "uni")
    assert torch.equal(ck.read("count"), want) and torch.equal(ck.read("w"), w)
    assert torch.equal(load_ranks_full(tmp_path / "src")["param"]["count"], want)
    layout = bind_layout(ucp.engine.parse_spec(AVG_SPEC, "avg"), ["count"], {"tp": tp})
    frags = layout.fragments_by_param({"count": tuple(want.shape)})["count"]
    assert torch.equal(assemble(want.shape, torch.int64, list(zip(frags, vals))), want)
    ucp.export(tmp_path / "uni", tmp_path / "tp2", "ranks", degrees={"tp": 2})
    spec_file = tmp_path / "avg.ucp"
    spec_file.write_text(AVG_SPEC)
    for r in range(2):
        d = torch.load(tmp_path / "tp2" / rank_file_name({"tp": r}), weights_only=True)
        assert torch.equal(d["param"]["count"], want)
        got = ucp.load_rank(tmp_path / "uni", str(spec_file), {"tp": 2}, {"tp": r})
        assert torch.equal(got["param"]["count"], want)


# ------------------------------------------------------------------ a source plug-in
SHARDED = 'spec s\naxes tp\nparam "**" = shard(0, over=tp)\n'
FLAT = 'spec f\naxes tp\nparam "**" = flat(over=tp, align=4)\n'


class TwoLayoutSource(Source, register=False):
    """Like ZeRO-1/2: whole weights sharded over tp, the optimizer state flat-partitioned;
    the local tensors live in memory (``self.options["locals"]``)."""
    name = "test-two-layouts"
    description = "test plug-in: params sharded, exp_avg flat"

    def layout(self):
        full = self.options["full"]
        shapes = {n: tuple(t.shape) for n, t in full["param"].items()}
        sharded = bind_layout(ucp.engine.parse_spec(SHARDED, "sharded"), list(shapes), {"tp": 2})
        flat = bind_layout(ucp.engine.parse_spec(FLAT, "flat"), list(shapes), {"tp": 2})
        by_p, by_f = sharded.fragments_by_param(shapes), flat.fragments_by_param(shapes)
        drop = self.options.get("drop")
        params = [SourceParam(n, shapes[n], {st: full[st][n].dtype for st in full},
                              fragments=[f for f in by_p[n] if (n, f.coords) != drop],
                              state_fragments={"exp_avg": by_f[n]},
                              scalars={"step": 7}, meta={**sharded.param_meta(n, shapes[n]), "frozen": n == "b"})
                  for n in shapes]
        return SourceLayout(params, metadata={"iteration": 7}, degrees={"tp": 2})

    def local(self, fragment, state):
        from ucp.plan import split

        t = split(self.options["full"][state][fragment.name], fragment)
        return t.double() if self.options.get("wrong_dtype") else t


def _full(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (9, 5), "b": (7,)}
    return {st: {n: torch.randn(s, generator=g) for n, s in shapes.items()} for st in ("param", "exp_avg")}


def test_source_plugin_with_a_layout_per_state(tmp_path):
    """A plug-in that only describes its fragments (different per state) gets coverage,
    dedupe, metadata and commit from the engine."""
    full = _full()
    convert(TwoLayoutSource("<memory>", full=full), tmp_path / "uni")
    assert verify(tmp_path / "uni") == []
    ck = ucp.open(tmp_path / "uni")
    assert ck.params == ["a", "b"] and ck.metadata["iteration"] == 7
    assert ck.metadata["source"]["format"] == "test-two-layouts"
    for n in ck.params:
        for st in ("param", "exp_avg"):
            assert torch.equal(_bits(ck.read(n, st)), _bits(full[st][n])), (n, st)
        meta = ck.param_meta(n)
        assert meta["scalars"] == {"step": 7} and bool(meta.get("frozen")) == (n == "b")
        frag = meta["fragmentation"]
        assert frag["layout"] == "test-two-layouts" and frag["fragments"] == 2
        assert [r["coords"] for r in frag["ranks"]] == [{"tp": 0}, {"tp": 1}]
        assert frag["rule"] == meta["rule"] and meta["rule"].startswith("sharded:")


def test_hole_in_the_fragments_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(CoverageError, match="a"):
        convert(TwoLayoutSource("<memory>", full=_full(), drop=("a", (("tp", 1),))), tmp_path / "uni")
    assert not (tmp_path / "uni").exists()


def test_source_dtype_disagreeing_with_its_layout_is_refused(tmp_path):
    with pytest.raises(UcpError, match=r"param of a .*float64.*never casts"):
        convert(TwoLayoutSource("<memory>", full=_full(), wrong_dtype=True), tmp_path / "uni")
    assert not (tmp_path / "uni" / "ucp.manifest.json").exists()


def test_registries_and_detection(tmp_path):
    assert sources()["ranks"].__module__ == "ucp.sources.ranks"
    assert targets()["ranks"].__module__ == "ucp.targets.ranks"
    save_ranks({"param": {"w": torch.ones(4, 2)}}, tmp_path / "src", spec_text=SHARDED, degrees={"tp": 2})
    assert detect(tmp_path / "src") == "ranks"
    with pytest.raises(UcpError, match="unknown source 'nope'.*ranks"):
        ucp.convert(tmp_path / "src", tmp_path / "u", source="nope")
    with pytest.raises(UcpError, match="does not take bogus"):
        ucp.convert(tmp_path / "src", tmp_path / "u", source="ranks", bogus=1)
    ucp.convert(tmp_path / "src", tmp_path / "u")
    for option in ("zero_stage", "max_shard_size"):
        with pytest.raises(UcpError, match=f"target 'ranks' does not take {option}"):
            ucp.export(tmp_path / "u", tmp_path / "x", "ranks", degrees={"tp": 2}, **{option: 2})
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ metadata bounds
def test_many_fragments_are_counted_not_listed(tmp_path):
    """Past MAX_LISTED_FRAGMENTS the manifest counts fragments instead of listing them; the
    recorded spec still reproduces any layout."""
    dp = MAX_LISTED_FRAGMENTS + 2
    g = torch.Generator().manual_seed(3)
    states = {"param": {"w": torch.randn(2 * dp, 3, generator=g), "n": torch.randn(3, generator=g)}}
    save_ranks(states, tmp_path / "src", spec_text='spec z\naxes dp\nparam "**" = flat(over=dp)\n',
               degrees={"dp": dp})
    ucp.convert(tmp_path / "src", tmp_path / "uni")
    frag = ucp.open(tmp_path / "uni").param_meta("w")["fragmentation"]
    assert frag["fragments"] == dp and "ranks" not in frag and frag["degrees"] == {"dp": dp}
    ucp.export(tmp_path / "uni", tmp_path / "dp3", "ranks", degrees={"dp": 3})
    assert torch.equal(load_ranks_full(tmp_path / "dp3")["param"]["w"], states["param"]["w"])


# ------------------------------------------------------------------ targets
class RecordingTarget(Target, register=False):
    """Keeps what the engine hands over; unit 1 holds param sharded and exp_avg whole."""
    name = "test-recording"
    description = "test plug-in: keeps what it is given"

    def plan(self, checkpoint):
        self.calls = ["plan"]
        shapes = {n: tuple(checkpoint.array_info(n, "param").shape) for n in checkpoint.params}
        sharded = bind_layout(ucp.engine.parse_spec(SHARDED, "sharded"), list(shapes), {"tp": 2})
        whole = bind_layout(ucp.engine.parse_spec(SHARDED, "whole"), list(shapes), {})
        return [TargetUnit(key=f"u{r}", coords={"tp": r}, fragments=sharded.rank_fragments(shapes, {"tp": r}),
                           state_fragments={"exp_avg": whole.rank_fragments(shapes, {})})
                for r in range(2)]

    def write_unit(self, unit, tensors):
        if self.options.get("fail_at") == unit.key:
            raise OSError(f"disk full writing {unit.key}")
        self.calls.append((unit.key, {st: {k: t.clone() for k, t in d.items()} for st, d in tensors.items()}))

    def finish(self, checkpoint):
        self.calls.append("finish")

    def abort(self):
        self.calls.append("abort")
        if self.options.get("abort_fails"):
            raise FileNotFoundError("the folder went away: another process of the job removed it")


def test_target_plugin_gets_each_units_tensors_in_order(tmp_path):
    full = _full(1)
    convert(TwoLayoutSource("<memory>", full=full), tmp_path / "uni")
    t = RecordingTarget(tmp_path / "out")
    export(tmp_path / "uni", t)
    assert [c if isinstance(c, str) else c[0] for c in t.calls] == ["plan", "u0", "u1", "finish"]
    for r, (_, tensors) in enumerate(t.calls[1:3]):
        assert list(tensors) == ["param", "exp_avg"]
        assert torch.equal(tensors["param"]["a"], full["param"]["a"].tensor_split(2)[r])
        assert torch.equal(tensors["exp_avg"]["a"], full["exp_avg"]["a"])
    bad = RecordingTarget(tmp_path / "out", fail_at="u1")
    with pytest.raises(OSError, match="disk full"):
        export(tmp_path / "uni", bad)
    assert [c if isinstance(c, str) else c[0] for c in bad.calls] == ["plan", "u0", "abort"]


def test_a_failing_cleanup_does_not_hide_the_failure(tmp_path):
    """The cleanup after a failed export fails too (in a torchrun job another process may be
    removing the same folder): the user still reads the failure that stopped the export."""
    convert(TwoLayoutSource("<memory>", full=_full(1)), tmp_path / "uni")
    bad = RecordingTarget(tmp_path / "out", fail_at="u1", abort_fails=True)
    with pytest.raises(OSError, match="disk full") as got:
        export(tmp_path / "uni", bad)
    assert bad.calls[-1] == "abort" and "another process" in "".join(getattr(got.value, "__notes__", []))


def test_failed_export_leaves_no_complete_rank_files(tmp_path):
    """A chunk that fails its checksum mid-export: the error names it, and the destination
    holds no layout.json and no rank file."""
    g = torch.Generator().manual_seed(4)
    states = {"param": {f"l{i}": torch.randn(64, 8, generator=g) for i in range(4)}}
    save_ranks(states, tmp_path / "src", spec_text=SHARDED, degrees={"tp": 2})
    ucp.convert(tmp_path / "src", tmp_path / "uni")
    chunk = next(f for f in sorted((tmp_path / "uni" / "l3" / "param").rglob("*"))
                 if f.is_file() and f.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    with pytest.raises(UcpError, match="l3"):
        ucp.export(tmp_path / "uni", tmp_path / "tp4", "ranks", degrees={"tp": 4})
    assert not (tmp_path / "tp4").exists() or list((tmp_path / "tp4").iterdir()) == []


def test_torchrun_export_equals_single_process(tmp_path):
    """`torchrun --nproc_per_node 2 -m ucp export`: the processes share the rank files, one
    writes layout.json; the files equal a single-process export's."""
    g = torch.Generator().manual_seed(5)
    states = {st: {f"l{i}": torch.randn(30 + i, 6, generator=g) for i in range(5)} for st in ("param", "exp_avg")}
    save_ranks(states, tmp_path / "src", spec_text=SHARDED, degrees={"tp": 2}, metadata={"iteration": 2})
    ucp.convert(tmp_path / "src", tmp_path / "uni")
    ucp.export(tmp_path / "uni", tmp_path / "one", "ranks", degrees={"tp": 3})
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "ucp", "export",
                        str(tmp_path / "uni"), str(tmp_path / "two"), "--to", "ranks", "--tp", "3", "-q"],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count("exported") == 1 and "(2 processes)" in r.stdout
    one = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert one == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert (tmp_path / "one" / "layout.json").read_text() == (tmp_path / "two" / "layout.json").read_text()
    for name in one:
        if name.startswith("rank"):
            a = torch.load(tmp_path / "one" / name, weights_only=True)
            b = torch.load(tmp_path / "two" / name, weights_only=True)
            assert a.keys() == b.keys() and all(torch.equal(a[s][k], b[s][k]) for s in a for k in a[s])
    full = load_ranks_full(tmp_path / "two")
    assert all(torch.equal(full[s][k], states[s][k]) for s in states for k in states[s])


def test_torchrun_export_failure_leaves_nothing(tmp_path):
    """A chunk fails its checksum during a torchrun export: every process stops, removes what
    it wrote, the error names the array, and no rank file or layout.json is left."""
    g = torch.Generator().manual_seed(6)
    states = {"param": {f"l{i}": torch.randn(40, 6, generator=g) for i in range(4)}}
    save_ranks(states, tmp_path / "src", spec_text=SHARDED, degrees={"tp": 2})
    ucp.convert(tmp_path / "src", tmp_path / "uni")
    chunk = next(f for f in sorted((tmp_path / "uni" / "l2" / "param").rglob("*"))
                 if f.is_file() and f.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0x01
    chunk.write_bytes(bytes(data))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "ucp", "export",
                        str(tmp_path / "uni"), str(tmp_path / "out"), "--to", "ranks", "--tp", "4", "-q"],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=180)
    assert r.returncode != 0 and "l2" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out").exists()    # the folder the job made, too


@pytest.mark.parametrize("target,flags", [
    ("megatron", ["--tp", "2", "--pp", "2"]), ("dcp", ["--dp", "3"]), ("hf", ["--max-shard-size", "200KB"]),
    ("deepspeed", ["--dp", "2", "--zero-stage", "3"])])
def test_every_targets_torchrun_export_equals_its_single_process_export(tmp_path, target, flags):
    """Each target's units are shared among the processes of a job and process 0 finishes: what it
    indexes (Megatron's and DCP's ``.metadata``, HF's index, DeepSpeed's files) must cover the
    units every process wrote. Megatron's ``.metadata`` indexed process 0's files only."""
    import pickle

    from tests.test_megatron_hf import make_llama_fp32

    make_llama_fp32(tmp_path / "hf")
    ucp.convert(tmp_path / "hf", tmp_path / "u")
    ucp.export(tmp_path / "u", tmp_path / "one", target, **_export_args(flags))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "ucp", "export",
                        str(tmp_path / "u"), str(tmp_path / "two"), "--to", target, *flags, "-q"],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert one == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    for rel in one:
        a, b = (tmp_path / "one" / rel).read_bytes(), (tmp_path / "two" / rel).read_bytes()
        if rel.name == ".metadata":    # DCP's pickle: the same entries, maybe in another order
            a, b = pickle.loads(a), pickle.loads(b)
            assert (a.state_dict_metadata, a.storage_data) == (b.state_dict_metadata, b.storage_data), rel
        else:
            assert a == b, rel
    ucp.convert(tmp_path / "two", tmp_path / "back")   # and it reads back as a whole checkpoint
    assert verify(tmp_path / "back") == []


def _export_args(flags: list[str]) -> dict:
    """ucp.export's keywords for the command line's export flags."""
    degrees, options = {}, {}
    for flag, value in zip(flags[::2], flags[1::2]):
        name = flag.removeprefix("--").replace("-", "_")
        if name in ("tp", "pp", "dp"):
            degrees[name] = int(value)
        else:
            options[name] = int(value) if value.isdigit() else value
    return {"degrees": degrees, **options}


def test_an_interrupted_torchrun_export_removes_every_process_files(tmp_path):
    """Ctrl-C or SIGTERM during a job's export: the interrupted process removes what it wrote (the
    handler's KeyboardInterrupt passed the job's clean-up by), and a process that loses its partner
    says so in one line (it printed gloo's traceback), removes its own files and fails."""
    g = torch.Generator().manual_seed(7)
    states = {"param": {f"l{i}": torch.randn(40, 6, generator=g) for i in range(4)}}
    save_ranks(states, tmp_path / "src", spec_text=SHARDED, degrees={"tp": 2})
    ucp.convert(tmp_path / "src", tmp_path / "uni")
    script = os.path.join(os.path.dirname(__file__), "dist", "export_interrupted.py")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), script,
                        str(tmp_path / "uni"), str(tmp_path / "out")],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert "rank 0: exit 130" in r.stdout and "ucp export: interrupted; what it wrote was removed" in r.stderr, \
        r.stdout + r.stderr[-3000:]
    worker_said = r.stderr.split("Traceback (most recent call last)")[0]   # then torchrun's own
    assert "[rank1]" not in r.stderr and "RuntimeError" not in r.stderr, r.stderr[-3000:]
    if "rank 1: exit 2" in r.stdout:      # it saw its partner go before torchrun stopped it
        assert "another process of the job stopped or cannot be reached" in worker_said, worker_said
    assert not (tmp_path / "out").exists()    # the folder the job made, too


def test_a_second_export_into_a_folder_being_exported_to_is_refused(tmp_path):
    """Two exports into one folder: the second is refused naming the first's holder, and removes
    nothing of the first's (its clean-up deleted the other's files, or both 'succeeded' into one
    folder of mixed rank files). An export's lock is gone when it ends, and one left by a killed
    export is taken over."""
    import json
    import socket
    import threading

    from ucp.engine.from_universal import EXPORT_LOCK
    from ucp.targets.ranks import RanksTarget

    writing, go = threading.Event(), threading.Event()

    class Held(RanksTarget, register=False):
        """Rank files whose first unit waits for ``go`` after saying ``writing``: caught mid-way."""

        def write_unit(self, unit, tensors):
            writing.set()
            assert go.wait(60)
            super().write_unit(unit, tensors)

    g = torch.Generator().manual_seed(8)
    states = {"param": {f"l{i}": torch.randn(12, 6, generator=g) for i in range(3)}}
    save_ranks(states, tmp_path / "src", spec_text=SHARDED, degrees={"tp": 2})
    ucp.convert(tmp_path / "src", tmp_path / "uni")
    out, errors = tmp_path / "out", []

    def first_export():
        try:
            export(tmp_path / "uni", Held(out, degrees={"tp": 2}))
        except BaseException as e:
            errors.append(e)

    first = threading.Thread(target=first_export)
    first.start()
    assert writing.wait(60)
    for tp in (2, 3):
        with pytest.raises(UcpError, match=r"out: another export is writing into this folder: writer .*pid \d+"):
            ucp.export(tmp_path / "uni", out, "ranks", degrees={"tp": tp})
    go.set()
    first.join()
    assert errors == []
    assert sorted(p.name for p in out.iterdir()) == ["layout.json", "rank-tp0.pt", "rank-tp1.pt"]
    assert all(torch.equal(load_ranks_full(out)["param"][k], v) for k, v in states["param"].items())
    # a lock left by an export that was killed (its process is gone) does not block the next one
    (tmp_path / "again").mkdir()
    dead = {"writer_id": "x", "host": socket.gethostname(), "pid": 2 ** 22 + 12345, "created": "then"}
    (tmp_path / "again" / EXPORT_LOCK).write_text(json.dumps(dead))
    ucp.export(tmp_path / "uni", tmp_path / "again", "ranks", degrees={"tp": 3})
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["layout.json", "rank-tp0.pt", "rank-tp1.pt",
                                                                        "rank-tp2.pt"]


@pytest.mark.parametrize("target", ["megatron", "hf"])
def test_a_torchrun_export_refused_by_anothers_lock_removes_nothing(tmp_path, target):
    """A job's export into a folder another export holds: refused in its first step, and no process
    of the job cleans up there (Megatron's and HF's clean-up removed the other export's
    metadata.json, common.pt, config.json by name)."""
    import json
    import socket

    from tests.test_megatron_hf import make_llama_fp32
    from ucp.engine.from_universal import EXPORT_LOCK

    make_llama_fp32(tmp_path / "hf")
    ucp.convert(tmp_path / "hf", tmp_path / "u")
    out = tmp_path / "out"
    out.mkdir()
    holder = {"writer_id": "first", "host": socket.gethostname(), "pid": os.getpid(), "created": "now"}
    theirs = {EXPORT_LOCK: json.dumps(holder), "metadata.json": "{}", "common.pt": "x", "config.json": "{}",
              "model.safetensors": "x"}
    for name, text in theirs.items():
        (out / name).write_text(text)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "ucp", "export",
                        str(tmp_path / "u"), str(out), "--to", target, "-q"],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "another export is writing into this folder: writer first" in r.stderr, \
        r.stderr[-3000:]
    assert {p.name: p.read_text() for p in out.iterdir()} == theirs
