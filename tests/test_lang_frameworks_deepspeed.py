"""The bundled DeepSpeed specs against DeepSpeed's own buffers (issue 15, items 1, 2, 6, 7).

Real DeepSpeed ZeRO runs on CPU (``tests/dist/lang_ds_buffers.py``: torchrun, gloo, a tiny
Llama with vocabulary 1003, two AdamW steps) dump the flat buffers they hold; the planner's
fragments of the universal tensors (``safe_get_full_fp32_param`` / ``_optimizer_state``)
must rebuild them bit-exactly:

* ZeRO-2, 3 ranks, two param groups chosen by shape, tied lm_head, two frozen parameters:
  ``single_partition_of_fp32_groups`` as ``state_dict()`` saves it (padding stripped), the
  Adam moments, group member order, the bf16 model weights (``state model``), the frozen
  parameters' ``frozen_param_fragments``.
* ZeRO-3, 2 ranks, the same model, ``sub_group_size`` 6000: ``fp32_partitioned_groups_flat``
  per sub-group (concatenated per-parameter partitions), each parameter's ``ds_tensor``.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _ds_env import run_ds_job

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from ucp.lang import load  # noqa: E402

SCRIPT = Path(__file__).parent / "dist" / "lang_ds_buffers.py"
FROZEN = ["model.layers.0.post_attention_layernorm.weight", "model.layers.1.mlp.down_proj.weight"]


def _run(out: Path, nproc: int, stage: int, sub_group: int):
    run_ds_job(SCRIPT, nproc, out, stage, 2, 1, 1, sub_group, timeout=900)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(nproc)]
    return ranks, torch.load(out / "full.pt", weights_only=True)


@pytest.fixture(scope="session")
def zero2(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("ds_zero2"), 3, 2, 0)


@pytest.fixture(scope="session")
def zero3(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("ds_zero3"), 2, 3, 6000)


def _shapes(dump) -> dict:
    """Universal names in model order, the tied lm_head included (DeepSpeed lists it once)."""
    shapes = {n: tuple(dump["shapes"][n]) for n in dump["order"]}
    shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
    return shapes


def _buffers(frags, full, state, dtype=torch.float32) -> dict[str, tuple[list, torch.Tensor]]:
    """{local name: (member names, local tensor)} built from universal tensors."""
    out: dict = {}
    for f in frags:
        if state not in full[f.name]:
            continue                                              # frozen: no optimizer state
        names, buf = out.setdefault(f.local_name, ([], torch.zeros(f.local_shape, dtype=dtype)))
        names.append(f.name)
        src = full[f.name][state].to(dtype)
        for p in f.pieces:
            buf[p.dst.slices()] = src[p.src.slices()].reshape(buf[p.dst.slices()].shape)
    return out


def test_zero2_groups_states_frozen_tied(zero2):
    ranks, full = zero2
    shapes = _shapes(ranks[0])
    bound = load("deepspeed_zero12").bind({"dp": len(ranks)}, {"groups": 2, "tie_word_embeddings": 1})
    for r, dump in enumerate(ranks):
        for state in ("param", "exp_avg", "exp_avg_sq"):
            frags = bound.fragments(shapes, {"dp": r}, state=state, frozen=FROZEN)
            got = {k: v for k, v in _buffers(frags, full, state).items() if k not in FROZEN}
            assert sorted(got) == [str(i) for i in range(len(dump["groups"]))]
            for i, grp in enumerate(dump["groups"]):
                names, buf = got[str(i)]
                assert names == [n for n in dump["order"] if n in grp["names"]]
                assert [n for n in grp["names"]] == names          # DeepSpeed's order is model order
                assert buf.numel() == grp["param"].numel()        # as saved: padding stripped
                assert torch.equal(buf, grp[state][:buf.numel()]), (r, i, state)
        model = _buffers(bound.fragments(shapes, {"dp": r}, state="model", frozen=FROZEN), full,
                         "param", torch.bfloat16)
        assert set(model) == set(dump["model"])                  # lm_head.weight too: a tied copy
        for n, (_, t) in model.items():
            assert torch.equal(t.float(), dump["model"][n]), n
        frozen = {f.local_name: f for f in bound.fragments(shapes, {"dp": r}, frozen=FROZEN)
                  if f.name in FROZEN}
        for n in FROZEN:
            assert frozen[n].group is None and frozen[n].local_shape == tuple(dump["frozen"][n].shape)
            assert torch.equal(full[n]["param"], dump["frozen"][n])


def test_zero2_tied_counted_once(zero2):
    ranks, _ = zero2
    bound = load("deepspeed_zero12").bind({"dp": 3}, {"groups": 2, "tie_word_embeddings": 1})
    frags = bound.fragments(_shapes(ranks[0]), {"dp": 0}, frozen=FROZEN)
    assert "lm_head.weight" not in {f.name for f in frags}
    assert {f.tied_from for f in bound.fragments(_shapes(ranks[0]), {"dp": 0}, state="model")} \
        >= {"lm_head.weight"}


def test_zero3_concatenated_partitions_in_sub_groups(zero3):
    ranks, full = zero3
    shapes = _shapes(ranks[0])
    bound = load("deepspeed_zero3").bind({"dp": len(ranks)},
                                         {"groups": 2, "sub_group_size": 6000, "tie_word_embeddings": 1})
    for r, dump in enumerate(ranks):
        for state in ("param", "exp_avg", "exp_avg_sq"):
            frags = bound.fragments(shapes, {"dp": r}, state=state, frozen=FROZEN)
            got = _buffers(frags, full, state)
            keys = sorted((k for k in got if k not in FROZEN), key=lambda k: tuple(map(int, k.split("."))))
            assert len(keys) == len(dump["groups"])              # one local tensor per sub-group
            for key, grp in zip(keys, dump["groups"]):
                names, buf = got[key]
                assert names == grp["names"]
                assert torch.equal(buf, grp[state]), (r, key, state)
        model = _buffers(bound.fragments(shapes, {"dp": r}, state="model", frozen=FROZEN), full,
                         "param", torch.bfloat16)
        for n, t in dump["model"].items():
            assert torch.equal(model[n][1].float(), t), n          # ds_tensor of every parameter
        for n in FROZEN:
            assert torch.equal(model[n][1].float(), dump["frozen"][n])


@pytest.mark.parametrize("count,dp", [(1, 2), (7, 3), (12, 4), (5, 8)])
def test_round_robin_order_is_deepspeeds(count, dp):
    """flat(order=round_robin) orders a group's members as DeepSpeed's
    ``round_robin_gradients`` does (``DeepSpeedZeroOptimizer._round_robin_reorder``)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from ucp.plan import Flat
    from ucp.plan.flat import member_order

    reordered, _ = DeepSpeedZeroOptimizer._round_robin_reorder(None, list(range(count)), dp)
    assert member_order(count, Flat("dp", "0", order="round_robin"), dp) == reordered


@pytest.mark.parametrize("seed", range(6))
def test_zero3_sub_groups_are_deepspeeds(seed):
    """flat(partition=each, bucket=N) cuts sub-groups where DeepSpeed's
    ``DeepSpeedZeroOptimizer_Stage3._create_fp16_sub_groups`` does."""
    import random
    from types import SimpleNamespace

    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    from ucp.plan import Flat
    from ucp.plan.flat import each_slots

    rnd = random.Random(seed)
    dp = rnd.choice([2, 3, 5])
    numels = [rnd.randint(1, 400) for _ in range(rnd.randint(1, 12))]
    sub = rnd.choice([50, 150, 333, 10 ** 6])
    params = [SimpleNamespace(n=-(-n // dp), partition_numel=lambda p=None, n=-(-n // dp): n)
              for n in numels]
    groups = DeepSpeedZeroOptimizer_Stage3._create_fp16_sub_groups(SimpleNamespace(sub_group_size=sub), params)
    want = [i for i, g in enumerate(groups) for _ in g]
    slots = each_slots(numels, Flat("dp", "0", partition="each", bucket=sub), dp, 0)
    got = [int(s.local_name.split(".")[1]) for s in slots]
    assert got == want and all(s.length == sum(p.n for p in groups[b]) for s, b in zip(slots, want))
