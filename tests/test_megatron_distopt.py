"""Megatron-Core's distributed optimizer, with a real DistributedOptimizer on CPU.

Fixture: ``tests/dist/megatron_distopt.py`` builds a GPTModel (3 layers, hidden 96, 6 heads in
2 query groups, SwiGLU, biases, vocabulary 1003 padded to 1024), wraps it in Megatron's
``DistributedDataParallel`` with ``use_distributed_optimizer=True``, trains one Adam step
with Megatron's ``DistributedOptimizer`` on TP=2 x DP=2 (4 gloo ranks, the CUDA-only calls
stubbed as that script says) and saves model + ``optimizer.sharded_state_dict`` through
``dist_checkpointing.save`` as Megatron-LM does.

Reference: Megatron's own ``dist_checkpointing.load`` of that checkpoint into a
DistributedOptimizer built at TP=1 x DP=2 (Megatron reshards fully_reshardable state
itself), read back from the optimizer with Megatron's ``get_parameter_state_dp_zero``. The
same step saved as ``dp_reshardable`` (flat buckets) is checked against it after Megatron's
own loads of both formats are shown to agree.
"""
import argparse
import pickle
import shutil

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

import ucp
from ucp.errors import UcpError

from tests.test_megatron import ROOT, part_major_qkv, torchrun, torchrun_script

pytestmark = pytest.mark.filterwarnings("ignore")

SCRIPT = ROOT / "tests" / "dist" / "megatron_distopt.py"
LAYERS = 3
STATES = ("param", "exp_avg", "exp_avg_sq")


def run(nproc, *args):
    return torchrun_script(SCRIPT, nproc, *args, "--layers", LAYERS, "--bias")


@pytest.fixture(scope="session")
def distopt_tp2(tmp_path_factory):
    path = tmp_path_factory.mktemp("distopt") / "fr"
    run(4, "save", path, "--tp", 2, "--sharding", "fully_reshardable")
    return path


@pytest.fixture(scope="session")
def distopt_reference(distopt_tp2, tmp_path_factory):
    """What Megatron's DistributedOptimizer holds after loading the TP=2 checkpoint at TP=1."""
    out = tmp_path_factory.mktemp("distopt") / "ref"
    run(2, "dump", distopt_tp2, out, "--tp", 1, "--sharding", "fully_reshardable")
    ref = [torch.load(p, weights_only=True) for p in sorted(out.glob("rank*.pt"))]
    assert len(ref) == 2
    return ref[0]


@pytest.fixture(scope="session")
def distopt_universal(distopt_tp2, tmp_path_factory):
    dst = tmp_path_factory.mktemp("distopt") / "u"
    ucp.convert(distopt_tp2, dst)
    return dst


def as_universal(name, t):
    return part_major_qkv(t) if ".linear_qkv.weight" in name or ".linear_qkv.bias" in name else t


def test_adam_states_equal_megatrons_own_load(distopt_universal, distopt_reference):
    ck = ucp.open(distopt_universal)
    assert sorted(ck.params) == sorted(distopt_reference["param"])
    for state in STATES:
        for name, want in distopt_reference[state].items():
            assert torch.equal(ck.read(name, state=state), as_universal(name, want)), (state, name)
    moved = distopt_reference["exp_avg"]["decoder.layers.2.mlp.linear_fc1.weight"]
    assert moved.abs().sum() > 0                   # a real step ran: the moments are not zeros


def test_step_and_param_groups_are_carried(distopt_universal, distopt_reference):
    ck = ucp.open(distopt_universal)
    assert distopt_reference["step"] == 1
    for name in ck.params:
        assert ck.param_meta(name)["scalars"] == {"step": distopt_reference["step"]}, name
    groups = ck.metadata["optimizer"]["param_groups"]
    assert [g["wd_mult"] for g in groups] == [g["wd_mult"] for g in distopt_reference["param_groups"]]
    assert ck.metadata["optimizer"]["sharding_type"] == "fully_reshardable"


@pytest.fixture(scope="session")
def dp_reshardable_tp2(tmp_path_factory):
    """The same run (same seeds, same TP=2 x DP=2 step) saved in the dp_reshardable format:
    flat buckets per model-parallel rank, in Megatron's buffer layout."""
    path = tmp_path_factory.mktemp("distopt") / "dpr"
    run(4, "save", path, "--tp", 2, "--sharding", "dp_reshardable")
    return path


def test_dp_reshardable_holds_the_same_state_by_megatrons_own_load(distopt_tp2, dp_reshardable_tp2, tmp_path):
    """Megatron loads both checkpoints at TP=2 x DP=1 (dp_reshardable reshards over DP only):
    its optimizer then holds the same states, so the TP=1 reference above is this run's too."""
    for name, path, sharding in (("fr", distopt_tp2, "fully_reshardable"),
                                 ("dpr", dp_reshardable_tp2, "dp_reshardable")):
        run(2, "dump", path, tmp_path / name, "--tp", 2, "--sharding", sharding)
    for f in sorted((tmp_path / "fr").glob("rank*.pt")):
        a, b = torch.load(f, weights_only=True), torch.load(tmp_path / "dpr" / f.name, weights_only=True)
        for state in STATES:
            assert a[state].keys() == b[state].keys()
            assert all(torch.equal(a[state][k], b[state][k]) for k in a[state]), (f.name, state)


def test_dp_reshardable_buckets_read_like_megatrons_own_load(dp_reshardable_tp2, distopt_reference, tmp_path):
    """The buckets are cut into parameters by the spec's flat layout (reverse order, 64-element
    alignment, padded to lcm(dp, 128)) bound at TP=2 x DP=2: every state bit-exact."""
    ucp.convert(dp_reshardable_tp2, tmp_path / "u")
    ck = ucp.open(tmp_path / "u")
    assert sorted(ck.params) == sorted(distopt_reference["param"])
    for state in STATES:
        for name, want in distopt_reference[state].items():
            assert torch.equal(ck.read(name, state=state), as_universal(name, want)), (state, name)
    assert ck.param_meta("output_layer.weight")["scalars"] == {"step": 1}
    assert ck.metadata["optimizer"]["sharding_type"] == "dp_reshardable"
    assert len(ck.metadata["optimizer"]["param_groups"]) == 2


def test_dp_reshardable_without_the_dp_size_is_refused(dp_reshardable_tp2, tmp_path):
    shutil.copytree(dp_reshardable_tp2, tmp_path / "c")
    with torch.serialization.safe_globals([argparse.Namespace]):
        common = torch.load(tmp_path / "c" / "common.pt", weights_only=True)
    del common["args"].data_parallel_size
    torch.save(common, tmp_path / "c" / "common.pt")
    with pytest.raises(UcpError, match="data-parallel size.*args.data_parallel_size"):
        ucp.convert(tmp_path / "c", tmp_path / "u")
    assert not (tmp_path / "u" / "ucp.manifest.json").exists()


def test_optimizer_state_without_its_model_tensor_is_refused(distopt_tp2, tmp_path):
    """A checkpoint whose metadata names optimizer state for a parameter it does not hold."""
    shutil.copytree(distopt_tp2, tmp_path / "c")
    md = FileSystemReader(str(tmp_path / "c")).read_metadata()
    key = "optimizer.state.exp_avg.decoder.final_layernorm.weight"
    md.state_dict_metadata["optimizer.state.exp_avg.decoder.missing.weight"] = md.state_dict_metadata.pop(key)
    with open(tmp_path / "c" / ".metadata", "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(UcpError, match="decoder.missing.weight.*no model tensor"):
        ucp.convert(tmp_path / "c", tmp_path / "u")


def test_export_to_tp1_resumes_with_megatrons_own_optimizer_state(distopt_universal, distopt_reference, tmp_path):
    """universal -> Megatron at TP=1 (fully_reshardable optimizer state written): Megatron's
    DistributedOptimizer loading it holds exactly what it holds when it reshards the TP=2
    original itself — main params, both moments, step and the param groups."""
    ucp.export(distopt_universal, tmp_path / "tp1", "megatron", degrees={"tp": 1})
    run(2, "dump", tmp_path / "tp1", tmp_path / "dump", "--tp", 1, "--sharding", "fully_reshardable")
    got = torch.load(sorted((tmp_path / "dump").glob("rank*.pt"))[0], weights_only=True)
    for state in STATES:
        assert got[state].keys() == distopt_reference[state].keys()
        for name, want in distopt_reference[state].items():
            assert torch.equal(got[state][name], want), (state, name)
    assert got["step"] == distopt_reference["step"]
    assert got["param_groups"] == distopt_reference["param_groups"]


def test_export_of_weights_only_writes_no_optimizer_state(tmp_path):
    """A universal checkpoint without a Megatron optimizer (here: a weights-only Megatron save
    converted) is exported as model weights only, with no optimizer common state."""
    torchrun(1, "save", tmp_path / "m", "--layers", 2)
    ucp.convert(tmp_path / "m", tmp_path / "u")
    ucp.export(tmp_path / "u", tmp_path / "out", "megatron", degrees={"tp": 1})
    keys = FileSystemReader(str(tmp_path / "out")).read_metadata().state_dict_metadata
    assert keys and not any(k.startswith("optimizer.") for k in keys)
    with torch.serialization.safe_globals([argparse.Namespace]):
        common = torch.load(tmp_path / "out" / "common.pt", weights_only=True)
    assert "optimizer" not in common
