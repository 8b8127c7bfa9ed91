"""Resume after a hardware change, with DeepSpeed itself loading what ``ucp export --to deepspeed``
wrote: train on 4 ranks at ZeRO-2, save, convert, export for 2 ranks at ZeRO-3 and for 3 ranks
at ZeRO-1, ``engine.load_checkpoint(load_optimizer_states=True)``; DeepSpeed's own gathers of
the fp32 params and Adam states and the optimizer step are bit-exact, and the next losses equal
those of the run that kept going on 4 ranks (same global batch) within fp32 round-off.
"""
from __future__ import annotations

import json

import pytest
import torch

from test_deepspeed import CELLS, pytestmark, run_ds, same  # noqa: F401  (skip without DeepSpeed)

MORE = 2  # steps after the resume
SUB_GROUP = 1000  # ZeRO-3 sub_group_size of the loading runs (tests/dist/ds_train.py)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """4 ranks, ZeRO-2, fp32, tied + frozen + two groups: checkpoint after 3 steps, DeepSpeed's
    gather at the save, and the losses of 2 further steps without interruption."""
    base = tmp_path_factory.mktemp("resume")
    run_ds(4, "--out", base / "z2x4", "--stage", 2, "--dtype", "fp32", "--tied", "--frozen",
           "--ref", base / "ref.pt", "--more", MORE, "--losses", base / "losses.json", cwd=base)
    import ucp

    ucp.convert(str(base / "z2x4"), str(base / "universal"), source="deepspeed")
    return base


def resume(base, target: str, dp: int, stage: int, name: str, universal: bool = False):
    """Export for ``dp`` ranks at ``stage``, load with DeepSpeed, dump its gather, train on."""
    import ucp

    out = base / name
    options = {"sub_group_size": SUB_GROUP} if stage == 3 else {}
    ucp.export(str(base / "universal"), str(out), target, degrees={"dp": dp}, zero_stage=stage, **options)
    flags = ["--universal"] if universal else []
    run_ds(dp, "--load", out, "--stage", stage, "--dtype", "fp32", "--tied", "--frozen", *flags,
           "--ref", base / f"{name}-ref.pt", "--more", MORE, "--losses", base / f"{name}-losses.json", cwd=base)
    return (torch.load(base / f"{name}-ref.pt", weights_only=True),
            json.loads((base / f"{name}-losses.json").read_text()))


def check_resumed(base, got, losses):
    want = torch.load(base / "ref.pt", weights_only=True)
    for st in ("param", "exp_avg", "exp_avg_sq"):
        assert set(got[st]) == set(want[st])
        for name, t in want[st].items():
            assert same(got[st][name], t), (st, name)
    assert got["step"] == want["step"]
    expected = json.loads((base / "losses.json").read_text())[-MORE:]
    assert len(losses) == MORE
    assert losses == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("dp,stage", [(2, 3), (3, 1)])
def test_resume_on_other_degree_and_stage(trained, dp, stage):
    got, losses = resume(trained, "deepspeed", dp, stage, f"ds-dp{dp}-z{stage}")
    check_resumed(trained, got, losses)


@pytest.mark.parametrize("dp,stage", [(3, 1), (2, 3)])
def test_resume_through_deepspeed_universal(trained, dp, stage):
    """The same through ``--to deepspeed-universal``, loaded with ``checkpoint.load_universal``.
    DeepSpeed's ZeRO-3 universal loader gives every param group group 0's hyper-parameters
    (stage3.py ``load_hp_checkpoint_state_from_checkpoint_dir_stage3``), so there the run after
    the first resumed step follows other weight decay on group 1: only the first loss (taken
    before any update) is compared."""
    got, losses = resume(trained, "deepspeed-universal", dp, stage, f"dsu-dp{dp}-z{stage}", universal=True)
    if stage < 3:
        check_resumed(trained, got, losses)
        return
    want = torch.load(trained / "ref.pt", weights_only=True)
    for st in ("param", "exp_avg", "exp_avg_sq"):
        for name, t in want[st].items():
            assert same(got[st][name], t), (st, name)
    assert got["step"] == want["step"]
    expected = json.loads((trained / "losses.json").read_text())[-MORE:]
    assert losses[0] == pytest.approx(expected[0], rel=1e-5, abs=1e-6)


def test_resume_clips_as_the_run_did_when_its_config_left_clipping_out(tmp_path):
    """A run whose config leaves ``gradient_clipping`` out clips at DeepSpeed's default; ZeRO-1/2
    optimizer files carry the clipping and DeepSpeed's load takes it from them over the config,
    so an export that wrote 0.0 turned clipping off in the resumed run (losses parted from the
    second step on, once the gradient norm passed 1). The loading run's optimizer clips as the
    saving run's did."""
    import ucp

    run_ds(2, "--out", tmp_path / "z2", "--stage", 2, "--dtype", "fp32", "--steps", 1, "--clipping", "default",
           "--ref", tmp_path / "ref.pt", cwd=tmp_path)
    ucp.convert(str(tmp_path / "z2"), str(tmp_path / "universal"), source="deepspeed")
    ucp.export(str(tmp_path / "universal"), str(tmp_path / "z1"), "deepspeed", degrees={"dp": 2}, zero_stage=1)
    run_ds(2, "--load", tmp_path / "z1", "--stage", 1, "--dtype", "fp32", "--clipping", "default",
           "--ref", tmp_path / "got.pt", cwd=tmp_path)
    want = torch.load(tmp_path / "ref.pt", weights_only=True)["clip_grad"]
    assert want > 0
    assert torch.load(tmp_path / "got.pt", weights_only=True)["clip_grad"] == want
