"""What the keys of a DCP state dict mean in the universal checkpoint, in each of the forms
jobs save them in (``get_state_dict``'s, torchtitan's, ``{"model", "optimizer"}``, any of them
under a wrapper). One mapping, used by the reader, the writer, the DCP source and the DCP
target: inside ucp every key is in ``get_state_dict``'s form (:func:`canonical_key`), and the
other forms exist only at the edges (:func:`form_key`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ucp.errors import UcpError


MODEL = "model."


OPTIM_STATE = "optim.state."


PARAM_GROUPS = "optim.param_groups."


@dataclass(frozen=True)
class DcpKey:
    """What a flattened DCP state-dict key means in the universal checkpoint.

    ``kind``: ``"param"`` (``name``, state ``param``), ``"state"`` (``name``, ``state``),
    ``"group"`` (``group`` index, ``state`` = the hyper-parameter), ``"hyper"`` (a
    hyper-parameter ``state`` of parameter ``name``: flattened groups; an extra where ``name`` is
    no model tensor) or ``"extra"``."""
    kind: str
    name: str = ""
    state: str = ""
    group: int = -1


def parse_key(fqn: str) -> DcpKey:
    """The meaning of the flattened DCP key ``fqn`` (see the module docstring)."""
    if fqn.startswith(MODEL) and len(fqn) > len(MODEL):
        return DcpKey("param", fqn[len(MODEL):], "param")
    if fqn.startswith(OPTIM_STATE):
        name, _, state = fqn[len(OPTIM_STATE):].rpartition(".")
        if name and state:
            return DcpKey("state", name, state)
    if fqn.startswith(PARAM_GROUPS):
        rest = fqn[len(PARAM_GROUPS):]
        idx, _, key = rest.partition(".")
        if idx.isdigit() and key and "." not in key:  # not "0.weight.lr": lr of parameter "0.weight"
            return DcpKey("group", state=key, group=int(idx))
        name, _, key = rest.rpartition(".")
        if name and key:
            return DcpKey("hyper", name, key)
    return DcpKey("extra", fqn)


#: How a DCP state dict lays out its keys: where the model's section and the optimizer's are.
#: ``get_state_dict``: ``{"model": ..., "optim": ...}`` (the keys above). ``torchtitan``: the
#: model's keys at the top level and the optimizer's state dict under ``optimizer`` (flattened
#: there by torchtitan), beside torchtitan's other states (:data:`TITAN_STATES`); a plain
#: ``dcp.save(model.state_dict())`` has this form too. ``model_optimizer``: ``{"model": ...,
#: "optimizer": ...}``. Any of them may sit under one top-level key, as the DCP tutorial's
#: ``{"app": AppState(model, optimizer)}`` puts them: the form is then spelt ``<form>@<key>``
#: (``get_state_dict@app``: keys ``app.model.<fqn>``, ``app.optim.state...``); entries beside
#: the sections keep their keys as saved. Inside ucp every key is in the ``get_state_dict`` form
#: (:func:`canonical_key`); a checkpoint of another records it (``metadata["dcp_keys"]``) and is
#: read and exported in it (:func:`form_key`).
KEY_FORMS = ("get_state_dict", "torchtitan", "model_optimizer")


#: the sections' prefixes of each form: (model, optimizer)
_SECTIONS = {"get_state_dict": (MODEL, "optim."), "torchtitan": ("", "optimizer."),
             "model_optimizer": (MODEL, "optimizer.")}


TITAN_OPTIM = "optimizer."


#: the other states torchtitan's CheckpointManager saves beside the model and the optimizer
TITAN_STATES = ("lr_scheduler.", "dataloader.", "train_state.")


def is_array(k: DcpKey, size) -> bool:
    """Model tensors and optimizer states of at least one dimension are arrays; 0-d optimizer
    states are scalars; the rest is metadata."""
    return k.kind == "param" or (k.kind == "state" and len(size) > 0)


def form_parts(form: str) -> tuple[str, str, tuple]:
    """(model section prefix, optimizer section prefix, wrapper path) of ``form``: the wrapper is
    the nested path the sections sit under, written after ``@`` with ``/`` between its levels
    (``get_state_dict@app``, ``get_state_dict@run/app``), ``()`` for none."""
    name, _, wrapper = form.partition("@")
    model, optim = _SECTIONS[name]
    return model, optim, tuple(wrapper.split("/")) if wrapper else ()


#: the forms whose jobs save the optimizer flattened by default (torchtitan's CheckpointManager)
_FLATTENED_FORMS = ("torchtitan",)


def saves_flattened(form: str) -> bool:
    """Whether a job saving in ``form`` flattens its optimizer state dict by default
    (``optim.param_groups.<fqn>.<key>``): torchtitan always does; ``get_state_dict`` only with
    ``flatten_optimizer_state_dict=True``."""
    return form.partition("@")[0] in _FLATTENED_FORMS


def _dotted(path: tuple) -> str:
    """The flattened-key prefix of a wrapper path (``("run", "app")`` -> ``"run.app."``)."""
    return "".join(f"{p}." for p in path)


def key_form(keys: dict, paths: Optional[dict] = None) -> str:
    """The form of a state dict's keys (``{key: number of dims, None for a value}``): an ``optim``
    section says ``get_state_dict``; an optimizer under ``optimizer`` says ``model_optimizer``
    beside a ``model`` section, else ``torchtitan``. Without an optimizer, a ``model`` section says
    ``get_state_dict`` and tensors at the top level say ``torchtitan``. ``paths`` (DCP's
    ``planner_data``: key -> nested path) tell a section (``("model", fqn)``, ``("optim", ...)``)
    from a top-level key that merely starts with its name (a Hugging Face model's own ``model.*``
    beside its ``lm_head.weight``, a submodule called ``optim``), and find sections nested under
    other keys (``("app", "model", fqn)``: ``get_state_dict@app``, :func:`_wrapper`); without
    them, keys starting with ``optim.`` are an optimizer section and tensors all under ``model.``
    say ``get_state_dict``."""
    wrapper = _wrapper(keys, paths)
    if wrapper:
        dotted, depth = _dotted(wrapper), len(wrapper)
        inner = {k[len(dotted):]: nd for k, nd in keys.items() if k.startswith(dotted)}
        inner_paths = {k[len(dotted):]: tuple(v)[depth:] for k, v in paths.items() if k.startswith(dotted)}
        return f"{key_form(inner, inner_paths)}@{'/'.join(wrapper)}"
    known = isinstance(paths, dict)

    def section(k, name):
        if not k.startswith(name + "."):
            return False
        if not known or k not in paths:
            return True
        return len(paths[k]) > 1 and paths[k][0] == name

    arrays = [k for k, nd in keys.items() if nd]
    if known and all(k in paths for k in arrays):
        model = any(section(k, "model") for k in arrays)
    else:
        model = bool(arrays) and all(k.startswith(MODEL) for k in arrays)
    if any(section(k, "optim") for k in keys):
        return "get_state_dict"
    if any(section(k, "optimizer") and k.startswith((TITAN_OPTIM + "state.", TITAN_OPTIM + "param_groups."))
           for k in keys):
        return "model_optimizer" if model else "torchtitan"
    if not arrays:
        return "get_state_dict"
    return "get_state_dict" if model else "torchtitan"


_SECTION_NAMES = ("model", "optim", "optimizer")


def _wrapper(keys, paths) -> tuple:
    """The nested path the model and optimizer sections sit under (``("app",)`` of the DCP
    tutorial's ``{"app": AppState(...)}``), or ``()``: known from the saved paths only, and only
    where no section is at the top level. Sections under several paths (an EMA model's
    ``{"ema": {"model": ...}}`` beside the app) are told apart by the optimizer: the wrapper is the
    one path with a model section and an optimizer section, the others are entries beside it; where
    that leaves more than one (or none of several), which model to keep is not ucp's to guess."""
    if not isinstance(paths, dict):
        return ()
    found: dict[tuple, set] = {}
    for k in keys:
        path = paths.get(k)
        if path is None or len(path) < 2:
            continue
        path = tuple(str(x) for x in path)
        for i, name in enumerate(path[:-1]):
            if name in _SECTION_NAMES and k.startswith(_dotted(path[:i + 1])):
                if i == 0:
                    return ()
                if name != "model" or keys[k] is not None:    # a model section holds tensors
                    found.setdefault(path[:i], set()).add(name)
                break
    models = [w for w, names in found.items() if "model" in names]
    with_optim = [w for w in models if found[w] & {"optim", "optimizer"}]
    pick = with_optim if with_optim else models
    if len(pick) == 1 and not any("/" in x or "@" in x for x in pick[0]):
        return pick[0]
    if not pick:
        return ()
    raise UcpError(f"model sections under several keys ({', '.join('/'.join(w) for w in pick)}): ucp keeps one model and "
                   "its optimizer; save the others apart, or give the model with the optimizer its own key")


def check_form(form: str, what: str) -> str:
    """``form`` where it names one of :data:`KEY_FORMS`, optionally under a wrapper path
    (``<form>@<key>[/<key>...]``); a typo would otherwise serve keys no job asks for."""
    name, at, wrapper = form.partition("@")
    if name not in KEY_FORMS or (at and (not wrapper or "@" in wrapper or "" in wrapper.split("/"))):
        raise UcpError(f"{what}={form!r}: the key forms are {', '.join(map(repr, KEY_FORMS))}, each optionally "
                       "under the keys of a wrapper as <form>@<key>[/<key>...]")
    return form


def canonical_key(fqn: str, form: str) -> str:
    """``fqn`` of a state dict in ``form`` as the ``get_state_dict`` form spells it. Entries outside
    the model and optimizer sections keep their keys."""
    model, optim, wrapper = form_parts(form)
    if wrapper:
        dotted = _dotted(wrapper)
        if not fqn.startswith(dotted):
            return fqn
        inner = canonical_key(fqn[len(dotted):], form.partition("@")[0])
        return inner if inner.startswith((MODEL, "optim.")) else fqn
    if fqn.startswith(optim):
        return "optim." + fqn[len(optim):]
    if model:
        return fqn
    return fqn if fqn.startswith(TITAN_STATES) else MODEL + fqn


def form_key(key: str, form: str) -> str:
    """A ``get_state_dict`` key as ``form`` spells it (:func:`canonical_key` undone)."""
    model, optim, wrapper = form_parts(form)
    if key.startswith(MODEL):
        return _dotted(wrapper) + model + key[len(MODEL):]
    if key.startswith("optim."):
        return _dotted(wrapper) + optim + key[len("optim."):]
    return key


def model_key(name: str) -> str:
    return MODEL + name


def optim_key(name: str, state: str) -> str:
    return f"{OPTIM_STATE}{name}.{state}" if state != "param" else model_key(name)


def planner_path(fqn: str, paths: Optional[dict] = None, flattened: bool = False,
                 form: str = "get_state_dict") -> tuple:
    """The nested-dict path of a flattened key (DCP's ``planner_data``), so that tools that
    rebuild nested state dicts (``format_utils.dcp_to_torch_save``) work on universal ones.
    ``fqn``: a ``get_state_dict`` key, its path given as ``form`` nests it. ``paths``: the saved
    paths of entries outside model/optim that the dotted key alone does not give
    (``metadata["dcp_paths"]``, :func:`extra_paths`). ``flattened``: the optimizer state dict was
    saved flattened, one level of dotted keys (``state.<fqn>.<state>``)."""
    k = parse_key(fqn)
    model, optim, top = form_parts(form)
    sec = top + (optim[:-1],)
    if k.kind == "param":
        return top + ((model[:-1], k.name) if model else (k.name,))
    if k.kind == "hyper" or (k.kind in ("state", "group") and flattened):
        return sec + (fqn[len("optim."):],)
    if k.kind == "state":
        return sec + ("state", k.name, k.state)
    if k.kind == "group":
        return sec + ("param_groups", k.group, k.state)
    saved = (paths or {}).get(fqn)
    return tuple(saved) if saved else tuple(form_key(fqn, form).split("."))


def extra_paths(keys, planner_data) -> dict:
    """``{key: path}`` of the entries outside model/optim whose nested path (DCP's
    ``planner_data``) is not their key split at the dots: a list index (an int step), a dict key
    holding a dot. Kept as ``metadata["dcp_paths"]``, so that :func:`planner_path` rebuilds them as
    saved (lists stay lists)."""
    out = {}
    for fqn in keys:
        path = (planner_data or {}).get(fqn) if isinstance(planner_data, dict) else None
        if path is not None and parse_key(fqn).kind == "extra" and list(path) != fqn.split("."):
            out[fqn] = list(path)
    return out


def canonical_paths(planner_data, form: str) -> Optional[dict]:
    """DCP's ``planner_data`` (saved key -> nested path) keyed by ``get_state_dict`` keys."""
    if not isinstance(planner_data, dict) or form == "get_state_dict":
        return planner_data
    return {canonical_key(k, form): v for k, v in planner_data.items()}


def parse_in_form(fqn: str, form: str) -> DcpKey:
    """The meaning of a key of a state dict in ``form``."""
    return parse_key(canonical_key(fqn, form))


def saved_ndim(meta) -> Optional[int]:
    """Dims of a saved tensor from its metadata (a ``TensorStorageMetadata``, or a write item's
    ``tensor_data``); None for a value, whose metadata has no size (``key_form``)."""
    size = getattr(meta, "size", None)
    return None if size is None else len(size)
