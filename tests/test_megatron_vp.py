"""Interleaved virtual-pipeline Megatron checkpoints, with real Megatron-Core GPTModels on CPU.

Fixture: PP=2 x VP=2, 4 layers: each stage builds two GPTModel chunks (``vp_stage`` 0 and 1;
chunk c of 4 holds layer c and lives on stage c % 2, so stage 0 holds layers 0 and 2) and
``dist_checkpointing.save`` writes ``{"model0": ..., "model1": ...}`` as Megatron-LM's
training loop does (``tests/dist/megatron_gpt.py --vp 2``). References: Megatron's own
``dist_checkpointing.load`` of the original into models at the target PP/VP.
"""
import pytest
import torch

import ucp
from ucp.errors import UcpError

from tests.test_megatron import SCRIPT, part_major_qkv, ranks, torchrun_script

pytestmark = pytest.mark.filterwarnings("ignore")

LAYERS = 4


def run(nproc, *args):
    return torchrun_script(SCRIPT, nproc, *args, "--layers", LAYERS, "--bias")


@pytest.fixture(scope="session")
def meg_vp(tmp_path_factory):
    path = tmp_path_factory.mktemp("vp") / "pp2vp2"
    run(2, "save", path, "--pp", 2, "--vp", 2)
    return path


@pytest.fixture(scope="session")
def vp_universal(meg_vp, tmp_path_factory):
    dst = tmp_path_factory.mktemp("vp") / "u"
    ucp.convert(meg_vp, dst)
    return dst


def chunk_files(path) -> dict:
    """``{(key, offsets): rank}``: which rank wrote each stored chunk (files ``__<rank>_<n>.distcp``;
    Megatron writes several per rank)."""
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(path)).read_metadata()
    return {(i.fqn, tuple(i.offset)): int(d.relative_path.split("_")[2])
            for i, d in md.storage_data.items() if i.offset is not None}


def test_universal_tensors_equal_megatrons_load_of_the_chunks(meg_vp, vp_universal, tmp_path):
    """Megatron loads the PP=2 x VP=2 checkpoint into one PP=1 model; ucp's universal tensors
    equal it (QKV part-major), for the layers of both chunks of both stages."""
    run(1, "dump", meg_vp, tmp_path / "ref", "--pp", 1)
    ref = ranks(tmp_path / "ref")[0]
    ck = ucp.open(vp_universal)
    assert sorted(ck.params) == sorted(ref)
    for name, want in ref.items():
        want = part_major_qkv(want) if name.endswith((".linear_qkv.weight", ".linear_qkv.bias")) else want
        assert torch.equal(ck.read(name), want), name
    assert len({n.split(".")[2] for n in ck.params if n.startswith("decoder.layers.")}) == LAYERS


def test_chunks_as_megatron_saves_them(meg_vp, tmp_path):
    """The dump through Megatron's own VP load names chunk tensors model0./model1.: layer 0 of
    chunk 1 on stage 0 is global layer 2, the one the universal checkpoint names so."""
    run(2, "dump", meg_vp, tmp_path / "ref", "--pp", 2, "--vp", 2)
    stage0 = ranks(tmp_path / "ref")[0]
    assert "model1.decoder.layers.0.mlp.linear_fc2.weight" in stage0
    assert "model0.embedding.word_embeddings.weight" in stage0
    assert not any(k.startswith("model1.embedding") for k in stage0)


@pytest.mark.parametrize("pp, vp", [(2, 2), (1, 1), (4, 1)])
def test_export_loads_like_megatrons_own_reshard(meg_vp, vp_universal, tmp_path, pp, vp):
    degrees = {"pp": pp, **({"vp": vp} if vp > 1 else {})}
    ucp.export(vp_universal, tmp_path / "out", "megatron", degrees=degrees)
    out = run(pp, "compare", meg_vp, tmp_path / "out", "--pp", pp, *(["--vp", vp] if vp > 1 else []))
    assert out.count("mismatched [], unexpected []") == pp


def test_export_at_vp_places_chunks_on_the_stages_megatron_does(meg_vp, vp_universal, tmp_path):
    """DCP loads a chunk from whichever file holds it, so a load alone cannot see placement:
    every chunk must sit in the file of the rank that Megatron's own save wrote it from."""
    ucp.export(vp_universal, tmp_path / "out", "megatron", degrees={"pp": 2, "vp": 2})
    ours, theirs = chunk_files(tmp_path / "out"), chunk_files(meg_vp)
    assert ours == theirs
    assert theirs[("decoder.layers.mlp.linear_fc2.weight", (2, 0, 0))] == 0     # chunk 2: stage 0
    assert theirs[("decoder.layers.mlp.linear_fc2.weight", (1, 0, 0))] == 1


def test_vp_the_layers_do_not_split_into_is_refused(vp_universal, tmp_path):
    with pytest.raises(UcpError, match=r"pp=2 x vp=3 does not divide the 4 layers"):
        ucp.export(vp_universal, tmp_path / "out", "megatron", degrees={"pp": 2, "vp": 3})
    assert not (tmp_path / "out").exists()
