"""The ``deepspeed`` source on DeepSpeed pipeline-parallel checkpoints (``PipelineModule`` with
``LayerSpec`` / ``TiedLayerSpec``: ``layer_XX-model_states.pt``, ``mp_rank_XX_model_states.pt``,
``[bf16_]zero_pp_rank_{dp}_mp_rank_XX_optim_states.pt``, the layout Megatron-DeepSpeed writes),
made by real DeepSpeed 0.19.8 on CPU (gloo, 2 pipeline stages x 1 or 2 data-parallel ranks).

Reference answers come from DeepSpeed: each stage's ``safe_get_full_fp32_param`` /
``safe_get_full_optimizer_state`` and optimizer step, dumped by the producing run
(tests/dist/ds_pipe.py), and DeepSpeed's own ``ds_to_universal`` on the same checkpoint.

With tensor parallelism (``PipeModelDataParallelTopology``, pp 2 x tp 2, ZeRO-1; files
``layer_XX-model_YY-model_states.pt`` and ``mp_rank_{stage * tp + tp rank}``): Megatron-DeepSpeed
is not installed, so tests/dist/ds_pipe_tp.py builds the pipeline from hand-written Megatron-style
column-, row- and vocab-parallel layers named as Megatron-DeepSpeed's GPTModelPipe names them; the
reference is DeepSpeed's own gather of each rank's block, all-gathered over the tensor-parallel
group in the producing run.
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from _ds_env import run_ds_job, run_ds_to_universal

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="DeepSpeed is not installed")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist" / "ds_pipe.py"
TP_SCRIPT = ROOT / "tests" / "dist" / "ds_pipe_tp.py"
TAG = "global_step3"
TP_TAG = "global_step2"

#: cell -> (ranks, ZeRO stage, dtype, extra flags); 2 pipeline stages each. Stage 0 with bf16 is
#: DeepSpeed's BF16_Optimizer (Megatron-DeepSpeed's usual setting), which records no param_shapes.
CELLS = {
    "pp2-z1-fp32-frozen": (2, 1, "fp32", ["--frozen"]),
    "pp2xdp2-z1-bf16": (4, 1, "bf16", []),
    "pp2-bf16-optimizer": (2, 0, "bf16", []),
}


@pytest.fixture(scope="session")
def pipe_runs(tmp_path_factory):
    """Every cell's checkpoint, DeepSpeed's per-stage reference dumps and ucp's conversion."""
    import ucp

    base = tmp_path_factory.mktemp("ds-pipe")
    out = {}
    for cell, (nproc, stage, dtype, extra) in CELLS.items():
        ck, ref = base / cell, base / f"{cell}-ref.pt"
        run_ds_job(SCRIPT, nproc, "--out", ck, "--pp", 2, "--stage", stage, "--dtype", dtype, "--ref", ref, *extra,
                   cwd=base)
        ucp.convert(str(ck), str(base / f"{cell}-u"), source="auto")
        refs = [torch.load(f"{ref}.stage{s}", weights_only=True) for s in (0, 1)]
        out[cell] = (ck, refs, ucp.open(str(base / f"{cell}-u")))
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def equal_to_refs(ck, refs, step: int) -> set:
    """Every parameter and Adam state bit-exact against the producing run's gathers, ``step`` on
    each, frozen weights with ``frozen`` and no optimizer state; the names the gathers cover."""
    seen = set()
    for ref in refs:
        for st in ("param", "exp_avg", "exp_avg_sq"):
            for name, t in ref[st].items():
                assert same(ck.read(name, st), t), (st, name)
        for name in ref["param"]:
            assert ck.param_meta(name)["scalars"]["step"] == step
        for name, t in ref["frozen"].items():
            assert ck.param_meta(name).get("frozen") is True and ck.states(name) == ["param"]
            assert same(ck.read(name, "param"), t), name
        seen |= set(ref["param"]) | set(ref["frozen"])
    return seen


def equal_to_ds_universal(ck, out: Path, vocab=None) -> list:
    """Every parameter DeepSpeed's ``ds_to_universal`` wrote into ``out`` (the trainable ones:
    it drops frozen weights) holds ucp's fp32 master, exp_avg and exp_avg_sq bit for bit (its
    vocabulary tensors cut to ``vocab`` rows); the names it wrote."""
    written = sorted(p.name for p in (out / "zero").iterdir() if p.is_dir())
    assert written == sorted(n for n in ck.params if not ck.param_meta(n).get("frozen"))
    for name in written:
        for stem, st in (("fp32", "param"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")):
            held = torch.load(out / "zero" / name / f"{stem}.pt", weights_only=True)
            ours = ck.read(name, st)
            assert same(ours[:vocab] if held.get("vocab_tensor") else ours, held["param"]), (name, st)
    return written


@pytest.mark.parametrize("cell", list(CELLS))
def test_states_equal_each_stages_deepspeed_gather(cell, pipe_runs):
    """fp32 master, exp_avg and exp_avg_sq of every parameter of every stage equal what
    DeepSpeed gathers in the producing run, bit for bit; `step` equals the stage optimizer's;
    frozen weights equal the module's, in the model dtype, with frozen recorded."""
    _, refs, ck = pipe_runs[cell]
    assert all(ref["step"] == [3] for ref in refs)
    assert set(ck.params) == equal_to_refs(ck, refs, 3)
    assert {n for n in ck.params if ck.param_meta(n).get("frozen")} == \
        ({"1.input_layernorm.weight", "1.self_attn.k_proj.bias"} if "--frozen" in CELLS[cell][3] else set())


@pytest.mark.parametrize("cell", list(CELLS))
def test_tied_module_held_by_both_stages(cell, pipe_runs):
    """The tied embedding / output head is held by stages 0 and 1; DeepSpeed's two copies are
    identical, the universal tensor equals them and records both stages."""
    _, refs, ck = pipe_runs[cell]
    name = "tied_modules.embed.weight"
    for st in ("param", "exp_avg", "exp_avg_sq"):
        assert same(refs[0][st][name], refs[1][st][name])
        assert same(ck.read(name, st), refs[1][st][name])
    assert ck.param_meta(name)["pipeline_stages"] == [0, 1]


def test_model_order_and_metadata(pipe_runs):
    """Parameters come in layer order (tied module at its first layer, frozen ones in place);
    the pipeline degree and ZeRO stage are recorded."""
    _, _, ck = pipe_runs["pp2-z1-fp32-frozen"]
    names = list(ck.params)
    assert names[0] == "tied_modules.embed.weight" and names[-1] == "3.weight"
    assert names.index("1.input_layernorm.weight") < names.index("1.post_attention_layernorm.weight")
    assert ck.metadata["deepspeed"]["pipeline"] == {"pp_degree": 2, "tp_degree": 1}
    assert ck.metadata["iteration"] == 3
    assert ck.metadata["client_state"]["note"] == "ucp pipeline fixture"
    assert pipe_runs["pp2-bf16-optimizer"][2].metadata["deepspeed"]["zero_stage"] == 0


@pytest.mark.parametrize("cell", ["pp2-z1-fp32-frozen", "pp2xdp2-z1-bf16"])
def test_equals_ds_to_universal(cell, pipe_runs, tmp_path):
    """DeepSpeed's own ds_to_universal on the same pipeline checkpoint gives the same fp32
    master and Adam moments for every parameter it writes (it drops frozen weights); reading
    that output with `--from auto` (the deepspeed-universal source, every stage's model states)
    gives the same tensors and steps as the direct conversion."""
    import ucp
    from ucp.sources import detect

    ck_dir, _, ck = pipe_runs[cell]
    out = tmp_path / "ds-universal"
    run_ds_to_universal(ck_dir / TAG, out)
    written = equal_to_ds_universal(ck, out)
    assert detect(out) == "deepspeed-universal"
    ucp.convert(str(out), str(tmp_path / "u"))
    got = ucp.open(str(tmp_path / "u"))
    assert sorted(got.params) == written
    for name in written:
        assert got.param_meta(name)["scalars"] == ck.param_meta(name)["scalars"]
        for st in ck.states(name):
            assert same(got.read(name, st), ck.read(name, st)), (name, st)


# ------------------------------------------------------------------ bad inputs
def convert_error(src: Path, tmp_path: Path) -> str:
    import ucp
    from ucp.errors import UcpError

    with pytest.raises(UcpError) as e:
        ucp.convert(str(src), str(tmp_path / "out"), source="deepspeed")
    assert not (tmp_path / "out" / "ucp.manifest.json").exists()
    return str(e.value)


@pytest.mark.parametrize("gone", ["mp_rank_01_model_states.pt", "zero_pp_rank_1_mp_rank_01_optim_states.pt"])
def test_missing_stage_file(gone, pipe_runs, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(pipe_runs["pp2xdp2-z1-bf16"][0], ck)
    name = gone if gone.startswith("mp_") else "bf16_" + gone
    (ck / TAG / name).unlink()
    msg = convert_error(ck, tmp_path)
    assert str(ck / TAG / name) in msg and "missing" in msg, msg


def test_recorded_tp_degree_that_the_files_do_not_have_refused(pipe_runs, tmp_path):
    """A checkpoint recording tensor parallelism that its model-parallel ranks cannot hold
    (pp_degree * tp_degree != mp_world_size) is refused, naming the file and the degree."""
    ck = tmp_path / "ck"
    shutil.copytree(pipe_runs["pp2-z1-fp32-frozen"][0], ck)
    f = ck / TAG / "mp_rank_00_model_states.pt"
    sd = torch.load(f, weights_only=True)
    sd["checkpoint_parallel_dimensions"] = {"pp_degree": 2, "tp_degree": 2}
    torch.save(sd, f)
    msg = convert_error(ck, tmp_path)
    assert str(f) in msg and "tp_degree=2" in msg


def test_model_parallel_ranks_without_layer_files_refused(pipe_runs, tmp_path):
    """mp_rank_XX files without pipeline layer files are tensor-parallel shards: refused, not
    read as pipeline stages."""
    ck = tmp_path / "ck"
    shutil.copytree(pipe_runs["pp2-z1-fp32-frozen"][0], ck)
    for f in (ck / TAG).glob("layer_*-model_states.pt"):
        f.unlink()
    msg = convert_error(ck, tmp_path)
    assert str(ck / TAG) in msg and "tensor parallelism" in msg


# ------------------------------------------------------------------ pipeline x tensor parallelism
#: cell -> (ZeRO stage, dtype, extra flags): pp 2 x tp 2 on 4 ranks, 2 AdamW steps. Stage 0 with
#: bf16 is DeepSpeed's BF16_Optimizer (Megatron-DeepSpeed's usual setting), which records no
#: param_shapes: the blocks' shapes come from each tensor-parallel rank's own layer files.
#: --frozen freezes a replicated and a split weight (tests/dist/ds_pipe_tp.py FROZEN).
TP_CELLS = {"pp2tp2-z1-fp32-frozen": (1, "fp32", ["--frozen"]), "pp2tp2-bf16-optimizer": (0, "bf16", [])}


@pytest.fixture(scope="session")
def tp_runs(tmp_path_factory):
    """Every tensor-parallel cell's checkpoint, its per-stage references and ucp's conversion
    with ``--from auto`` (the default spec, converters/deepspeed_pipe_tp.ucp)."""
    import ucp

    base = tmp_path_factory.mktemp("ds-pipe-tp")
    out = {}
    for cell, (stage, dtype, extra) in TP_CELLS.items():
        ck, ref = base / cell, base / f"{cell}-ref.pt"
        run_ds_job(TP_SCRIPT, 4, "--out", ck, "--pp", 2, "--tp", 2, "--stage", stage, "--dtype", dtype, "--ref", ref,
                   *extra, cwd=base)
        ucp.convert(str(ck), str(base / f"{cell}-u"), source="auto")
        refs = [torch.load(f"{ref}.stage{s}", weights_only=True) for s in (0, 1)]
        out[cell] = (ck, refs, ucp.open(str(base / f"{cell}-u")))
    return out


@pytest.fixture
def tp_run(tp_runs):
    return tp_runs["pp2tp2-z1-fp32-frozen"]


def test_tp_files_are_deepspeeds_model_parallel_layout(tp_run):
    """What the fixture relies on: DeepSpeed names the files by layer and tensor-parallel rank,
    and by the model-parallel rank stage * tp + tp rank, one ZeRO-1 optimizer file each."""
    names = sorted(p.name for p in (tp_run[0] / TP_TAG).iterdir())  # fp32 ZeRO-1: no bf16_ prefix
    assert [n for n in names if n.startswith("layer_")] == \
        [f"layer_{i:02d}-model_{t:02d}-model_states.pt" for i in range(6) for t in range(2)]
    assert [n for n in names if n.startswith(("mp_rank", "zero_pp"))] == \
        [f"mp_rank_{m:02d}_model_states.pt" for m in range(4)] + \
        [f"zero_pp_rank_0_mp_rank_{m:02d}_optim_states.pt" for m in range(4)]


@pytest.mark.parametrize("cell", list(TP_CELLS))
def test_tp_states_equal_deepspeeds_gather_over_tp(cell, tp_runs):
    """fp32 master, exp_avg and exp_avg_sq of every parameter of every stage equal DeepSpeed's
    own gather of each tensor-parallel block, concatenated over tp in the producing run (vocab
    rows and column-parallel rows on dim 0, row-parallel columns on dim 1), bit for bit; the
    replicated ones were equal on both ranks there; `step` is the stage optimizer's. Frozen
    weights (a replicated and a split one) equal the module's, gathered the same way, with
    frozen recorded and no optimizer state."""
    _, refs, ck = tp_runs[cell]
    assert all(ref["unequal_replicas"] == [] and ref["step"] == [2] for ref in refs)
    assert set(ck.params) == equal_to_refs(ck, refs, 2)
    assert {n for n in ck.params if ck.param_meta(n).get("frozen")} == \
        ({"1.input_layernorm.weight", "2.mlp.dense_h_to_4h.bias"} if "--frozen" in TP_CELLS[cell][2] else set())
    assert refs[0]["tp_dim"]["1.self_attention.dense.weight"] == 1
    assert ck.metadata["deepspeed"]["zero_stage"] == TP_CELLS[cell][0]


def test_tp_layout_recorded(tp_run):
    """The vocabulary keeps its padded rows (1003 -> 128 * tp multiple 1024, trained by the tied
    head); the spec rule and degrees are recorded; a replicated layer norm is read from tensor-
    parallel rank 0 with rank 1's block recorded as its replica; model order is layer order."""
    _, refs, ck = tp_run
    emb = "tied_modules.embed.word_embeddings.weight"
    meta = ck.param_meta(emb)
    assert ck.array_info(emb, "param").shape == (1024, 72)
    assert meta["padding"]["kept"] is True and meta["pipeline_stages"] == [0, 1]
    assert meta["rule"].endswith("deepspeed_pipe_tp.ucp:30:1")
    assert meta["fragmentation"]["degrees"] == {"pp": 2, "tp": 2, "dp": 1}
    ranks = ck.param_meta("1.self_attention.dense.weight")["fragmentation"]["ranks"]
    assert [(r["coords"]["tp"], r["pieces"][0][:2]) for r in ranks] == \
        [(0, [[0, 0], [72, 36]]), (1, [[0, 36], [72, 72]])]
    assert ck.metadata["deepspeed"]["pipeline"] == {"pp_degree": 2, "tp_degree": 2}
    names = list(ck.params)
    assert names[0] == emb and names[-2:] == ["5.weight", "5.bias"]
    assert names == list(dict.fromkeys([*refs[0]["order"], *refs[1]["order"]]))


def test_tp_cli_with_a_spec_file_equals_the_default(tp_run, tmp_path):
    """`ucp convert --from deepspeed --spec FILE` with the layout in a spec file of one's own
    gives the tensors the default spec gives."""
    from importlib import resources

    from ucp.cli import main

    ck_dir, _, ck = tp_run
    spec = tmp_path / "mine.ucp"
    spec.write_text(resources.files("ucp.converters").joinpath("deepspeed_pipe_tp.ucp").read_text())
    assert main(["convert", str(ck_dir), str(tmp_path / "u"), "--from", "deepspeed", "--spec", str(spec)]) == 0
    import ucp

    got = ucp.open(str(tmp_path / "u"))
    assert list(got.params) == list(ck.params)
    for name in ck.params:
        assert got.param_meta(name)["rule"] == f"{spec}:{ck.param_meta(name)['rule'].rsplit(':', 2)[1]}:1"
        for st in ck.states(name):
            assert same(got.read(name, st), ck.read(name, st)), (name, st)


def test_tp_missing_layer_file_named(tp_run, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(tp_run[0], ck)
    gone = ck / TP_TAG / "layer_03-model_01-model_states.pt"
    gone.unlink()
    msg = convert_error(ck, tmp_path)
    assert str(gone) in msg and "missing" in msg and "tp_degree=2" in msg, msg


def test_tp_degree_recorded_against_the_files_named(tp_run, tmp_path):
    """Every model-parallel rank's file recording pp 4 x tp 1 (the same world) for files written
    at tp 2: the first layer file of tensor-parallel rank 1 is named."""
    ck = tmp_path / "ck"
    shutil.copytree(tp_run[0], ck)
    for f in (ck / TP_TAG).glob("mp_rank_*_model_states.pt"):
        sd = torch.load(f, weights_only=True)
        sd["checkpoint_parallel_dimensions"] = {"pp_degree": 4, "tp_degree": 1}
        torch.save(sd, f)
    msg = convert_error(ck, tmp_path)
    assert str(ck / TP_TAG / "layer_00-model_01-model_states.pt") in msg and "tp_degree=1" in msg, msg


def spec_error(tp_run, tmp_path, text: str) -> str:
    import ucp
    from ucp.errors import UcpError

    spec = tmp_path / "bad.ucp"
    spec.write_text(text)
    with pytest.raises(UcpError) as e:
        ucp.convert(str(tp_run[0]), str(tmp_path / "out"), source="deepspeed", spec=str(spec))
    assert not (tmp_path / "out" / "ucp.manifest.json").exists()
    return str(e.value)


def default_spec() -> str:
    from importlib import resources

    return resources.files("ucp.converters").joinpath("deepspeed_pipe_tp.ucp").read_text()


def test_tp_spec_whose_split_disagrees_with_the_files_named(tp_run, tmp_path):
    """A spec padding the vocabulary to 96 * tp rows (1152, blocks of 576) against files holding
    blocks of 512: the parameter, the files, the rule and the degree are named."""
    msg = spec_error(tp_run, tmp_path, default_spec().replace("vocab_multiple = 128", "vocab_multiple = 96"))
    assert "tied_modules.embed.word_embeddings.weight" in msg
    assert str(tp_run[0] / TP_TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt") in msg
    assert "[(512, 72), (512, 72)]" in msg and "bad.ucp:30:1" in msg and "tp=2" in msg and "disagrees" in msg, msg


def test_tp_spec_without_a_rule_for_a_parameter_named(tp_run, tmp_path):
    """A spec that leaves parameters unmatched: every one is listed, with the file and a hint."""
    msg = spec_error(tp_run, tmp_path, default_spec().replace('param "**" = replicate(over=tp)', ""))
    assert str(tp_run[0] / TP_TAG / "mp_rank_00_model_states.pt") in msg and "--spec" in msg
    assert "1.input_layernorm.weight" in msg and "5.bias" in msg and "tp_degree=2" in msg, msg


def test_tp_export_to_ranks_at_tp2_gives_deepspeeds_own_blocks(tp_run, tmp_path):
    """The other direction of the spec: `ucp export --to ranks --tp 2` (the spec the conversion
    recorded) gives every tensor-parallel rank exactly the block DeepSpeed saved in its
    ``layer_XX-model_YY`` file (fp32 ZeRO-1: the module weights are the fp32 master)."""
    from ucp.cli import main

    ck_dir, _, ck = tp_run
    assert main(["export", str(tp_run[2].path), str(tmp_path / "r"), "--to", "ranks", "--tp", "2"]) == 0
    for t in range(2):
        held = torch.load(tmp_path / "r" / f"rank-tp{t}.pt", weights_only=True)["param"]
        assert list(held) == list(ck.params)
        for f in sorted((ck_dir / TP_TAG).glob(f"layer_*-model_{t:02d}-model_states.pt")):
            layer = int(f.name[6:8])
            for key, saved in torch.load(f, weights_only=True).items():
                name = f"tied_modules.embed.{key}" if layer == 0 else f"{layer}.{key}"
                assert same(held[name], saved), (t, name)


def test_tp_equals_ds_to_universal(tp_run, tmp_path):
    """DeepSpeed's own ``ds_to_universal`` on the same checkpoint, merging the tensor-parallel
    slices by the ``universal_checkpoint_info`` patterns Megatron-DeepSpeed saves (row-parallel
    weights on dim 1, replicated ones from one rank, the vocabulary cut back to its 1003 rows):
    the same fp32 master, exp_avg and exp_avg_sq for every parameter it writes (frozen ones it
    drops); ucp keeps the 21 padded vocabulary rows the tied head trained."""
    ck_dir, _, ck = tp_run
    out = tmp_path / "ds-universal"
    run_ds_to_universal(ck_dir / TP_TAG, out)
    equal_to_ds_universal(ck, out, vocab=1003)
    assert torch.load(out / "zero" / "tied_modules.embed.word_embeddings.weight" / "fp32.pt",
                      weights_only=True)["vocab_tensor"] is True


def test_tp_without_checkpoint_parallel_dimensions(tp_run, tmp_path):
    """DeepSpeed before `checkpoint_parallel_dimensions` (what most Megatron-DeepSpeed runs saved
    with) records no degrees: tp comes from the tensor-parallel ranks the layer files name, and
    the conversion is the same, tensor for tensor."""
    import ucp

    ck_dir, _, ck = tp_run
    old = tmp_path / "ck"
    shutil.copytree(ck_dir, old)
    for f in (old / TP_TAG).glob("mp_rank_*_model_states.pt"):
        sd = torch.load(f, weights_only=True)
        del sd["checkpoint_parallel_dimensions"]
        torch.save(sd, f)
    ucp.convert(str(old), str(tmp_path / "u"), source="auto")
    got = ucp.open(str(tmp_path / "u"))
    assert list(got.params) == list(ck.params) and got.metadata["deepspeed"]["pipeline"] == {"pp_degree": 2,
                                                                                             "tp_degree": 2}
    for name in ck.params:
        for st in ck.states(name):
            assert same(got.read(name, st), ck.read(name, st)), (name, st)
