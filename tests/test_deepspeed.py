"""The ``deepspeed`` source against real DeepSpeed 0.19.8 checkpoints made on CPU (gloo, torchrun).

Reference answers come from DeepSpeed itself: ``get_fp32_state_dict_from_zero_checkpoint`` for
``param``, and ``safe_get_full_optimizer_state`` / the wrapped torch optimizer dumped by the
producing run (tests/dist/ds_train.py) for ``exp_avg`` / ``exp_avg_sq`` / ``step``. Frozen
weights are compared with the model the script builds (a fixed seed), cast to the run's dtype.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _ports import free_port
from _ds_env import DS_ENV, run_ds_job, run_ds_to_universal

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="DeepSpeed is not installed")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist" / "ds_train.py"

#: cell -> (stage, dtype, ranks, extra flags): every stage, fp32 / bf16 / fp16, two param groups
#: everywhere, frozen and tied variants, ZeRO-3 with sub-groups (sub_group_size 1000). fp16 runs
#: with DeepSpeed's CPU fp16 capability check answered yes (see tests/dist/ds_train.py).
CELLS = {
    "z1-fp32": (1, "fp32", 2, ["--frozen"]),
    "z1-bf16": (1, "bf16", 3, ["--tied", "--frozen"]),
    "z2-fp32": (2, "fp32", 2, ["--tied", "--second-save", "1"]),
    "z2-bf16": (2, "bf16", 3, ["--tied", "--frozen"]),
    "z3-fp32": (3, "fp32", 2, ["--frozen"]),
    "z3-bf16": (3, "bf16", 3, ["--tied", "--frozen"]),
    "z1-fp16": (1, "fp16", 2, ["--tied", "--frozen"]),
    "z3-fp16": (3, "fp16", 2, ["--frozen"]),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def run_ds(nproc: int, *args, cwd: Path) -> None:
    """One torchrun job of tests/dist/ds_train.py."""
    run_ds_job(SCRIPT, nproc, *args, cwd=cwd)


@pytest.fixture(scope="session")
def ds_runs(tmp_path_factory):
    """Every cell's checkpoint and reference dump, made once per session."""
    base = tmp_path_factory.mktemp("ds")
    out = {}
    for cell, (stage, dtype, nproc, extra) in CELLS.items():
        ck, ref = base / cell, base / f"{cell}-ref.pt"
        run_ds(nproc, "--out", ck, "--stage", stage, "--dtype", dtype, "--ref", ref, *extra, cwd=base)
        out[cell] = (ck, ref)
    return out


def universal(src: Path, tmp: Path):
    """Convert with ``ucp convert --from deepspeed`` and open the result."""
    import ucp

    dst = tmp / "universal"
    ucp.convert(str(src), str(dst), source="deepspeed")
    return ucp.open(str(dst))


def model_reference(cell: str) -> dict[str, torch.Tensor]:
    """The initial weights tests/dist/ds_train.py builds for ``cell`` (frozen ones never change)."""
    from ucp.demo_deepspeed import build_model
    stage, dtype, _, extra = CELLS[cell]
    m = build_model("--tied" in extra, "--frozen" in extra)
    return {n: p.detach().to(DTYPES[dtype]) for n, p in m.named_parameters() if not p.requires_grad}


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view for bit-exact comparison (NaN-safe)."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


@pytest.fixture(scope="session")
def converted(ds_runs, tmp_path_factory):
    out = {}
    for cell, (ck, _) in ds_runs.items():
        out[cell] = universal(ck, tmp_path_factory.mktemp(f"u-{cell}"))
    return out


@pytest.mark.parametrize("cell", list(CELLS))
def test_param_equals_zero_to_fp32(cell, ds_runs, converted):
    """`param` of every parameter (trainable, frozen, tied) equals DeepSpeed's own
    get_fp32_state_dict_from_zero_checkpoint bit-exactly."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ck = converted[cell]
    want = get_fp32_state_dict_from_zero_checkpoint(str(ds_runs[cell][0]))
    stage = CELLS[cell][0]
    frozen = model_reference(cell)
    if stage == 1:  # ZeRO-1 saves no frozen_param_fragments: zero_to_fp32 drops frozen weights
        assert not set(frozen) & set(want)
        want.update(frozen)
    assert sorted(ck.params) == sorted(want)
    for name, t in want.items():
        assert same(ck.read(name, "param"), t.contiguous()), name


@pytest.mark.parametrize("cell", list(CELLS))
def test_adam_states_and_step_equal_deepspeed_gather(cell, ds_runs, converted):
    """exp_avg / exp_avg_sq equal safe_get_full_optimizer_state of the producing run, `step`
    equals its optimizer's step, and `param` equals safe_get_full_fp32_param."""
    ck, ref = converted[cell], torch.load(ds_runs[cell][1], weights_only=True)
    assert set(ref["exp_avg"]) == {n for n in ck.params if not ck.param_meta(n).get("frozen")
                                   and not ck.param_meta(n).get("tied_to")}
    for st in ("param", "exp_avg", "exp_avg_sq"):
        for name, t in ref[st].items():
            assert same(ck.read(name, st), t), (st, name)
    steps = {ck.param_meta(n)["scalars"]["step"] for n in ref["exp_avg"]}
    assert steps == {s for v in ref["step"].values() for s in v} == {3}


@pytest.mark.parametrize("cell", list(CELLS))
def test_frozen_and_tied_recorded(cell, converted):
    """Frozen weights are kept in the model dtype with frozen=True and no optimizer state; a
    tied weight names its partner and holds the same values."""
    ck = converted[cell]
    frozen = model_reference(cell)
    assert {n for n in ck.params if ck.param_meta(n).get("frozen")} == set(frozen)
    for n, t in frozen.items():
        assert ck.states(n) == ["param"]
        assert same(ck.read(n, "param"), t)
    if "--tied" in CELLS[cell][3]:
        assert ck.param_meta("lm_head.weight")["tied_to"] == "model.embed_tokens.weight"
        for st in ck.states("lm_head.weight"):
            assert same(ck.read("lm_head.weight", st), ck.read("model.embed_tokens.weight", st))


def test_non_tensor_state_is_metadata(converted):
    """Iteration, lr scheduler, client state, both param groups' hyper-parameters and the
    DeepSpeed config travel as JSON metadata."""
    md = converted["z2-bf16"].metadata
    assert md["iteration"] == 3
    assert md["lr_scheduler"] == {"last_batch_iteration": 2}
    assert md["client_state"] == {"note": "ucp fixture", "epoch": 1, "universal_checkpoint_info": {}}
    groups = md["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert md["deepspeed"]["zero_stage"] == 2 and md["deepspeed"]["dp_world_size"] == 3
    assert md["deepspeed"]["ds_config"]["bf16"]["enabled"] is True
    assert md["deepspeed"]["loss_scaler"] == {"cur_scale": 1.0, "dynamic": False}


def test_manifests_match_the_schema(converted):
    """Every conversion's manifest (with DeepSpeed's metadata in it) validates against
    spec/metadata.schema.json."""
    from conftest import validate_manifest

    for ck in converted.values():
        validate_manifest(ck.path)


def test_detect_latest_and_tag_folder(ds_runs):
    """--from auto recognises the folder with `latest` and the tag folder itself."""
    from ucp.sources import detect

    ck = ds_runs["z3-bf16"][0]
    assert detect(ck) == "deepspeed"
    assert detect(ck / "global_step3") == "deepspeed"


def test_cli_names_a_deepspeed_folder_and_a_missing_tag(ds_runs, tmp_path, capsys):
    """``ucp inspect`` of a DeepSpeed folder says what it holds and that ``ucp convert`` makes a
    universal checkpoint of it; a ``latest`` naming a tag that is not there is DeepSpeed's error
    (the tag named), not "cannot tell which framework"."""
    import shutil

    from ucp.cli import main

    ck = ds_runs["z3-bf16"][0]
    assert main(["inspect", str(ck)]) == 2
    err = capsys.readouterr().err
    assert "it holds a deepspeed checkpoint" in err and f"ucp convert {ck}" in err
    assert main(["inspect", f"file://{ck}"]) == 2          # a file:// URL is that folder
    assert "it holds a deepspeed checkpoint" in capsys.readouterr().err
    moved = tmp_path / "moved"
    shutil.copytree(ck, moved)
    (moved / "latest").write_text("nosuch")
    assert main(["convert", str(moved), str(tmp_path / "u")]) == 2
    assert "names tag 'nosuch'" in capsys.readouterr().err
    assert not (tmp_path / "u").exists()


def test_reads_without_deepspeed(ds_runs, tmp_path):
    """The conversion imports nothing from DeepSpeed: it runs with `import deepspeed` blocked."""
    code = ("import sys; sys.modules['deepspeed'] = None\n"
            "import ucp; ucp.convert(sys.argv[1], sys.argv[2], source='deepspeed')\n"
            "ck = ucp.open(sys.argv[2]); print(len(ck.params))\n")
    res = subprocess.run([sys.executable, "-c", code, str(ds_runs["z3-bf16"][0]), str(tmp_path / "u")],
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split()[-1] == "31"


@pytest.mark.parametrize("cell", ["z2-fp32", "z3-bf16", "z1-fp16"])
def test_converts_without_torch(cell, ds_runs, converted, tmp_path):
    """``ucp convert --from deepspeed`` never imports torch (1.5-2 s of the 5 s a 4 GiB
    conversion took: bench/results/deepspeed.txt): it runs with ``import torch`` and ``import
    deepspeed`` blocked, bfloat16 / float16 frozen weights and tied ones included, and its
    checkpoint equals the one converted in this process (where torch is loaded) array for array
    bit for bit, per-parameter and checkpoint metadata included. One cell finds its source with
    ``--from auto`` (every plug-in's ``detect`` runs, none may import torch)."""
    import ucp
    from ucp.format.compare import diff_report

    code = ("import sys; sys.modules['torch'] = None; sys.modules['deepspeed'] = None\n"
            "from ucp.cli import main\n"
            "rc = main(['convert', sys.argv[1], sys.argv[2], '--from', sys.argv[3]])\n"
            "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules if sys.modules[m]), 'torch'\n"
            "sys.exit(rc)\n")
    dst = tmp_path / "u"
    res = subprocess.run([sys.executable, "-c", code, str(ds_runs[cell][0]), str(dst),
                          "auto" if cell == "z1-fp16" else "deepspeed"],
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    want, got = converted[cell], ucp.open(str(dst))
    report = diff_report(want, got)
    assert report["equal"] and len(report["rows"]) > 30, report["metadata_differences"] or report["rows"]
    assert [want.param_meta(n) for n in want.params] == [got.param_meta(n) for n in got.params]


# ------------------------------------------------------------------ bad inputs
def copy_ck(ds_runs, cell, tmp_path) -> Path:
    dst = tmp_path / cell
    shutil.copytree(ds_runs[cell][0], dst)
    return dst


def convert_error(src: Path, tmp_path: Path) -> str:
    import ucp
    from ucp.errors import UcpError

    with pytest.raises(UcpError) as e:
        ucp.convert(str(src), str(tmp_path / "out"), source="deepspeed")
    assert not (tmp_path / "out" / "ucp.manifest.json").exists()
    return str(e.value)


def test_missing_rank_file(ds_runs, tmp_path):
    ck = copy_ck(ds_runs, "z2-fp32", tmp_path)
    gone = ck / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    gone.unlink()
    msg = convert_error(ck, tmp_path)
    assert str(gone) in msg and "missing" in msg


def test_rank_files_of_two_tags(ds_runs, tmp_path):
    ck = copy_ck(ds_runs, "z2-fp32", tmp_path)
    name = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shutil.copy(ck / "global_step4" / name, ck / "global_step3" / name)
    msg = convert_error(ck, tmp_path)
    assert name in msg and "different saves" in msg


def test_world_size_mismatch(ds_runs, tmp_path):
    ck = copy_ck(ds_runs, "z2-fp32", tmp_path)
    extra = ck / "global_step3" / "zero_pp_rank_2_mp_rank_00_optim_states.pt"
    shutil.copy(ck / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt", extra)
    msg = convert_error(ck, tmp_path)
    assert str(extra) in msg and "world size" in msg


def test_truncated_file(ds_runs, tmp_path):
    ck = copy_ck(ds_runs, "z3-fp32", tmp_path)
    f = ck / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    msg = convert_error(ck, tmp_path)
    assert str(f) in msg and "truncated" in msg


def test_flipped_bytes_in_a_tensor_record_are_refused(ds_runs, tmp_path):
    """Bytes changed inside a tensor record of a rank file (its size intact, so every structural
    check passes, and ``torch.load`` reads it without a word) fail the record's zip CRC-32: the
    error names the file and the record, and nothing is committed."""
    import zipfile

    ck = copy_ck(ds_runs, "z2-bf16", tmp_path)
    f = ck / "global_step3" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    with zipfile.ZipFile(f) as z:
        rec = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(f.read_bytes())
    at = rec.header_offset   # the local header's own name and extra lengths (torch pads the extra field)
    at += 30 + int.from_bytes(raw[at + 26:at + 28], "little") + int.from_bytes(raw[at + 28:at + 30], "little") + 100
    raw[at:at + 8] = bytes(255 - b for b in raw[at:at + 8])
    f.write_bytes(bytes(raw))
    msg = convert_error(ck, tmp_path)
    assert str(f) in msg and rec.filename in msg and "CRC-32" in msg and "corrupt" in msg


def test_export_keeps_the_runs_tag(ds_runs, tmp_path):
    """A run saved under its own tag (``save_checkpoint(tag="mytag")``) is exported under that tag
    (``latest`` names it), unless ``--tag`` asks for another."""
    import ucp

    ck = copy_ck(ds_runs, "z2-bf16", tmp_path)
    (ck / "global_step3").rename(ck / "mytag")
    (ck / "latest").write_text("mytag")
    ucp.convert(str(ck), str(tmp_path / "u"), source="deepspeed")
    ucp.export(str(tmp_path / "u"), str(tmp_path / "out"), "deepspeed", degrees={"dp": 2}, zero_stage=1)
    assert (tmp_path / "out" / "latest").read_text() == "mytag" and (tmp_path / "out" / "mytag").is_dir()
    ucp.export(str(tmp_path / "u"), str(tmp_path / "out2"), "deepspeed", degrees={"dp": 2}, zero_stage=1,
               tag="other")
    assert (tmp_path / "out2" / "latest").read_text() == "other"
    # a tag folder given as ".." (converted from inside it) records its own name, not ".."
    (ck / "mytag" / "sub").mkdir()
    ucp.convert(str(ck / "mytag" / "sub" / ".."), str(tmp_path / "u3"), source="deepspeed")
    assert ucp.open(str(tmp_path / "u3")).metadata["deepspeed"]["tag"] == "mytag"


@pytest.mark.parametrize("stage, dp, why", [(2, 10**7, "too few for 10000000 ranks"),
                                          (3, 10**8, "fewer than ranks")])
def test_a_degree_the_model_cannot_spread_over_is_refused_first(converted, tmp_path, stage, dp, why):
    """``--dp`` beyond what the model can be spread over is refused before any per-rank work (a
    typo of ten million ranks ran for minutes and took gigabytes before the last rank's check)."""
    import ucp
    from ucp.errors import UcpError

    with pytest.raises(UcpError, match=why):
        ucp.export(converted["z2-bf16"].path, str(tmp_path / "out"), "deepspeed", degrees={"dp": dp}, zero_stage=stage)
    assert not (tmp_path / "out").exists()


class RunsCode:
    """Unpickling this would run a shell command (``os.system``)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_unknown_pickle_global_refused(ds_runs, tmp_path):
    """A pickle naming a global outside the allow-list is refused, naming file and global; the
    global's code never runs."""
    ck = copy_ck(ds_runs, "z1-fp32", tmp_path)
    f = ck / "global_step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    marker = tmp_path / "ran"
    torch.save({"optimizer_state_dict": {"zero_stage": 1, "hook": RunsCode(marker)}}, f)
    msg = convert_error(ck, tmp_path)
    assert str(f) in msg and f"{os.system.__module__}.system" in msg
    assert not marker.exists()


# ------------------------------------------------------------------ deepspeed-universal
@pytest.mark.parametrize("cell", ["z2-fp32", "z3-bf16"])
def test_universal_source_equals_deepspeed_source(cell, ds_runs, converted, tmp_path):
    """`--from auto` on DeepSpeed's own ds_to_universal output picks `deepspeed-universal` and
    gives the same tensors, steps and frozen/tied records as the direct conversion (which the
    tests above check against DeepSpeed's gathers)."""
    import ucp
    from ucp.sources import detect

    tag = ds_runs[cell][0] / "global_step3"
    out = tmp_path / "ds-universal"
    run_ds_to_universal(tag, out)
    assert detect(out) == "deepspeed-universal"
    ucp.convert(str(out), str(tmp_path / "u"))
    got, want = ucp.open(str(tmp_path / "u")), converted[cell]
    assert list(got.params) == list(want.params)
    for n in want.params:
        assert got.states(n) == want.states(n), n
        for st in want.states(n):
            assert same(got.read(n, st), want.read(n, st)), (n, st)
        for key in ("scalars", "frozen", "tied_to"):
            assert got.param_meta(n).get(key) == want.param_meta(n).get(key), (n, key)


@pytest.mark.parametrize("stage", [2, 3])
def test_own_deepspeed_universal_export_converts_back(converted, tmp_path, stage):
    """ucp reads back what ``--to deepspeed-universal`` writes (which DeepSpeed's ``load_universal``
    loads, tests/test_deepspeed_resume.py): at ZeRO-3 its ``fp32.pt`` holds the parameter's shape,
    where ``ds_to_universal`` writes it flat, and the source took only the flat form."""
    import ucp

    want = converted["z3-bf16"]
    ucp.export(str(want.path), str(tmp_path / "dsu"), "deepspeed-universal", degrees={"dp": 2}, zero_stage=stage)
    ucp.convert(str(tmp_path / "dsu"), str(tmp_path / "u"))
    got = ucp.open(str(tmp_path / "u"))
    assert list(got.params) == list(want.params)
    for n in want.params:
        assert got.states(n) == want.states(n), n
        for st in want.states(n):
            assert same(got.read(n, st), want.read(n, st)), (n, st)


def test_export_under_torchrun_equals_one_process(converted, tmp_path):
    """`torchrun -m ucp export --to deepspeed` (units split over 2 processes) writes the same
    checkpoint as one process: read back, every tensor, step and record is equal."""
    import ucp

    src = str(converted["z3-bf16"].path)
    one, two = tmp_path / "one", tmp_path / "two"
    ucp.export(src, str(one), "deepspeed", degrees={"dp": 3}, zero_stage=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "ucp", "export", src, str(two),
           "--to", "deepspeed", "--dp", "3", "--zero-stage", "1", "-q"]
    res = subprocess.run(cmd, env={**os.environ, **DS_ENV, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    ucp.convert(str(one), str(tmp_path / "u1"))
    ucp.convert(str(two), str(tmp_path / "u2"))
    a, b = ucp.open(str(tmp_path / "u1")), ucp.open(str(tmp_path / "u2"))
    assert list(a.params) == list(b.params)
    for n in a.params:
        assert a.param_meta(n).get("scalars") == b.param_meta(n).get("scalars")
        for st in a.states(n):
            assert same(a.read(n, st), b.read(n, st)), (n, st)


def test_convert_under_torchrun_equals_one_process(converted, ds_runs, tmp_path):
    """`torchrun -m ucp convert --from deepspeed` (parameters split over 2 processes by size, one
    collective commit; numpy boxes from the torch-free reader) writes the checkpoint one process
    writes: every array bit for bit, per-parameter and checkpoint metadata equal."""
    import ucp
    from ucp.format.compare import diff_report

    dst = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "ucp", "convert",
           str(ds_runs["z3-bf16"][0]), str(dst), "--from", "deepspeed"]
    res = subprocess.run(cmd, env={**os.environ, **DS_ENV, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    want, got = converted["z3-bf16"], ucp.open(str(dst))
    report = diff_report(want, got)
    assert report["equal"] and len(report["rows"]) > 30, report["metadata_differences"] or report["rows"]
    assert [want.param_meta(n) for n in want.params] == [got.param_meta(n) for n in got.params]


def test_fp16_resume_on_other_degree_and_stage(ds_runs, converted, tmp_path):
    """fp16 ZeRO-1 on 2 ranks -> universal -> `--to deepspeed` for 3 ranks at ZeRO-3 (fp16, with
    the dynamic loss scaler): DeepSpeed loads it and its own gathers of the fp32 params and Adam
    states, and the step, equal those of the producing run bit for bit."""
    import ucp

    out = tmp_path / "z3x3"
    ucp.export(str(converted["z1-fp16"].path), str(out), "deepspeed", degrees={"dp": 3}, zero_stage=3,
               sub_group_size=1000)
    run_ds(3, "--load", out, "--stage", 3, "--dtype", "fp16", "--tied", "--frozen", "--ref", tmp_path / "ref.pt",
           cwd=tmp_path)
    want, got = (torch.load(p, weights_only=True) for p in (ds_runs["z1-fp16"][1], tmp_path / "ref.pt"))
    for st in ("param", "exp_avg", "exp_avg_sq"):
        assert set(got[st]) == set(want[st])
        for name, t in want[st].items():
            assert same(got[st][name], t), (st, name)
    assert got["step"] == want["step"]
