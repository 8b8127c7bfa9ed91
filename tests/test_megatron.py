"""Megatron-Core torch_dist source and target, with real Megatron-Core 0.16 GPTModels on CPU.

Fixture: a GPTModel (3 layers, hidden 96, 6 heads in 2 query groups, SwiGLU ffn 160, biases,
vocabulary 1003 padded to 1024) saved at TP=2 by ``dist_checkpointing.save`` under torchrun
(``tests/dist/megatron_gpt.py``). The reference answers come from Megatron itself: its own
``dist_checkpointing.load`` reshards the original checkpoint into a GPTModel at the target
TP/PP, and every local tensor of the model loaded from ucp's export must equal it. The
universal tensors are checked against Megatron's TP=1 load with the QKV de-interleaved here,
by reshaping (not through the spec).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ucp
from ucp.errors import UcpError

pytestmark = pytest.mark.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist" / "megatron_gpt.py"
HEADS, GROUPS, HEAD_DIM, FFN, LAYERS = 6, 2, 16, 160, 3


def torchrun(nproc: int, *args) -> str:
    """Run the Megatron script under torchrun (a free port per run: --standalone)."""
    return torchrun_script(SCRIPT, nproc, *args)


def torchrun_script(script: Path, nproc: int, *args) -> str:
    """Run a script of tests/dist under torchrun; its output, or a failure with its output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "DS_BUILD_OPS": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(script), *map(str, args)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def ranks(dump_dir: Path) -> list[dict]:
    return [torch.load(p, weights_only=True) for p in sorted(dump_dir.glob("rank*.pt"))]


def part_major_qkv(t: torch.Tensor, heads=HEADS, groups=GROUPS, head_dim=HEAD_DIM) -> torch.Tensor:
    """Megatron's group-interleaved fused QKV -> [q; k; v] (per group: heads/groups q heads, k, v)."""
    g = t.reshape(groups, heads // groups + 2, head_dim, *t.shape[1:])
    q = g[:, : heads // groups].reshape(heads * head_dim, *t.shape[1:])
    return torch.cat([q, g[:, -2].reshape(groups * head_dim, *t.shape[1:]),
                      g[:, -1].reshape(groups * head_dim, *t.shape[1:])])


@pytest.fixture(scope="session")
def meg_tp2(tmp_path_factory):
    path = tmp_path_factory.mktemp("meg") / "tp2"
    torchrun(2, "save", path, "--tp", 2, "--layers", LAYERS, "--bias")
    return path


@pytest.fixture(scope="session")
def meg_universal(meg_tp2, tmp_path_factory):
    dst = tmp_path_factory.mktemp("meg") / "universal"
    ucp.convert(meg_tp2, dst)                       # --from auto: torch_dist -> megatron
    return dst


@pytest.fixture(scope="session")
def tp1_reference(meg_tp2, meg_universal, tmp_path_factory):
    """Megatron's own TP=1 load of the TP=2 original; the export to TP=1 is compared with it."""
    base = tmp_path_factory.mktemp("meg")
    ucp.export(meg_universal, base / "tp1", "megatron", degrees={"tp": 1})
    torchrun(1, "compare", meg_tp2, base / "tp1", "--tp", 1, "--layers", LAYERS, "--bias", "--dump", base / "ref")
    return ranks(base / "ref")[0]


def test_universal_tensors_are_megatrons_with_qkv_part_major(meg_universal, tp1_reference):
    ck = ucp.open(meg_universal)
    assert ck.metadata["source"]["format"] == "megatron"
    assert sorted(ck.params) == sorted(tp1_reference)
    for name, ref in tp1_reference.items():
        want = part_major_qkv(ref) if ".linear_qkv.weight" in name or ".linear_qkv.bias" in name else ref
        assert torch.equal(ck.read(name), want), name
    fc1 = ck.read("decoder.layers.1.mlp.linear_fc1.weight")      # [gate; up] as Megatron holds it
    assert fc1.shape == (2 * FFN, 96)
    emb = ck.param_meta("embedding.word_embeddings.weight")
    assert ck.array_info("embedding.word_embeddings.weight").shape == (1024, 96)   # padding rows kept
    assert emb["padding"] == {"dim": 0, "size": 1024 - 1003}


def test_common_state_and_objects_are_carried_as_json(meg_universal):
    md = ucp.open(meg_universal).metadata
    assert md["iteration"] == 7
    assert md["megatron"]["args"]["num_query_groups"] == GROUPS
    assert md["megatron"]["constants"]["kv_heads"] == GROUPS
    objects = md["megatron"]["objects"]
    assert len(objects) == 4 * LAYERS
    assert "decoder.layers.mlp.linear_fc1._extra_state/shard_2_3" in objects


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 3)])
def test_reshard_loads_into_gptmodel_like_megatrons_own_reshard(meg_tp2, meg_universal, tmp_path, tp, pp):
    ucp.export(meg_universal, tmp_path / "out", "megatron", degrees={"tp": tp, "pp": pp})
    out = torchrun(tp * pp, "compare", meg_tp2, tmp_path / "out", "--tp", tp, "--pp", pp, "--layers", LAYERS,
                   "--bias")
    assert out.count("mismatched [], unexpected []") == tp * pp


def test_tp1_export_was_compared(tp1_reference):
    # the tp1_reference fixture ran "compare" on the TP=1 export; a mismatch fails the fixture
    assert len(tp1_reference) == 10 * LAYERS + 3


@pytest.mark.parametrize("degrees, message", [
    ({"tp": 4}, "query groups"),
    ({"pp": 2}, "layers"),
    ({"ep": 2}, "MoE"),
    ({"dp": 2}, "--tp, --pp"),
])
def test_degrees_the_model_cannot_take_are_refused_before_writing(meg_universal, tmp_path, degrees, message):
    with pytest.raises(UcpError, match=message):
        ucp.export(meg_universal, tmp_path / "out", "megatron", degrees=degrees)
    assert not (tmp_path / "out").exists()


def test_megatron_to_hf_loads_with_from_pretrained(meg_universal, tp1_reference, tmp_path):
    from transformers import AutoModelForCausalLM

    ucp.export(meg_universal, tmp_path / "hf", "hf")
    model, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    sd = model.state_dict()
    qkv = part_major_qkv(tp1_reference["decoder.layers.2.self_attention.linear_qkv.weight"])
    q_rows, kv_rows = HEADS * HEAD_DIM, GROUPS * HEAD_DIM
    assert torch.equal(sd["model.layers.2.self_attn.q_proj.weight"], qkv[:q_rows])
    assert torch.equal(sd["model.layers.2.self_attn.k_proj.weight"], qkv[q_rows:q_rows + kv_rows])
    assert torch.equal(sd["model.layers.2.self_attn.v_proj.weight"], qkv[q_rows + kv_rows:])
    fc1 = tp1_reference["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(sd["model.layers.0.mlp.gate_proj.weight"], fc1[:FFN])
    assert torch.equal(sd["model.layers.0.mlp.up_proj.weight"], fc1[FFN:])
    assert torch.equal(sd["model.layers.1.self_attn.o_proj.bias"],
                       tp1_reference["decoder.layers.1.self_attention.linear_proj.bias"])
    assert torch.equal(sd["lm_head.weight"], tp1_reference["output_layer.weight"][:1003])  # padding rows cut
    assert model.config.vocab_size == 1003


class NotAllowed:
    """A class a hostile common.pt could name; the weights-only loader must refuse it."""


def test_common_pt_with_other_globals_is_refused(meg_tp2, tmp_path):
    import shutil

    shutil.copytree(meg_tp2, tmp_path / "c")
    torch.save({"iteration": 1, "args": NotAllowed()}, tmp_path / "c" / "common.pt")
    with pytest.raises(UcpError, match="common.pt.*NotAllowed"):
        ucp.convert(tmp_path / "c", tmp_path / "u", source="megatron")
    assert not (tmp_path / "u" / "ucp.manifest.json").exists()


@pytest.fixture(scope="session")
def moe_ep2(tmp_path_factory):
    path = tmp_path_factory.mktemp("moe") / "ep2"
    torchrun(2, "save", path, "--ep", 2, "--experts", 4, "--layers", 2)
    return path


def test_moe_experts_ep2_to_ep1_like_megatrons_own_reshard(moe_ep2, tmp_path):
    ucp.convert(moe_ep2, tmp_path / "u")
    ck = ucp.open(tmp_path / "u")
    experts = [n for n in ck.params if ".mlp.experts.local_experts." in n]
    assert len(experts) == 2 * 4 * 2                     # layers x experts x (fc1, fc2)
    ucp.export(tmp_path / "u", tmp_path / "ep1", "megatron", degrees={"ep": 1})
    torchrun(1, "compare", moe_ep2, tmp_path / "ep1", "--ep", 1, "--experts", 4, "--layers", 2,
             "--dump", tmp_path / "ref")
    ref = ranks(tmp_path / "ref")[0]
    for e in range(4):                                   # global expert e, as Megatron's own load places it
        local = f"decoder.layers.1.mlp.experts.local_experts.{e}.linear_fc1.weight"
        assert torch.equal(ck.read(local), ref[local]), local
    with pytest.raises(UcpError, match="ep=3"):
        ucp.export(tmp_path / "u", tmp_path / "ep3", "megatron", degrees={"ep": 3})
