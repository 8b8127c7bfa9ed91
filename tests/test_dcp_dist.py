"""torch DCP under real torchrun (gloo, CPU): FSDP2, TP, 2-D with _StridedShard.

Six torchrun launches for the whole file, made once per session:

1. ``dcp_save.py`` on 4 ranks: TinyGPT (vocab 1003, GQA, SwiGLU 170, biases, LayerNorm with
   bias; plain and tied + frozen variants) trained 2 steps under FSDP2x4, 2-D (dp2 x tp2) and
   TP x2, each state saved by DCP's FileSystemWriter (the reference), by ``dcp.save`` and
   ``dcp.async_save`` through ``UniversalWriter``; a save with a bad entry on rank 1 only.
2-4. ``dcp_load.py`` into TP x2 (2 ranks, with the resume), FSDP2 x3 (3 ranks, uneven) and
   2-D x4 (4 ranks): every rank's shards against DCP's own consolidation of the original.
5. ``ds_train.py`` (the DeepSpeed fixtures' script) on 2 ranks, ZeRO-2: converted with ``ucp
   convert --from deepspeed`` and loaded into 2-D x4 by launch 4, against DeepSpeed's own answers.
6. ``dcp_pipe.py`` on 2 ranks: two pipeline stages with flattened optimizer state dicts.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from _ds_env import DS_ENV
from _ports import free_port

import ucp
from ucp.demo_dcp import GPTConfig

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

DIST = Path(__file__).parent / "dist"
VARIANTS = {"plain": GPTConfig(), "tf": GPTConfig(tied=True, frozen=True)}
CASES = ["fsdp-plain", "fsdp-tf", "2d-plain", "tpdp-plain"]


def _helpers():
    spec = importlib.util.spec_from_file_location("test_dcp_helpers", Path(__file__).parent / "test_dcp.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _loader():
    spec = importlib.util.spec_from_file_location("dcp_load", DIST / "dcp_load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def torchrun(nproc: int, script: str, *args, env=None, cwd=None) -> None:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(port), str(DIST / script), *map(str, args)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=cwd)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-6000:]


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("dcp_dist")
    torchrun(4, "dcp_save.py", out)
    for case in CASES:
        dcp_to_torch_save(out / case / "dcp", out / case / "ref.pt")
        ucp.convert(out / case / "dcp", out / case / "conv")
    ucp.convert(out / "2d-plain" / "titan-dcp", out / "2d-plain" / "titan-conv")
    return out


@pytest.fixture(scope="session")
def deepspeed(saved):
    """A DeepSpeed ZeRO-2 run on 2 ranks (fp32, 3 steps, two param groups), converted with ``ucp
    convert --from deepspeed``; its reference in ``dcp_to_torch_save``'s layout from DeepSpeed's
    own answers: ``get_fp32_state_dict_from_zero_checkpoint`` (params), the run's
    ``safe_get_full_optimizer_state`` dump (Adam states, step per group) and the param groups
    DeepSpeed saved (hyper-parameters)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from ucp.demo_deepspeed import build_model, param_groups

    out = saved / "ds"
    out.mkdir()
    torchrun(2, "ds_train.py", "--out", out / "ck", "--stage", 2, "--dtype", "fp32", "--ref", out / "dump.pt",
             env=DS_ENV, cwd=out)
    ucp.convert(out / "ck", out / "conv", source="deepspeed")
    dump = torch.load(out / "dump.pt", weights_only=True)
    model = build_model(tied=False, frozen=False)
    names = {id(p): n for n, p in model.named_parameters()}
    # DeepSpeed's own optimizer file, made by the run above (DeepSpeed pickles it: not weights-only)
    (optim_file, *_) = sorted((out / "ck").glob("global_step*/*optim_states.pt"))
    saved_groups = torch.load(optim_file, weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]
    groups = []
    for gi, (g, hyper) in enumerate(zip(param_groups(model), saved_groups["param_groups"])):
        groups.append({**{k: v for k, v in hyper.items() if k != "params"},
                       "params": [names[id(p)] for p in g["params"]]})
    step = {n: float(dump["step"][gi][0]) for gi, g in enumerate(groups) for n in g["params"]}
    ref = {"model": get_fp32_state_dict_from_zero_checkpoint(str(out / "ck")),
           "optim": {"state": {n: {"exp_avg": dump["exp_avg"][n], "exp_avg_sq": dump["exp_avg_sq"][n],
                                   "step": torch.tensor(step[n])} for n in dump["exp_avg"]},
                     "param_groups": groups}}
    torch.save(ref, out / "ref.pt")
    return out


@pytest.fixture(scope="session")
def loaded(saved, deepspeed):
    """Reports ``{tag: json}`` of the three load launches."""
    out = saved

    def job(tag, variant, case, ckpt, *flags):
        return ":".join([f"{tag}={variant}", str(out / case / ckpt), str(out / case / "ref.pt"), *flags])

    ucp.export(out / "fsdp-plain" / "conv", out / "fsdp-plain" / "export3", "dcp", degrees={"dp": 3})
    launches = {
        (2, "tp"): [job("fsdp4-to-tp2", "plain", "fsdp-plain", "conv"),
                    job("fsdp4-uw-to-tp2-resume", "plain", "fsdp-plain", "uw", "resume"),
                    job("fsdp4-tf-to-tp2", "tf", "fsdp-tf", "conv"),
                    job("fsdp4-16k-to-tp2", "plain", "fsdp-plain", "uw16k")],
        (3, "fsdp"): [job("2d-to-fsdp3", "plain", "2d-plain", "conv"),
                      job("2d-uw-to-fsdp3", "plain", "2d-plain", "uw"),
                      job("2d-uwa-to-fsdp3", "plain", "2d-plain", "uwa"),
                      job("fsdp4-tf-uw-to-fsdp3", "tf", "fsdp-tf", "uw"),
                      job("fsdp4-16k-to-fsdp3", "plain", "fsdp-plain", "uw16k"),
                      job("2d-titan-uw-to-fsdp3", "plain", "2d-plain", "titan-uw", "titan"),
                      job("2d-titan-conv-to-fsdp3", "plain", "2d-plain", "titan-conv", "titan")],
        (4, "2d"): [job("tp2-to-2d4", "plain", "tpdp-plain", "conv"),
                    job("tp2-uw-to-2d4", "plain", "tpdp-plain", "uw"),
                    job("export-dp3-to-2d4", "plain", "fsdp-plain", "export3"),
                    job("fsdp4-16k-to-2d4", "plain", "fsdp-plain", "uw16k"),
                    job("fsdp4-uw-as-titan-to-2d4", "plain", "fsdp-plain", "uw", "titan", "no-train-state"),
                    job("deepspeed-to-2d4", "ds", "ds", "conv"),
                    job("deepspeed-as-titan-to-2d4", "ds", "ds", "conv", "titan", "no-train-state")],
    }
    tags = {}
    for (n, layout), jobs in launches.items():
        torchrun(n, "dcp_load.py", out, layout, *jobs)
        for j in jobs:
            tag = j.split("=", 1)[0]
            tags[tag] = json.loads((out / f"{tag}.json").read_text())
    return tags


# ---------------------------------------------------------------------------- conversion and direct saves
@pytest.mark.parametrize("case", CASES)
def test_converted_equals_dcp_to_torch_save(saved, case):
    ref = torch.load(saved / case / "ref.pt", weights_only=True)
    _helpers().check_universal(saved / case / "conv", ref, VARIANTS[case.split("-")[1]])


@pytest.mark.parametrize("case, how", [("fsdp-plain", "uw"), ("fsdp-plain", "uwa"), ("fsdp-tf", "uw"),
                                       ("2d-plain", "uw"), ("2d-plain", "uwa"), ("tpdp-plain", "uw")])
def test_direct_save_equals_reference(saved, case, how):
    """dcp.save / dcp.async_save through UniversalWriter from the live layout == the FileSystemWriter
    checkpoint of the same state, consolidated by DCP itself."""
    ref = torch.load(saved / case / "ref.pt", weights_only=True)
    _helpers().check_universal(saved / case / how, ref, VARIANTS[case.split("-")[1]])


def test_failure_on_one_rank_leaves_no_manifest(saved):
    rep = json.loads((saved / "failure.json").read_text())
    assert rep["manifest"] is False
    assert all(e and e.startswith("torch.distributed.checkpoint.api.CheckpointException") for e in rep["errors"])
    assert all("'only_on_rank_1': ucp stores non-tensor values as JSON" in e for e in rep["errors"])
    with pytest.raises(ucp.UcpError):
        ucp.open(saved / "failed")


def test_ranks_given_different_paths_commit_nothing(saved):
    """Each rank passed its own directory to UniversalWriter: the save fails on every rank, and the
    coordinator's directory holds no manifest (it would list the other ranks' files, not there)."""
    rep = json.loads((saved / "split.json").read_text())
    assert rep["manifest"] is False
    assert all(e and "the parts of rank(s) 1, 2, 3 were written elsewhere: every rank must pass the same "
               "path" in e for e in rep["errors"]), rep["errors"]
    with pytest.raises(ucp.UcpError):
        ucp.open(saved / "split" / "0")


# ---------------------------------------------------------------------------- loads into other layouts
EXPECTED_WORLD = {"fsdp4-to-tp2": 2, "fsdp4-uw-to-tp2-resume": 2, "fsdp4-tf-to-tp2": 2, "2d-to-fsdp3": 3,
                  "2d-uw-to-fsdp3": 3, "2d-uwa-to-fsdp3": 3, "fsdp4-tf-uw-to-fsdp3": 3, "tp2-to-2d4": 4,
                  "tp2-uw-to-2d4": 4, "export-dp3-to-2d4": 4,
                  "fsdp4-16k-to-tp2": 2, "fsdp4-16k-to-fsdp3": 3, "fsdp4-16k-to-2d4": 4,
                  # torchtitan's form: saved and converted that way, or served so from get_state_dict's
                  "2d-titan-uw-to-fsdp3": 3, "2d-titan-conv-to-fsdp3": 3, "fsdp4-uw-as-titan-to-2d4": 4}


def test_torchtitan_form_saves_the_same_checkpoint(saved):
    """The 2-D state saved as torchtitan does (model keys at the top level, the flattened optimizer
    under ``optimizer``), converted or written by UniversalWriter, is the checkpoint its
    get_state_dict save gives: every array bit for bit, the same parameters and groups, and
    torchtitan's ``train_state`` kept."""
    base = ucp.open(saved / "2d-plain" / "conv")
    for which in ("titan-conv", "titan-uw"):
        ck = ucp.open(saved / "2d-plain" / which)
        assert ck.params == base.params, which
        assert ck.metadata["dcp_keys"] == "torchtitan" and ck.metadata["dcp"]["train_state.step"].item() == 2
        assert ck.metadata["optimizer"]["flattened"]
        for n in base.params:
            assert ck.states(n) == base.states(n), (which, n)
            for st in base.states(n):
                assert _helpers().same(ck.read(n, st), base.read(n, st)), (which, n, st)
            for key in ("scalars", "optimizer_group", "frozen", "tied_to"):
                assert ck.param_meta(n).get(key) == base.param_meta(n).get(key), (which, n, key)


@pytest.mark.parametrize("tag", sorted(EXPECTED_WORLD))
def test_cross_layout_load_gives_every_rank_its_shards(saved, loaded, tag):
    rep = loaded[tag]
    variant = "tf" if "-tf" in tag else "plain"
    ref = torch.load(saved / ("fsdp-tf" if variant == "tf" else "fsdp-plain") / "ref.pt", weights_only=True)
    n_tensors = len(ref["model"]) + sum(len(s) for s in ref["optim"]["state"].values())
    assert rep["world"] == EXPECTED_WORLD[tag]
    for r, got in enumerate(rep["ranks"]):
        assert got["bad"] == [], f"rank {r}: {got['bad'][:10]}"
        c = got["counts"]
        assert c["sharded"] > 0 and c["sharded"] + c["plain"] == n_tensors and c["hyper"] > 0


@pytest.mark.parametrize("tag", ["fsdp4-16k-to-tp2", "fsdp4-16k-to-fsdp3", "fsdp4-16k-to-2d4"])
def test_loads_read_about_the_bytes_each_rank_needs(saved, loaded, tag):
    """From a checkpoint with 16 KiB chunks each rank reads about its shards' bytes, not whole
    tensors. On this tiny model many tensors are one to three chunks (q is 64 x 64 fp32 = 16 KiB),
    so a 22-row FSDP2 x3 shard still reads a whole 64-row chunk: measured 1.09-1.32 here; the
    ratios on a model of realistic size (<= 1.1) are in bench/results/dcp.txt."""
    total = ucp.open(saved / "fsdp-plain" / "uw16k").nbytes
    for got in loaded[tag]["ranks"]:
        assert got["bytes_needed"] <= got["bytes_read"] <= 1.4 * got["bytes_needed"], got
        if not tag.endswith("tp2"):   # under TP the (large) embedding and head are replicated
            assert got["bytes_read"] < 0.75 * total, got


@pytest.mark.parametrize("tag", ["deepspeed-to-2d4", "deepspeed-as-titan-to-2d4"])
def test_deepspeed_converted_loads_into_2d(deepspeed, loaded, tag):
    """A DeepSpeed ZeRO-2 checkpoint converted by ``ucp convert --from deepspeed`` -> ``dcp.load``
    through UniversalReader into the same Llama on a 2-D (dp2 x tp2) mesh: every rank holds exactly
    the local shards DeepSpeed's full tensors imply, every param and Adam state, ``step`` and each
    group's hyper-parameters and members. Also as torchtitan loads it (``keys="torchtitan"``, the
    flattened optimizer state dict: each parameter's hyper-parameters from its group, which
    DeepSpeed's files do not list but each parameter's ``optimizer_group`` gives)."""
    rep = loaded[tag]
    ref = torch.load(deepspeed / "ref.pt", weights_only=True)
    n_tensors = len(ref["model"]) + sum(len(s) for s in ref["optim"]["state"].values())
    assert rep["world"] == 4 and len(ref["model"]) == 31
    for r, got in enumerate(rep["ranks"]):
        assert got["bad"] == [], f"rank {r}: {got['bad'][:10]}"
        c = got["counts"]
        assert c["sharded"] > 0 and c["sharded"] + c["plain"] == n_tensors, c
        assert c["hyper"] == sum(len(g) for g in ref["optim"]["param_groups"]), c


def test_resume_on_other_hardware_matches_uninterrupted_run(saved, loaded):
    """Trained on FSDP2 x4, saved with UniversalWriter, resumed under TP x2 on 2 ranks: the next
    losses equal the uninterrupted 4-rank run's within fp32 round-off."""
    ref = json.loads((saved / "fsdp-plain" / "losses.json").read_text())["losses"]
    for got in loaded["fsdp4-uw-to-tp2-resume"]["ranks"]:
        assert len(got["losses"]) == len(ref) == 3
        for a, b in zip(got["losses"], ref):
            assert abs(a - b) <= 1e-5 * abs(b), (got["losses"], ref)


def test_tp2_to_one_rank(saved):
    """TP x2 checkpoint -> one process, plain tensors (no process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from ucp.dcp import UniversalReader
    from ucp.demo_dcp import build, optimizer

    loader = _loader()
    ref = torch.load(saved / "tpdp-plain" / "ref.pt", weights_only=True)
    for ckpt in ("conv", "uw"):
        model = build(GPTConfig(), seed=99)
        opt = optimizer(model)
        msd, osd = get_state_dict(model, opt)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, storage_reader=UniversalReader(saved / "tpdp-plain" / ckpt))
        bad, counts = loader.compare(sd, ref)
        assert bad == [] and counts["plain"] == len(ref["model"]) + sum(len(s) for s in ref["optim"]["state"].values())


# ---------------------------------------------------------------------------- pipeline stages
def test_pipeline_stages_convert_and_load_unstaged(tmp_path):
    """Two pipeline stages saved with flattened optimizer state dicts (``dcp_pipe.py``, torchrun 2
    ranks): ``ucp convert`` of DCP's files and the UniversalWriter save both hold every parameter
    and state equal to DCP's own consolidation (``dcp_to_torch_save``), each parameter in the group
    of its hyper-parameters; and one process without stages loads the whole model and optimizer
    from them, as it would from DCP's files, and again without a template, in DCP's nesting."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    from ucp.dcp import UniversalReader
    from ucp.demo_dcp import build, optimizer

    torchrun(2, "dcp_pipe.py", tmp_path)
    dcp_to_torch_save(tmp_path / "dcp", tmp_path / "ref.pt")
    ref = torch.load(tmp_path / "ref.pt", weights_only=True)
    ucp.convert(tmp_path / "dcp", tmp_path / "conv")
    full = build(GPTConfig())
    assert sorted(ref["model"]) == sorted(full.state_dict())          # the stages hold every parameter
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    for path in ("conv", "uw"):
        ck = ucp.open(tmp_path / path)
        # the stages' orders, rank 0's first: the model's (a DeepSpeed export flattens in this order)
        assert ck.params == list(full.state_dict()), path
        groups = ck.metadata["optimizer"]["param_groups"]
        for name in ck.params:
            assert torch.equal(ck.read(name), ref["model"][name]), (path, name)
            for state in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(ck.read(name, state), ref["optim"][f"state.{name}.{state}"]), (path, name, state)
            assert ck.param_meta(name)["scalars"]["step"] == ref["optim"][f"state.{name}.step"].item()
            group = groups[ck.param_meta(name)["optimizer_group"]]
            assert group["weight_decay"] == ref["optim"][f"param_groups.{name}.weight_decay"], (path, name)

        model = build(GPTConfig(), seed=5)
        opt = optimizer(model)
        msd, osd = get_state_dict(model, opt, options=flat)
        sd = {"model": msd, "optim": osd}
        want = {"model": dict(msd), "optim": dict(osd)}
        dcp.load(want, storage_reader=FileSystemReader(tmp_path / "dcp"))
        dcp.load(sd, storage_reader=UniversalReader(tmp_path / path))
        for k, v in want["model"].items():
            assert torch.equal(sd["model"][k], v), (path, k)
        for k, v in want["optim"].items():
            got = sd["optim"][k]
            assert torch.equal(got, v) if isinstance(v, torch.Tensor) else (got == v and type(got) is type(v)), \
                (path, k)
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"], options=flat)

        nested: dict = {}
        _load_state_dict(nested, storage_reader=UniversalReader(tmp_path / path),
                         planner=_EmptyStateDictLoadPlanner(), no_dist=True)
        assert nested.keys() == ref.keys() and set(ref["optim"]) <= set(nested["optim"]), path   # + indexed form
