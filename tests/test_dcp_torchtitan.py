"""The other way DCP state dicts are laid out: model tensors at the top level, as torchtitan saves
them (its CheckpointManager flattens the model's state dict into the top level, the optimizer's
flattened state dict goes under ``optimizer``, beside ``lr_scheduler``, ``dataloader`` and
``train_state``) and as a plain ``dcp.save(model.state_dict())`` does. The keys are what
torchtitan's ``ModelWrapper`` / ``OptimizersContainer`` give: ``get_model_state_dict`` and
``get_optimizer_state_dict(..., flatten_optimizer_state_dict=True)``; real ``dcp.save`` /
``dcp.load`` / ``FileSystemReader`` / ``dcp_to_torch_save`` on every path."""
from __future__ import annotations

import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, get_state_dict)

import ucp
from ucp.cli import main
from ucp.dcp import UniversalReader, UniversalWriter
from ucp.demo_dcp import GPTConfig, build, optimizer, train_step
from ucp.errors import UcpError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(bits(a), bits(b)))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):   # JSON keeps a tuple (betas) as a list
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def trained(variant=GPTConfig(), steps=2, seed=0):
    model = build(variant, seed=seed)
    opt = optimizer(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    for s in range(steps):
        train_step(model, opt, s)
        sched.step()
    return model, opt, sched


def titan(model, opt, sched, step=2) -> dict:
    """The state dict torchtitan's CheckpointManager hands to ``dcp.save`` (its dataloader state is
    the pickled position of each data-parallel rank's loader, ``bytes``)."""
    return {**get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt, options=FLAT),
            "lr_scheduler": sched.state_dict(), "train_state": {"step": torch.tensor(step, dtype=torch.int32)},
            "dataloader": {"dp_rank_0": pickle.dumps({"sample": 16 * step}), "world_size": 1}}


def template_free(reader) -> dict:
    """What ``dcp_to_torch_save``'s planner rebuilds from ``reader``, without a template."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    out: dict = {}
    _load_state_dict(out, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return out


def assert_same_tree(got, want, where="", extra=lambda where, key: False):
    """Equal nested state dicts; ``extra(where, key)`` says which keys ``got`` may have beyond ``want``."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and want.keys() <= got.keys(), (where, sorted(set(want) - set(got)))
        assert all(extra(where, k) for k in got.keys() - want.keys()), (where, sorted(set(got) - set(want)))
        for k in want:
            assert_same_tree(got[k], want[k], f"{where}.{k}", extra)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_tree(g, w, f"{where}[{i}]")
    else:
        assert same(got, want), where


@pytest.fixture(scope="module")
def titan_run(tmp_path_factory):
    """A tied-embedding run saved the torchtitan way, with DCP's own writer and with UniversalWriter."""
    root = tmp_path_factory.mktemp("titan")
    model, opt, sched = trained(GPTConfig(tied=True))
    sd = titan(model, opt, sched)
    dcp.save(sd, checkpoint_id=root / "dcp")
    dcp.save(titan(model, opt, sched), storage_writer=UniversalWriter(root / "live"))
    ucp.convert(root / "dcp", root / "conv", source="dcp")
    return root, model, opt, sched


def test_model_tensors_at_the_top_level_are_the_parameters(titan_run):
    """Converted or written live, the universal checkpoint's parameters are exactly the model's
    state-dict keys, in model order; their values, the optimizer's state and the param groups
    equal DCP's own consolidation (``dcp_to_torch_save``) bit for bit; the lr scheduler and train
    state are kept as entries of their own."""
    root, model, opt, _ = titan_run
    dcp_to_torch_save(root / "dcp", root / "ref.pt")
    ref = torch.load(root / "ref.pt", weights_only=False)
    names = list(model.state_dict().keys())
    for which in ("conv", "live"):
        ck = ucp.open(root / which)
        assert ck.params == names, which
        for n in names:
            want_param = ref[n]
            if "param" in ck.states(n):
                assert same(ck.read(n, "param"), want_param), (which, n)
            else:     # the tied alias is stored once, through the tensor the optimizer steps
                tied = ck.param_meta(n)["tied_to"]
                assert same(ck.read(tied, "param"), want_param), (which, n)
            for s in ("exp_avg", "exp_avg_sq"):
                key = f"state.{n}.{s}"
                if key in ref["optimizer"]:
                    assert same(ck.read(n, s), ref["optimizer"][key]), (which, n, s)
            if f"state.{n}.step" in ref["optimizer"]:
                assert ck.param_meta(n)["scalars"]["step"] == ref["optimizer"][f"state.{n}.step"].item()
        groups = ck.metadata["optimizer"]["param_groups"]
        assert sorted(p for g in groups for p in g["params"]) == sorted(
            k[len("param_groups."):-len(".lr")] for k in ref["optimizer"] if k.startswith("param_groups.") and k.endswith(".lr"))
        assert ck.metadata["dcp"]["train_state.step"].item() == 2
        assert ck.metadata["dcp"]["lr_scheduler.last_epoch"] == 2
        assert ck.metadata["dcp_keys"] == "torchtitan"
        assert not any(ck.param_meta(n).get("frozen") for n in names)


@pytest.mark.parametrize("which", ["conv", "live"])
def test_a_torchtitan_job_resumes_from_it(titan_run, which):
    """``dcp.load`` of a fresh job's torchtitan state dict through UniversalReader gives back every
    tensor and value that was saved, and the model and optimizer are set from it."""
    root, model, opt, sched = titan_run
    m2, o2, s2 = trained(GPTConfig(tied=True), steps=1, seed=7)
    sd = titan(m2, o2, s2, step=0)
    dcp.load(sd, storage_reader=UniversalReader(root / which))
    want = titan(model, opt, sched)
    assert_same_tree(sd, want)


def test_the_form_served_is_the_saved_one_unless_asked(titan_run, tmp_path):
    """A checkpoint remembers how its keys were laid out and serves that form by default (a
    template-free load, as ``dcp_to_torch_save`` does it, gives back DCP's own nested dict, and the
    param groups in their indexed form as well);
    ``keys=`` serves the other: a get_state_dict job loads a torchtitan checkpoint, and a torchtitan
    job loads one saved through get_state_dict (or converted from DeepSpeed)."""
    root, model, opt, sched = titan_run
    want = template_free(FileSystemReader(root / "dcp"))
    for which in ("conv", "live"):   # the indexed param groups too, for a job that loads that form
        assert_same_tree(template_free(UniversalReader(root / which)), want,
                         extra=lambda where, k: where == ".optimizer" and k.split(".")[:2][-1].isdigit())

    msd, osd = get_state_dict(model, opt)
    m2, o2, _ = trained(GPTConfig(tied=True), steps=1, seed=7)
    gsd = dict(zip(("model", "optim"), get_state_dict(m2, o2)))
    dcp.load(gsd, storage_reader=UniversalReader(root / "live", keys="get_state_dict"))
    assert_same_tree(gsd, {"model": msd, "optim": osd})

    dcp.save({"model": msd, "optim": osd}, storage_writer=UniversalWriter(tmp_path / "gsd"))
    assert "dcp_keys" not in (ucp.open(tmp_path / "gsd").metadata or {})
    m3, o3, s3 = trained(GPTConfig(tied=True), steps=1, seed=7)
    sd = {**get_model_state_dict(m3), "optimizer": get_optimizer_state_dict(m3, o3, options=FLAT)}
    dcp.load(sd, storage_reader=UniversalReader(tmp_path / "gsd", keys="torchtitan"))
    assert_same_tree(sd, {**get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt, options=FLAT)})

    with pytest.raises(UcpError, match="keys='titan': the key forms are 'get_state_dict', 'torchtitan'"):
        UniversalReader(root / "live", keys="titan")


def test_export_to_dcp_writes_the_saved_form_or_the_one_asked(titan_run, tmp_path):
    """``ucp export --to dcp`` gives back stock DCP files in the checkpoint's own form (what
    ``dcp_to_torch_save`` makes of them equals what it makes of the original files), or in the
    form ``--keys`` names; a form it does not know, or ``--keys`` for another target, is refused
    before anything is written."""
    root, model, opt, sched = titan_run
    ucp.export(root / "conv", tmp_path / "back", "dcp", degrees={"dp": 2})
    assert_same_tree(template_free(FileSystemReader(tmp_path / "back")), template_free(FileSystemReader(root / "dcp")))

    assert main(["export", str(root / "conv"), str(tmp_path / "gsd"), "--to", "dcp", "--keys", "get_state_dict", "-q"]) == 0
    m2, o2, _ = trained(GPTConfig(tied=True), steps=1, seed=7)
    gsd = dict(zip(("model", "optim"), get_state_dict(m2, o2)))
    dcp.load(gsd, storage_reader=FileSystemReader(tmp_path / "gsd"))
    msd, osd = get_state_dict(model, opt)
    assert_same_tree(gsd, {"model": msd, "optim": osd})

    with pytest.raises(UcpError, match="keys='titan': the key forms are 'get_state_dict', 'torchtitan'"):
        ucp.export(root / "conv", tmp_path / "bad", "dcp", keys="titan")
    with pytest.raises(UcpError, match=r"target 'hf' does not take keys \(--keys\)"):
        ucp.export(root / "conv", tmp_path / "hf", "hf", keys="torchtitan")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "hf").exists()


def save_universal(sd: dict, tmp_path, writer: str):
    """``sd`` as a universal checkpoint at ``tmp_path / "u"``: saved by DCP and converted (``dcp``),
    or saved through UniversalWriter (``live``); opened."""
    if writer == "dcp":
        dcp.save(sd, checkpoint_id=tmp_path / "dcp")
        ucp.convert(tmp_path / "dcp", tmp_path / "u", source="dcp")
    else:
        dcp.save(sd, storage_writer=UniversalWriter(tmp_path / "u"))
    return ucp.open(tmp_path / "u")


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.norm = nn.LayerNorm(4)


class CausalLM(nn.Module):
    """Keys as a Hugging Face ``*ForCausalLM`` names them: ``model.*`` beside ``lm_head.weight``."""

    def __init__(self):
        super().__init__()
        self.model = _Inner()
        self.lm_head = nn.Linear(4, 11, bias=False)


@pytest.mark.parametrize("writer", ["dcp", "live"])
def test_a_plain_model_state_dict_keeps_its_names(tmp_path, writer):
    """``dcp.save(model.state_dict())`` (torchtitan's model-only save, or any script's): every tensor
    is a parameter under its own name. An HF-style model's ``model.*`` keys are not
    get_state_dict's ``model.`` section: ``lm_head.weight`` beside them says so."""
    torch.manual_seed(0)
    lm = CausalLM()
    sd = lm.state_dict()
    ck = save_universal(sd, tmp_path, writer)
    assert ck.params == list(sd)
    for n, t in sd.items():
        assert same(ck.read(n, "param"), t)
        assert not ck.param_meta(n).get("frozen")
    back = {n: torch.zeros_like(t) for n, t in sd.items()}
    dcp.load(back, storage_reader=UniversalReader(tmp_path / "u"))
    assert_same_tree(back, sd)


def test_an_entry_ucp_cannot_store_is_named_with_what_it_holds(tmp_path):
    """torchtitan's TrainState once saved its loss history as ``io.BytesIO``, which DCP pickles. ucp
    never unpickles such a thing (nor stores pickles): the refusal names the entry and the pickled
    class, not torch's advice to load with ``weights_only=False`` (nor its terminal escapes), for
    a live save and for a conversion of DCP's files alike."""
    import io

    sd = {"w": torch.arange(4.0), "train_state": {"step": torch.tensor(3), "log_steps": io.BytesIO(b"\x80\x04]")}}
    want = r"'train_state\.log_steps'.*a pickled _io\.BytesIO, which ucp does not unpickle"
    with pytest.raises(BaseException, match=want) as live:
        dcp.save(sd, storage_writer=UniversalWriter(tmp_path / "live"))
    dcp.save(sd, checkpoint_id=tmp_path / "dcp")
    with pytest.raises(UcpError, match=r"train_state\.log_steps.*a pickled _io\.BytesIO, which ucp does not unpickle") as conv:
        ucp.convert(tmp_path / "dcp", tmp_path / "conv", source="dcp")
    assert "\x1b" not in str(live.value) and "\x1b" not in str(conv.value) and "weights_only" not in str(conv.value)
    assert not (tmp_path / "conv").exists() or not any((tmp_path / "conv").iterdir())


def test_export_to_hf_of_names_no_spec_maps_says_so_first(titan_run, tmp_path):
    """torchtitan's names (``tok_embeddings``, ``layers.N.attention.wq``) are neither HF's nor
    Megatron's: ``ucp export --to hf`` says that, naming the checkpoint and its names, before it asks
    for a config.json that would not help, and writes nothing."""
    root, *_ = titan_run
    assert main(["export", str(root / "conv"), str(tmp_path / "hf"), "--to", "hf", "-q"]) == 2
    with pytest.raises(UcpError, match=rf"{root / 'conv'}: the parameter names are neither Hugging Face Llama names "
                                       r"nor Megatron GPT names .*: embed\.weight, .*pass --spec"):
        ucp.export(root / "conv", tmp_path / "hf", "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("writer", ["dcp", "live"])
def test_a_model_section_with_a_tensor_beside_it_stays_get_state_dicts(tmp_path, writer):
    """``{"model": model.state_dict(), "rng": torch.get_rng_state()}``: the keys of the ``model``
    section are its parameters, and the RNG state an entry beside them, as DCP's saved paths say
    (``("model", fqn)`` against ``("rng",)``), although a tensor key lies outside ``model.``."""
    torch.manual_seed(0)
    lm = CausalLM()
    sd = {"model": lm.state_dict(), "rng": torch.get_rng_state()}
    ck = save_universal(sd, tmp_path, writer)
    assert ck.params == list(sd["model"])
    assert "dcp_keys" not in ck.metadata and same(ck.metadata["dcp"]["rng"], sd["rng"])
    back = {"model": {n: torch.zeros_like(t) for n, t in sd["model"].items()}, "rng": torch.zeros_like(sd["rng"])}
    dcp.load(back, storage_reader=UniversalReader(tmp_path / "u"))
    assert_same_tree(back, sd)


class AppState:
    """The DCP tutorial's wrapper (``Stateful``): ``{"app": AppState(model, optimizer)}``."""

    def __init__(self, model, opt):
        self.model, self.opt = model, opt

    def state_dict(self):
        msd, osd = get_state_dict(self.model, self.opt)
        return {"model": msd, "optim": osd}

    def load_state_dict(self, sd):
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def _stateful(obj):
    from torch.distributed.checkpoint.stateful import Stateful

    Stateful.register(type(obj))
    return obj


@pytest.mark.parametrize("writer", ["dcp", "live"])
@pytest.mark.parametrize("layout", ["app", "model_optimizer"])
def test_sections_under_a_wrapper_or_an_optimizer_key_are_read_as_such(tmp_path, writer, layout):
    """The DCP tutorial's ``{"app": AppState(model, optimizer)}`` (sections under one top-level key,
    an entry beside it) and ``{"model": ..., "optimizer": ...}``: the parameters are the model's keys,
    their states and param groups equal DCP's own consolidation (``dcp_to_torch_save``) bit for bit,
    the form is recorded (``get_state_dict@app``, ``model_optimizer``), a template-free load nests
    as DCP's own files do, and a job of the same shape loads it back exactly (a conversion of the
    tutorial's files failed with a KeyError; the optimizer key was read as torchtitan's form)."""
    model, opt, _ = trained()
    msd, osd = get_state_dict(model, opt)
    if layout == "app":
        sd = {"app": _stateful(AppState(model, opt)), "epoch": 3}
        form, sections = "get_state_dict@app", lambda ref: (ref["app"]["model"], ref["app"]["optim"])
    else:
        sd = {"model": msd, "optimizer": osd}
        form, sections = "model_optimizer", lambda ref: (ref["model"], ref["optimizer"])
    dcp.save(sd, checkpoint_id=tmp_path / "ref_dcp")
    dcp_to_torch_save(tmp_path / "ref_dcp", tmp_path / "ref.pt")
    ref = torch.load(tmp_path / "ref.pt", weights_only=False)
    want_model, want_optim = sections(ref)
    ck = save_universal(sd, tmp_path, writer)
    assert ck.params == list(msd) and ck.metadata["dcp_keys"] == form
    for n in msd:
        assert same(ck.read(n, "param"), want_model[n]), n
        for s in ("exp_avg", "exp_avg_sq"):
            assert same(ck.read(n, s), want_optim["state"][n][s]), (n, s)
        assert ck.param_meta(n)["scalars"]["step"] == want_optim["state"][n]["step"].item()
    assert [g["lr"] for g in ck.metadata["optimizer"]["param_groups"]] == [g["lr"] for g in want_optim["param_groups"]]
    got = template_free(UniversalReader(tmp_path / "u"))
    # the reader also serves the param groups flattened by parameter (a job may ask for either form)
    assert_same_tree(got, ref, extra=lambda where, k: where.endswith((".optim", ".optimizer"))
                     and k.startswith("param_groups."))
    model2, opt2, _ = trained(seed=1, steps=1)
    back = {"app": _stateful(AppState(model2, opt2)), "epoch": 0} if layout == "app" else \
        dict(zip(("model", "optimizer"), get_state_dict(model2, opt2)))
    dcp.load(back, storage_reader=UniversalReader(tmp_path / "u"))
    if layout == "app":
        assert back["epoch"] == 3
    else:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(model2, opt2, model_state_dict=back["model"], optim_state_dict=back["optimizer"])
    m2, o2 = get_state_dict(model2, opt2)
    assert_same_tree(m2, msd)
    assert_same_tree(o2["state"], osd["state"])
    assert main(["export", str(tmp_path / "u"), str(tmp_path / "exp"), "--to", "dcp", "-q"]) == 0
    dcp_to_torch_save(tmp_path / "exp", tmp_path / "exp.pt")
    assert_same_tree(torch.load(tmp_path / "exp.pt", weights_only=False), ref)


@pytest.mark.parametrize("writer", ["dcp", "live"])
def test_numpy_values_beside_the_model_are_kept(tmp_path, writer):
    """A state dict's numpy values (a ``best_loss`` kept as ``np.float64``, an ``np.ndarray`` of
    history) are stored, not refused: DCP pickles them, ucp loads those pickles with numpy's
    reconstructors allowed and nothing else. An array loads back as a numpy array, a scalar as the
    number it holds."""
    import numpy as np

    sd = {"model": {"w": torch.arange(4.0)}, "best": np.float64(1.5), "hist": np.arange(3, dtype=np.int32),
          "n": np.int64(7)}
    ck = save_universal(sd, tmp_path, writer)
    assert ck.params == ["w"]
    back = {"model": {"w": torch.zeros(4)}, "best": None, "hist": None, "n": None}
    dcp.load(back, storage_reader=UniversalReader(tmp_path / "u"))
    assert same(back["model"]["w"], sd["model"]["w"])
    assert back["best"] == 1.5 and back["n"] == 7
    assert isinstance(back["hist"], np.ndarray) and back["hist"].dtype == np.int32
    assert back["hist"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("writer", ["dcp", "live"])
def test_empty_bytes_are_kept_like_any_bytes(tmp_path, writer):
    """torchtitan keeps each data-parallel rank's dataloader state as ``bytes``, which may be
    empty; ``torch.save`` pickles ``b""`` as a call of ``bytes()``, a global weights-only loading
    refuses: ucp allows that call with no arguments (``bytes(n)`` would allocate n bytes) and
    nothing more."""
    sd = {"model": {"w": torch.arange(4.0)}, "dataloader": {"dp_rank_0": b"", "dp_rank_1": b"\x00ab"}}
    save_universal(sd, tmp_path, writer)
    back = {"model": {"w": torch.zeros(4)}, "dataloader": {"dp_rank_0": None, "dp_rank_1": None}}
    dcp.load(back, storage_reader=UniversalReader(tmp_path / "u"))
    assert back["dataloader"] == {"dp_rank_0": b"", "dp_rank_1": b"\x00ab"}


def test_a_pickled_bytes_call_with_arguments_is_refused():
    """``bytes(10**12)`` in a hostile pickle would allocate a terabyte: only ``bytes()`` loads."""
    import io
    import zipfile

    from ucp.errors import value_globals

    good = io.BytesIO()
    torch.save(b"", good)
    with zipfile.ZipFile(io.BytesIO(good.getvalue())) as z:
        pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
        files = {n: z.read(n) for n in z.namelist()}
    files[pkl] = files[pkl].replace(b")R", b"\x8a\x05\x00\x10\xa5\xd4\xe8\x85R")   # bytes((10**12,)), as a pickle says it
    hostile = io.BytesIO()
    with zipfile.ZipFile(hostile, "w") as z:
        for n, data in files.items():
            z.writestr(n, data)
    for buf, want in ((good, b""), (hostile, None)):
        buf.seek(0)
        with torch.serialization.safe_globals(value_globals()):
            if want is not None:
                assert torch.load(buf, weights_only=True) == want
            else:
                with pytest.raises(Exception, match="bytes"):
                    torch.load(buf, weights_only=True)


def test_the_reader_names_stock_dcp_files_alone_or_beside_a_universal_checkpoint(tmp_path):
    """``UniversalReader`` on DCP's own files says so and how to read them (not only that a manifest
    is missing); on a directory where ``FileSystemWriter`` saved over a universal checkpoint (it
    clears nothing) it refuses to pick one of the two, naming both."""
    sd = {"model": {"w": torch.arange(4.0)}}
    dcp.save(sd, checkpoint_id=tmp_path / "stock")
    for path in (tmp_path / "stock", f"file://{tmp_path / 'stock'}"):
        with pytest.raises(BaseException, match=r"stock DCP checkpoint .*FileSystemReader.*ucp convert"):
            dcp.load({"model": {"w": torch.zeros(4)}}, storage_reader=UniversalReader(path))
    dcp.save(sd, storage_writer=UniversalWriter(tmp_path / "both"))
    dcp.save({"model": {"w": torch.full((4,), 7.0)}}, checkpoint_id=tmp_path / "both")
    with pytest.raises(BaseException, match=r"holds both a universal checkpoint .* and DCP's own files"):
        dcp.load({"model": {"w": torch.zeros(4)}}, storage_reader=UniversalReader(tmp_path / "both"))


@pytest.mark.parametrize("writer", ["dcp", "live"])
@pytest.mark.parametrize("case", ["ema_beside", "two_levels", "two_apps"])
def test_the_wrapper_is_the_path_holding_the_model_with_its_optimizer(tmp_path, writer, case):
    """Model sections under other keys beside the app (an EMA copy ``{"ema": {"model": ...}}``) are
    entries beside it: the wrapper is the path whose model comes with an optimizer, found at any
    depth (``{"run": {"app": ...}}``: ``get_state_dict@run/app``); two models each with an
    optimizer are refused by name, not read as torchtitan's form (optimizer states stored as
    parameters, as they were)."""
    model, opt, _ = trained()
    msd, osd = get_state_dict(model, opt)
    if case == "ema_beside":
        sd = {"app": _stateful(AppState(model, opt)), "ema": {"model": {k: v * 0.5 for k, v in msd.items()}}}
        form = "get_state_dict@app"
    elif case == "two_levels":
        sd = {"run": {"app": {"model": msd, "optim": osd}}}
        form = "get_state_dict@run/app"
    else:
        model2, opt2, _ = trained(seed=3)
        sd = {"a": _stateful(AppState(model, opt)), "b": _stateful(AppState(model2, opt2))}
        with pytest.raises(BaseException, match=r"model sections under several keys \(a, b\)"):
            save_universal(sd, tmp_path, writer)
        return
    dcp.save(sd, checkpoint_id=tmp_path / "ref_dcp")
    dcp_to_torch_save(tmp_path / "ref_dcp", tmp_path / "ref.pt")
    ref = torch.load(tmp_path / "ref.pt", weights_only=False)
    ck = save_universal(sd, tmp_path, writer)
    assert ck.params == list(msd) and ck.metadata["dcp_keys"] == form
    for n in msd:
        assert same(ck.read(n, "param"), msd[n]) and same(ck.read(n, "exp_avg"), osd["state"][n]["exp_avg"])
    got = template_free(UniversalReader(tmp_path / "u"))
    assert_same_tree(got, ref, extra=lambda where, k: where.endswith(".optim") and k.startswith("param_groups."))


@pytest.mark.parametrize("writer", ["dcp", "live"])
def test_a_submodule_called_optim_in_torchtitans_form_is_a_model_tensor(tmp_path, writer):
    """torchtitan's form of a model with a submodule named ``optim``: its ``optim.*`` tensors are the
    model's (their saved paths are one level), not get_state_dict's optimizer section (every tensor
    went to the metadata as an entry, with no parameter left)."""
    class WithOptim(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.optim = nn.Linear(4, 4)

    torch.manual_seed(0)
    m = WithOptim()
    opt = torch.optim.AdamW(m.parameters())
    m.optim(m.emb(torch.tensor([1, 2]))).sum().backward()
    opt.step()
    sd = {**get_model_state_dict(m), "optimizer": get_optimizer_state_dict(m, opt, options=FLAT)}
    ck = save_universal(sd, tmp_path, writer)
    assert ck.params == ["emb.weight", "optim.weight", "optim.bias"] and ck.metadata["dcp_keys"] == "torchtitan"
    assert same(ck.read("optim.bias", "exp_avg"), opt.state[m.optim.bias]["exp_avg"])


def test_a_numpy_object_array_is_refused_naming_its_dtype(tmp_path):
    """An object or string numpy array would need arbitrary pickles: refused, naming the entry and
    the numpy dtype class (not torch's advice to load with ``weights_only=False``)."""
    import numpy as np

    sd = {"model": {"w": torch.arange(4.0)}, "v": np.array([1, "a"], dtype=object)}
    with pytest.raises(BaseException, match=r"'v'.*a pickled numpy\.dtypes\.ObjectDType, which ucp does not unpickle"):
        dcp.save(sd, storage_writer=UniversalWriter(tmp_path / "u"))
    assert not (tmp_path / "u" / "ucp.manifest.json").exists()
    # saving again there: the message says what the folder holds, and overwrite=True replaces it
    fixed = {"model": {"w": torch.arange(4.0)}, "v": [1, 2]}
    with pytest.raises(BaseException, match=r"holds an unfinished ucp save \(nothing committed\); pass "
                                            r"UniversalWriter\(path, overwrite=True\)"):
        dcp.save(fixed, storage_writer=UniversalWriter(tmp_path / "u"))
    dcp.save(fixed, storage_writer=UniversalWriter(tmp_path / "u", overwrite=True))
    assert ucp.open(tmp_path / "u").params == ["w"]
