"""What ucp makes of a DCP state dict beyond its tensors: which parameters are trained and which
frozen, optimizer state that has no model entry, and what ``overwrite=True`` may replace. Real
``dcp.save`` / ``get_state_dict`` make every state dict; the same rules hold for UniversalWriter
(a live save) and the DCP source (``ucp convert`` of stock DCP files)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict

import ucp
from ucp.dcp import UniversalReader, UniversalWriter
from ucp.errors import UcpError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def stepped(opt_factory, frozen_bias=False, untouched=False):
    """A small model after one optimizer step, as ``get_state_dict`` lays it out. ``frozen_bias``:
    the first layer's bias has requires_grad=False and is in no param group. ``untouched``: the
    last layer takes no part in the loss, so Adam keeps no state for it although it is trained."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2), nn.Linear(2, 2))
    if frozen_bias:
        model[0].bias.requires_grad_(False)
    opt = opt_factory([p for p in model.parameters() if p.requires_grad])
    model[1](model[0](torch.randn(5, 4))).sum().backward()
    if not untouched:
        model[2].weight.grad = torch.ones_like(model[2].weight)
        model[2].bias.grad = torch.ones_like(model[2].bias)
    opt.step()
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def flags(path):
    ck = ucp.open(path)
    return {n: bool(ck.param_meta(n).get("frozen")) for n in ck.params}


def template_free(reader) -> dict:
    """What a load without a template (``dcp_to_torch_save``'s planner) rebuilds from ``reader``."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    out: dict = {}
    _load_state_dict(out, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return out


def two_groups():
    """A model with two param groups (different lr and weight decay) after one AdamW step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    opt = torch.optim.AdamW([{"params": [model[0].weight, model[1].weight], "weight_decay": 0.1},
                             {"params": [model[0].bias, model[1].bias], "weight_decay": 0.0, "lr": 0.5}], lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return model, opt


CASES = {
    # SGD without momentum keeps no per-parameter state at all: every parameter is still trained
    "sgd": (lambda p: torch.optim.SGD(p, lr=0.1), {}, set()),
    # a parameter outside every param group is frozen, whatever the optimizer keeps
    "sgd-frozen": (lambda p: torch.optim.SGD(p, lr=0.1), {"frozen_bias": True}, {"0.bias"}),
    # Adam keeps no state for a parameter that never had a gradient; it is trained all the same
    "adam-untouched": (lambda p: torch.optim.Adam(p, lr=0.1), {"untouched": True}, set()),
    "adam-frozen": (lambda p: torch.optim.Adam(p, lr=0.1), {"frozen_bias": True}, {"0.bias"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_frozen_means_in_no_param_group_for_writer_and_source(tmp_path, case):
    """``frozen`` is what the param groups say (``optim.param_groups.<i>.params`` lists every FQN the
    optimizer steps), not whether the optimizer happens to keep state: a DeepSpeed export of a
    parameter wrongly marked frozen would never train it again."""
    make, kw, want = CASES[case]
    sd = stepped(make, **kw)
    dcp.save(sd, storage_writer=UniversalWriter(tmp_path / "live"))
    dcp.save(sd, checkpoint_id=tmp_path / "dcp")
    ucp.convert(tmp_path / "dcp", tmp_path / "conv", source="dcp")
    expect = {n: n in want for n in sd["model"]}
    assert flags(tmp_path / "live") == expect
    assert flags(tmp_path / "conv") == expect


@pytest.mark.parametrize("part", ["optim-only", "state-of-a-stranger"])
def test_optimizer_state_without_its_model_entry_is_refused_before_anything_is_written(tmp_path, part):
    """A universal parameter is made from its ``model.`` entry: optimizer state alone could be stored
    but never loaded (UniversalReader and ``export`` need the parameter's array). UniversalWriter
    refuses it at planning time, before it clears or writes anything, as ``ucp convert`` refuses the
    same DCP files."""
    sd = stepped(lambda p: torch.optim.Adam(p, lr=0.1))
    if part == "optim-only":
        sd = {"optim": sd["optim"]}
        missing = "0.bias, 0.weight, 1.bias, 1.weight, 2.bias"
    else:
        del sd["model"]["1.weight"]
        missing = "1.weight"
    dst = tmp_path / "u"
    dst.mkdir()
    (dst / "notes.txt").write_text("a user's file: must survive")
    with pytest.raises(BaseException, match=f"optimizer state for {missing}.*, which the model section"):
        dcp.save(sd, storage_writer=UniversalWriter(dst, overwrite=True))
    assert [p.name for p in dst.iterdir()] == ["notes.txt"]
    dcp.save(sd, checkpoint_id=tmp_path / "dcp")
    with pytest.raises(UcpError, match=f"optimizer state for {missing}.*, which the model section"):
        ucp.convert(tmp_path / "dcp", tmp_path / "conv", source="dcp")


@pytest.mark.parametrize("mistake", ["optimizer.state_dict()", "compiled model.state_dict()"])
def test_the_two_usual_mismatches_of_model_and_optimizer_keys_are_named(tmp_path, mistake):
    """The two usual ways the sections' names disagree, each said with its fix: the optimizer's own
    ``state_dict()`` (states numbered, not named) and a ``torch.compile``'d module's
    ``state_dict()`` (its keys hold ``_orig_mod.``; the optimizer's name the parameters without)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    if mistake == "optimizer.state_dict()":
        sd, want = {"model": msd, "optim": opt.state_dict()}, \
            r"optimizer state for 0, 1, 2, 3.*numbers.*get_optimizer_state_dict\(model, optimizer\)"
    else:
        compiled = torch.compile(model, backend="eager")
        sd, want = {"model": compiled.state_dict(), "optim": osd}, \
            r"optimizer state for 0\.bias.*'_orig_mod\.'.*get_model_state_dict\(model\)"
    with pytest.raises(BaseException, match=want):
        dcp.save(sd, storage_writer=UniversalWriter(tmp_path / "u"))
    dcp.save(sd, checkpoint_id=tmp_path / "dcp")
    with pytest.raises(UcpError, match=want):
        ucp.convert(tmp_path / "dcp", tmp_path / "conv", source="dcp")


def test_overwrite_replaces_a_ucp_checkpoint_and_refuses_other_directories(tmp_path):
    """DCP's FileSystemWriter(overwrite=True) only replaces the files it writes, and users carry the
    flag over: UniversalWriter(overwrite=True) must not wipe a project directory or stock DCP files.
    It replaces a ucp checkpoint, or what an interrupted ucp save left behind."""
    sd = {"model": {"w": torch.arange(6.0)}}
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "train.py").write_text("print('hi')")
    (project / "src" / "notes.txt").write_text("notes")
    stock = tmp_path / "stock"
    dcp.save(sd, checkpoint_id=stock)
    before = {d: sorted(p.relative_to(d).as_posix() for p in d.rglob("*")) for d in (project, stock)}
    for d in (project, stock):
        with pytest.raises(BaseException, match=rf"{d}.* not a ucp checkpoint.*overwrite=True replaces only"):
            dcp.save(sd, storage_writer=UniversalWriter(d, overwrite=True))
        assert sorted(p.relative_to(d).as_posix() for p in d.rglob("*")) == before[d]

    ours = tmp_path / "ours"
    dcp.save(sd, storage_writer=UniversalWriter(ours))
    (ours / "train.log").write_text("a user's file beside a checkpoint")
    with pytest.raises(BaseException, match=r"train\.log"):
        dcp.save(sd, storage_writer=UniversalWriter(ours, overwrite=True))
    (ours / "train.log").unlink()
    sd["model"]["w"] = torch.arange(6.0) * 3
    dcp.save(sd, storage_writer=UniversalWriter(ours, overwrite=True))
    back = {"model": {"w": torch.zeros(6)}}
    dcp.load(back, storage_reader=UniversalReader(ours))
    assert torch.equal(back["model"]["w"], torch.arange(6.0) * 3)


def test_entries_outside_model_and_optim_keep_their_nested_shape_without_a_template(tmp_path):
    """DCP flattens ``{"sched": {"base_lrs": [t0, t1]}}`` to ``sched.base_lrs.0`` / ``.1`` and keeps
    the nested path of each key (``planner_data``: list indexes as ints, a dict key with a dot as
    one step). A load without a template (``dcp_to_torch_save``'s ``_EmptyStateDictLoadPlanner``)
    rebuilds the state dict from those paths: through ucp it must come back as DCP's own files give
    it (lists stay lists), whether UniversalWriter saved it, ``ucp convert`` converted it, or
    ``ucp export --to dcp`` wrote it back."""
    from torch.distributed.checkpoint import FileSystemReader

    sd = {"model": {"w": torch.arange(6.0)},
          "sched": {"base_lrs": [torch.tensor(0.1), torch.tensor(0.2)], "a.b": torch.tensor(3.0),
                    "last_epoch": 4, "milestones": [{"at": torch.tensor(7)}]}}
    dcp.save(sd, checkpoint_id=tmp_path / "dcp")
    dcp.save(sd, storage_writer=UniversalWriter(tmp_path / "live"))
    ucp.convert(tmp_path / "dcp", tmp_path / "conv", source="dcp")
    ucp.export(tmp_path / "live", tmp_path / "back", "dcp")

    want = template_free(FileSystemReader(tmp_path / "dcp"))
    assert isinstance(want["sched"]["base_lrs"], list) and "a.b" in want["sched"]      # DCP's own answer
    for got in (template_free(UniversalReader(tmp_path / "live")), template_free(UniversalReader(tmp_path / "conv")),
                template_free(FileSystemReader(tmp_path / "back"))):
        assert torch.equal(got["model"]["w"], want["model"]["w"])
        assert got["sched"].keys() == want["sched"].keys()
        assert type(got["sched"]["base_lrs"]) is list and type(got["sched"]["milestones"]) is list
        for a, b in zip(got["sched"]["base_lrs"], want["sched"]["base_lrs"]):
            assert torch.equal(a, b)
        assert torch.equal(got["sched"]["a.b"], want["sched"]["a.b"])
        assert torch.equal(got["sched"]["milestones"][0]["at"], want["sched"]["milestones"][0]["at"])
        assert got["sched"]["last_epoch"] == 4


@pytest.mark.parametrize("how", ["live", "convert"])
def test_param_group_membership_survives_an_export_to_deepspeed(tmp_path, how):
    """``get_state_dict`` names each group's parameters (``params``); DeepSpeed's files do not, and
    its flat groups are built from the universal ``optimizer_group`` of each parameter. A DCP
    checkpoint of two groups (decay / no decay) exported to DeepSpeed must keep every parameter in
    its own group, with that group's hyper-parameters: read back by the DeepSpeed source."""
    from ucp.demo_dcp import GPTConfig, build, optimizer, train_step

    model = build(GPTConfig())
    opt = optimizer(model)
    train_step(model, opt, 0)
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    if how == "live":
        dcp.save(sd, storage_writer=UniversalWriter(tmp_path / "u"))
    else:
        dcp.save(sd, checkpoint_id=tmp_path / "dcp")
        ucp.convert(tmp_path / "dcp", tmp_path / "u", source="dcp")
    want = {n: i for i, g in enumerate(osd["param_groups"]) for n in g["params"]}
    assert {ucp.open(tmp_path / "u").param_meta(n).get("optimizer_group") for n in want} == {0, 1}
    ucp.export(tmp_path / "u", tmp_path / "ds", "deepspeed", degrees={"dp": 1}, zero_stage=2)
    ucp.convert(tmp_path / "ds", tmp_path / "back", source="deepspeed")
    back = ucp.open(tmp_path / "back")
    groups = back.metadata["optimizer"]["param_groups"]
    for n, i in want.items():
        g = back.param_meta(n)["optimizer_group"]
        assert g == i, n
        assert groups[g]["weight_decay"] == osd["param_groups"][i]["weight_decay"], n
        assert torch.equal(back.read(n, "exp_avg"), osd["state"][n]["exp_avg"]), n



def flat_trained(tmp_path):
    """A model with two param groups (different lr and weight decay) after one step, its optimizer
    state dict flattened (``flatten_optimizer_state_dict=True``: ``optim.param_groups.<fqn>.<key>``),
    saved by stock DCP and by UniversalWriter; the stock files also converted."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    model, opt = two_groups()
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    msd, osd = get_state_dict(model, opt, options=flat)
    sd = {"model": msd, "optim": osd}
    dcp.save(sd, checkpoint_id=tmp_path / "dcp")
    dcp.save(sd, storage_writer=UniversalWriter(tmp_path / "live"))
    ucp.convert(tmp_path / "dcp", tmp_path / "conv", source="dcp")
    return model, opt, sd, flat


def test_flattened_optimizer_state_maps_to_param_groups_and_loads_back_in_its_form(tmp_path):
    """The flattened form numbers no groups: ucp rebuilds them from the parameters' values (equal
    values, one group, in model order), records each parameter's group and that the save was
    flattened, and gives that form back to loads (``UniversalReader``, ``export --to dcp`` +
    ``FileSystemReader``) and bit-exact values to a fresh optimizer."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model, opt, sd, flat = flat_trained(tmp_path)
    ucp.export(tmp_path / "live", tmp_path / "back", "dcp")
    ucp.export(tmp_path / "live", tmp_path / "named", "dcp", keys="get_state_dict")   # the form named: still flattened
    for path in ("live", "conv"):
        ck = ucp.open(tmp_path / path)
        groups = ck.metadata["optimizer"]["param_groups"]
        assert ck.metadata["optimizer"]["flattened"] is True and "dcp" not in ck.metadata
        assert [g["params"] for g in groups] == [["0.weight", "1.weight"], ["0.bias", "1.bias"]]
        assert [(g["lr"], g["weight_decay"]) for g in groups] == [(0.1, 0.1), (0.5, 0.0)]
        assert {n: ck.param_meta(n)["optimizer_group"] for n in ck.params} == \
            {"0.weight": 0, "1.weight": 0, "0.bias": 1, "1.bias": 1}
    for reader in (UniversalReader(tmp_path / "live"), UniversalReader(tmp_path / "conv"),
                   FileSystemReader(tmp_path / "back"), FileSystemReader(tmp_path / "named")):
        torch.manual_seed(1)
        fresh = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
        fopt = torch.optim.AdamW([{"params": [fresh[0].weight, fresh[1].weight]},
                                  {"params": [fresh[0].bias, fresh[1].bias]}], lr=0.9)
        fresh(torch.randn(5, 4)).sum().backward()
        fopt.step()
        msd, osd = get_state_dict(fresh, fopt, options=flat)
        target = {"model": msd, "optim": osd}
        dcp.load(target, storage_reader=reader)
        assert target["optim"].keys() == sd["optim"].keys()
        for k, v in sd["optim"].items():   # tuples (betas) come back as tuples
            got = target["optim"][k]
            assert torch.equal(got, v) if isinstance(v, torch.Tensor) else (got == v and type(got) is type(v)), k
        set_state_dict(fresh, fopt, model_state_dict=target["model"], optim_state_dict=target["optim"], options=flat)
        assert [(g["lr"], g["weight_decay"]) for g in fopt.param_groups] == [(0.1, 0.1), (0.5, 0.0)]
        for p, q in zip(fresh.parameters(), model.parameters()):
            assert torch.equal(p, q) and torch.equal(fopt.state[p]["exp_avg"], opt.state[q]["exp_avg"])


def test_export_to_deepspeed_takes_flattened_groups_and_refuses_none(tmp_path):
    """A flattened optimizer state dict exports to DeepSpeed with its groups; optimizer state with
    no hyper-parameters at all is refused (DeepSpeed's files need lr, betas, ...), not written as
    groups without them."""
    flat_trained(tmp_path)
    ucp.export(tmp_path / "live", tmp_path / "ds", "deepspeed", degrees={"dp": 1}, zero_stage=2)
    ucp.convert(tmp_path / "ds", tmp_path / "ds_back", source="deepspeed")
    back = ucp.open(tmp_path / "ds_back")
    groups = back.metadata["optimizer"]["param_groups"]
    assert {n: (groups[back.param_meta(n)["optimizer_group"]]["lr"]) for n in back.params} == \
        {"0.weight": 0.1, "1.weight": 0.1, "0.bias": 0.5, "1.bias": 0.5}

    bare = {"model": {"w": torch.ones(4)}, "optim": {"state": {"w": {"exp_avg": torch.zeros(4)}}}}
    dcp.save(bare, storage_writer=UniversalWriter(tmp_path / "bare"))
    with pytest.raises(UcpError, match=r"optimizer state \(exp_avg\) but no optimizer hyper-parameters"):
        ucp.export(tmp_path / "bare", tmp_path / "ds2", "deepspeed", degrees={"dp": 1}, zero_stage=2)


def test_export_to_deepspeed_keeps_integer_buffers_out_of_the_flat_groups(tmp_path):
    """A model-only checkpoint marks nothing frozen (no optimizer says what it trains), but an
    integer buffer is never a trained parameter: DeepSpeed's export keeps it whole in the module
    states, as DeepSpeed does, instead of failing to put it in a floating-point flat group."""
    class Counted(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.register_buffer("count", torch.arange(3))

    model = Counted()
    dcp.save({"model": model.state_dict()}, storage_writer=UniversalWriter(tmp_path / "u"))
    ucp.export(tmp_path / "u", tmp_path / "ds", "deepspeed", degrees={"dp": 1}, zero_stage=2)
    ucp.convert(tmp_path / "ds", tmp_path / "back", source="deepspeed")
    back = ucp.open(tmp_path / "back")
    assert torch.equal(back.read("count"), torch.arange(3)) and back.param_meta("count").get("frozen")
    assert torch.equal(back.read("lin.weight"), model.lin.weight.detach())


def test_flattened_groups_of_parameters_named_by_digits(tmp_path):
    """Parameters named "0", "1" (an ``nn.ParameterList`` at the root): flattened, parameter "0"'s lr
    is ``optim.param_groups.0.lr``, which also spells group 0's lr. No group lists its parameters,
    so the form is the flattened one: each parameter keeps its own group and hyper-parameters, and
    a load without a template nests as DCP's own files do."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    model = nn.ParameterList([nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(4))])
    opt = torch.optim.AdamW([{"params": [model[0]], "lr": 1e-2}, {"params": [model[1]], "lr": 5e-3,
                                                                   "weight_decay": 0.0}])
    sum((p ** 2).sum() for p in model).backward()
    opt.step()
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
    assert "param_groups.0.lr" in osd and "param_groups.1.weight_decay" in osd
    sd = {"model": msd, "optim": osd}
    dcp.save(sd, checkpoint_id=tmp_path / "dcp")
    dcp.save(sd, storage_writer=UniversalWriter(tmp_path / "live"))
    ucp.convert(tmp_path / "dcp", tmp_path / "conv", source="dcp")

    want = template_free(FileSystemReader(tmp_path / "dcp"))
    for path in ("live", "conv"):
        ck = ucp.open(tmp_path / path)
        groups = ck.metadata["optimizer"]["param_groups"]
        assert ck.metadata["optimizer"]["flattened"] is True
        assert [(g["params"], g["lr"], g["weight_decay"]) for g in groups] == [(["0"], 1e-2, 0.01), (["1"], 5e-3, 0.0)]
        assert [ck.param_meta(n)["optimizer_group"] for n in ("0", "1")] == [0, 1]
        got = template_free(UniversalReader(tmp_path / path))
        assert set(want["optim"]) <= set(got["optim"]), path     # and the indexed form besides
        assert got["optim"]["param_groups.1.lr"] == 5e-3 and torch.equal(got["model"]["1"], want["model"]["1"])


@pytest.mark.parametrize("saved_flat", [False, True], ids=["indexed-saved", "flattened-saved"])
def test_either_optimizer_form_loads_from_either_save(tmp_path, saved_flat):
    """A job picks its optimizer state dict form by its layout (pipeline stages need the flattened
    one), not by how the checkpoint it resumes from was saved (another layout, or another
    framework): UniversalReader serves both forms, each value as saved, and the DCP target's
    loads without a template still nest as saved."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    model, opt = two_groups()
    save_opts = StateDictOptions(flatten_optimizer_state_dict=saved_flat)
    msd, osd = get_state_dict(model, opt, options=save_opts)
    dcp.save({"model": msd, "optim": osd}, storage_writer=UniversalWriter(tmp_path / "u"))
    for load_flat in (False, True):
        fresh, fopt = two_groups()
        with torch.no_grad():
            for p in fresh.parameters():
                p.zero_()
        opts = StateDictOptions(flatten_optimizer_state_dict=load_flat)
        m2, o2 = get_state_dict(fresh, fopt, options=opts)
        target = {"model": m2, "optim": o2}
        dcp.load(target, storage_reader=UniversalReader(tmp_path / "u"))
        set_state_dict(fresh, fopt, model_state_dict=target["model"], optim_state_dict=target["optim"], options=opts)
        assert [(g["lr"], g["weight_decay"]) for g in fopt.param_groups] == [(0.1, 0.1), (0.5, 0.0)], load_flat
        for p, q in zip(fresh.parameters(), model.parameters()):
            assert torch.equal(p, q) and torch.equal(fopt.state[p]["exp_avg_sq"], opt.state[q]["exp_avg_sq"])
    assert set(osd) <= set(template_free(UniversalReader(tmp_path / "u"))["optim"])


@pytest.mark.parametrize("opt_factory,scalars", [
    (lambda p: torch.optim.NAdam(p, lr=0.01), ("mu_product",)),
    (lambda p: torch.optim.ASGD(p, lr=0.01), ("eta", "mu")),
])
def test_export_to_deepspeed_keeps_every_0d_optimizer_state(tmp_path, opt_factory, scalars):
    """NAdam keeps ``mu_product`` beside ``step``, ASGD ``eta`` and ``mu``: a DeepSpeed flat group's
    torch state must hold them too (its ``load_state_dict`` on resume needs every key), as the
    tensors torch keeps, of their dtype. They were dropped, silently."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = opt_factory(model.parameters())
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, storage_writer=UniversalWriter(tmp_path / "u"))
    ucp.export(tmp_path / "u", tmp_path / "ds", "deepspeed", degrees={"dp": 1}, zero_stage=2)
    (optim_file,) = (tmp_path / "ds").glob("global_step*/*optim_states.pt")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler   # the objects DeepSpeed's file pickles
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        state = torch.load(optim_file, weights_only=True)["optimizer_state_dict"]["base_optimizer_state"]["state"][0]
    want = osd["state"]["weight"]
    assert set(state) == set(want)
    for k in ("step", *scalars):
        assert state[k].dtype == want[k].dtype and state[k].dim() == 0 and state[k].item() == want[k].item(), k


def test_a_list_valued_optimizer_state_is_refused_by_name(tmp_path):
    """LBFGS keeps lists of tensors per parameter (``old_dirs``, ``ro``...), which DCP flattens to
    ``optim.state.<fqn>.<state>.<i>``. ucp does not store them and says so, naming the state and
    the parameter; it once told the user the model section lacked a parameter ``<fqn>.<state>``."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)
    x = torch.randn(8, 4)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    want = r"optimizer state '(al|old_dirs|old_stps|ro)' of (weight|bias) \(and \d+ more\) is a list of tensors"
    with pytest.raises(BaseException, match=want):
        dcp.save(sd, storage_writer=UniversalWriter(tmp_path / "live"))
    dcp.save(sd, checkpoint_id=tmp_path / "dcp")
    with pytest.raises(UcpError, match=want):
        ucp.convert(tmp_path / "dcp", tmp_path / "conv", source="dcp")


def test_factored_optimizer_states_convert_with_their_own_shapes(tmp_path):
    """Adafactor keeps ``row_var`` (rows x 1) and ``col_var`` (1 x cols) for a matrix: converted from
    DCP's files each state is an array of its own shape, equal to DCP's consolidation bit for bit,
    and loads back through UniversalReader; the exports whose files shape every state as its
    parameter (--to dcp, --to deepspeed) refuse it by name and write nothing."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.Adafactor(model.parameters(), lr=0.01)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp_path / "dcp")
    ucp.convert(tmp_path / "dcp", tmp_path / "u", source="dcp")
    dcp_to_torch_save(tmp_path / "dcp", tmp_path / "ref.pt")
    ref = torch.load(tmp_path / "ref.pt", weights_only=True)["optim"]["state"]
    ck = ucp.open(tmp_path / "u")
    assert tuple(ck.array_info("weight", "row_var").shape) == (3, 1)
    assert tuple(ck.array_info("weight", "col_var").shape) == (1, 4)
    for n, states in ref.items():
        for st, t in states.items():
            if t.dim():
                assert torch.equal(ck.read(n, st), t), (n, st)
    back = {"model": {k: torch.zeros_like(v) for k, v in msd.items()},
            "optim": {"state": {n: {st: torch.zeros_like(t) for st, t in s.items()} for n, s in osd["state"].items()},
                      "param_groups": osd["param_groups"]}}
    dcp.load(back, storage_reader=UniversalReader(tmp_path / "u"))
    for n, states in osd["state"].items():
        for st, t in states.items():
            assert torch.equal(back["optim"]["state"][n][st], t), (n, st)
    for target, kw in (("dcp", {}), ("deepspeed", {"degrees": {"dp": 1}, "zero_stage": 2})):
        with pytest.raises(UcpError, match=r"state '(row|col)_var' of 'weight' has shape \[\d, \d\], not the "
                                           r"parameter's \[3, 4\] \(a factored optimizer state"):
            ucp.export(tmp_path / "u", tmp_path / f"to-{target}", target, **kw)
        assert not (tmp_path / f"to-{target}").exists() or not any((tmp_path / f"to-{target}").iterdir())


@pytest.mark.parametrize("route", ["live", "convert", "export"])
def test_tuples_come_back_as_tuples_so_a_python_rng_state_resumes(tmp_path, route):
    """The usual resume pattern saves ``random.getstate()`` (a tuple holding a tuple) and numpy's
    state beside the model; ``random.setstate`` takes nothing but a tuple. Whatever the route
    (UniversalWriter -> UniversalReader, stock DCP -> convert -> UniversalReader, UniversalWriter ->
    export --to dcp -> FileSystemReader), they come back as FileSystemReader gives them back."""
    import random

    import numpy as np
    from torch.distributed.checkpoint import FileSystemReader

    random.seed(3)
    np.random.seed(3)
    model = nn.Linear(3, 2)
    saved = {"model": model.state_dict(),
             "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "pair": (1, (2, "a"))}}
    want_py, want_np = random.random(), np.random.rand()
    if route == "convert":
        dcp.save(saved, checkpoint_id=tmp_path / "dcp")
        ucp.convert(tmp_path / "dcp", tmp_path / "u")
    else:
        dcp.save(saved, storage_writer=UniversalWriter(tmp_path / "u"))
    if route == "export":
        ucp.export(tmp_path / "u", tmp_path / "back", "dcp")
        reader = FileSystemReader(tmp_path / "back")
    else:
        reader = UniversalReader(tmp_path / "u")
    random.seed(9)
    target = {"model": nn.Linear(3, 2).state_dict(),
              "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "pair": None}}
    dcp.load(target, storage_reader=reader)
    assert target["rng"]["pair"] == (1, (2, "a")) and type(target["rng"]["pair"][1]) is tuple
    random.setstate(target["rng"]["python"])
    np.random.set_state(target["rng"]["numpy"])
    assert (random.random(), np.random.rand()) == (want_py, want_np)


def test_names_longer_than_a_file_name_can_be_are_saved_and_loaded(tmp_path):
    """A parameter's node is its name, percent-encoded; file systems take 255 bytes a name, and a
    270-character FQN (nested wrappers, LoRA) failed the save with a bare OSError. Long encodings end
    in '~' and the name's hash (FORMAT.md §3): saved, verified, loaded and exported like any other."""
    from torch.distributed.checkpoint import FileSystemReader

    from ucp.format import verify

    model = nn.Sequential()
    inner = model
    for i in range(9):        # 9 nested modules with 28-character names: the FQN is 270+ characters
        child = nn.Sequential()
        inner.add_module(f"wrapper_with_a_long_name_{i:03d}", child)
        inner = child
    inner.add_module("proj", nn.Linear(3, 2))
    inner.add_module("proj/with%slash", nn.Linear(2, 2))
    names = list(model.state_dict())
    assert min(map(len, names)) > 255
    dcp.save({"model": model.state_dict()}, storage_writer=UniversalWriter(tmp_path / "u"))
    assert verify(tmp_path / "u") == [] and list(ucp.open(tmp_path / "u").params) == names
    target = {"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()}}
    dcp.load(target, storage_reader=UniversalReader(tmp_path / "u"))
    assert all(torch.equal(target["model"][k], v) for k, v in model.state_dict().items())
    ucp.export(tmp_path / "u", tmp_path / "back", "dcp")
    again = {"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()}}
    dcp.load(again, storage_reader=FileSystemReader(tmp_path / "back"))
    assert all(torch.equal(again["model"][k], v) for k, v in model.state_dict().items())


def test_a_flat_state_dict_with_values_converts(tmp_path):
    """``dcp.save({"w": t, "step": 5, ...})``: the top level is the model's section (torchtitan's
    form), and a value there is an entry, not a tensor. ``ucp convert`` failed with a bare KeyError."""
    import random

    from torch.distributed.checkpoint import FileSystemReader

    saved = {"w": torch.arange(6.0).reshape(2, 3), "step": 5, "rng": [random.getstate()], "cfg": {"$a": 1}}
    dcp.save(saved, checkpoint_id=tmp_path / "dcp")
    ucp.convert(tmp_path / "dcp", tmp_path / "u")
    assert list(ucp.open(tmp_path / "u").params) == ["w"]
    for reader in (UniversalReader(tmp_path / "u"), ):
        target = {"w": torch.zeros(2, 3), "step": 0, "rng": [None], "cfg": {"$a": 0}}
        dcp.load(target, storage_reader=reader)
        assert torch.equal(target["w"], saved["w"]) and target["step"] == 5 and target["cfg"] == {"$a": 1}
        assert target["rng"] == saved["rng"] and type(target["rng"][0]) is tuple
    ucp.export(tmp_path / "u", tmp_path / "back", "dcp")
    target = {"w": torch.zeros(2, 3), "step": 0, "rng": [None], "cfg": {"$a": 0}}
    dcp.load(target, storage_reader=FileSystemReader(tmp_path / "back"))
    assert target["step"] == 5 and target["rng"] == saved["rng"]
