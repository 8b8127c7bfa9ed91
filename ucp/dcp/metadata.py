"""The non-tensor side of a DCP state dict in the universal checkpoint: param groups (indexed
or flattened per parameter), per-parameter scalars (Adam's ``step``) and their dtypes, and the
``tied_to`` / ``frozen`` / ``optimizer_group`` flags read off the keys. Pure functions over keys
and values, shared by the writer (save), the reader (load) and the DCP source and target
(convert, export)."""
from __future__ import annotations

from typing import Any

import torch

from ucp.dcp.keys import PARAM_GROUPS, extra_paths, parse_key
from ucp.errors import UcpError


def listed_param_groups(ck, md: dict) -> list:
    """The optimizer's param groups as ``get_state_dict`` lays them out. A checkpoint converted
    from a framework whose groups do not list their parameters (DeepSpeed) records each one's
    group as ``optimizer_group``: ``params`` is then rebuilt from it, in model order."""
    groups = [dict(g) for g in (md.get("optimizer") or {}).get("param_groups") or []]
    if not groups or all("params" in g for g in groups):
        return groups
    member = {n: ck.param_meta(n).get("optimizer_group") for n in ck.params}
    for i, g in enumerate(groups):
        g.setdefault("params", [n for n in ck.params if member[n] == i])
    return groups


def param_flags(names, keys, ties: dict, listed=None) -> dict[str, dict]:
    """``tied_to`` / ``frozen`` / ``optimizer_group`` of model parameters ``names`` from the
    flattened keys of the state dict, the ties found (``alias -> other``, either way round) and
    the group of each FQN its param groups list (``optim.param_groups.<i>.params``,
    :func:`param_group_of`). ``optimizer_group`` is how the universal form records membership
    for every source (DeepSpeed's files do not list a group's parameters; its target builds its
    flat groups from it).

    The optimizer trains what its param groups list, and what it keeps state for. Keeping no
    state says little (SGD without momentum keeps none; Adam none for a parameter that has not
    had a gradient yet), so a model tensor is frozen only when the state dict has an optimizer
    that neither lists it nor keeps state for it, and it is not tied. The tie points to the one
    the optimizer keeps state for, else to the one it lists."""
    listed = listed or {}
    has_optim = any(parse_key(k).kind in ("state", "group", "hyper") for k in keys)
    stepped = stepped_params(keys)
    out: dict[str, dict] = {n: {} for n in names}

    def trained(n):
        return n in stepped, n in listed

    for alias, target in ties.items():
        if trained(alias) > trained(target):
            alias, target = target, alias
        out.setdefault(alias, {})["tied_to"] = target
    for n in names:
        if has_optim and not any(trained(n)) and "tied_to" not in out[n]:
            out[n]["frozen"] = True
        if listed.get(n) is not None:
            out[n]["optimizer_group"] = listed[n]
    return out


def stepped_params(keys) -> set:
    """The model tensors the optimizer keeps state for (``optim.state.<fqn>.<state>`` keys)."""
    return {k.name for k in map(parse_key, keys) if k.kind == "state"}


def tied_aliases(names, keys, ties: dict, listed=None) -> set:
    """The model tensors stored through another one (``tied_to`` of :func:`param_flags`)."""
    return {n for n, f in param_flags(names, keys, ties, listed).items() if "tied_to" in f}


def regroup(groups: dict, extras: dict, names) -> tuple[dict, dict, bool]:
    """Param groups ``{(group, key): value}`` with the per-parameter hyper-parameters among
    ``extras`` (``optim.param_groups.<fqn>.<key>`` of model tensors ``names``: a flattened optimizer
    state dict) turned into indexed groups: tensors whose hyper-parameters are all equal share a
    group, numbered in model order after any indexed one, that lists them in ``params``. Returns
    (groups, the other extras, whether any entry was per parameter). The flattened form does not
    number the groups, so two groups of equal hyper-parameters come back as one."""
    known = set(names)
    numbered = any(key == "params" for _, key in groups)   # the indexed form lists each group's params
    per: dict[str, dict] = {}
    kept, rest = {}, {}
    for (i, key), v in groups.items():
        if not numbered and str(i) in known:   # flattened: "optim.param_groups.0.lr" is parameter "0"'s lr
            per.setdefault(str(i), {})[key] = v
        else:
            kept[(i, key)] = v
    for fqn, v in extras.items():
        k = parse_key(fqn)
        if k.kind == "hyper" and k.name in known:
            per.setdefault(k.name, {})[k.state] = v
        else:
            rest[fqn] = v
    if not per:
        return groups, extras, False
    found: list[tuple[dict, list]] = []
    for n in names:
        if n in per:
            i = next((j for j, (g, _) in enumerate(found) if _same_values(g, per[n])), None)
            if i is None:
                found.append((per[n], []))
            found[-1 if i is None else i][1].append(n)
    out = kept
    base = max((i for i, _ in kept), default=-1) + 1
    for i, (g, members) in enumerate(found, start=base):
        out.update({(i, k): v for k, v in g.items()})
        out[(i, "params")] = members
    return out, rest, True


def _same_values(a: dict, b: dict) -> bool:
    def same(x, y):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype
                    and x.shape == y.shape and torch.equal(x, y))
        return type(x) is type(y) and x == y

    return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)


def is_flattened(md: dict) -> bool:
    """Whether the checkpoint's optimizer state dict was saved flattened (:func:`regroup`)."""
    return bool((md.get("optimizer") or {}).get("flattened"))


def group_entries(groups: list, flattened: bool) -> list[tuple[str, Any]]:
    """The DCP ``(key, value)`` entries of param groups (dicts listing their ``params``), in the
    form they were saved in: ``optim.param_groups.<i>.<key>``, or with ``flattened``
    ``optim.param_groups.<fqn>.<key>`` for each parameter listed (its group's values)."""
    if not flattened:
        return [(f"{PARAM_GROUPS}{i}.{k}", v) for i, g in enumerate(groups) for k, v in g.items()]
    if any("params" not in g for g in groups):
        return []   # groups that do not list their parameters have no per-parameter form
    return [(f"{PARAM_GROUPS}{n}.{k}", v) for g in groups for n in g.get("params") or []
            for k, v in g.items() if k != "params"]


def param_group_of(groups: dict) -> dict[str, int]:
    """The group of each FQN the param groups list (``{(group, key): value}``): ``get_state_dict``
    names each parameter of a group in its ``params`` (a plain ``optimizer.state_dict()`` numbers
    them, and lists no names)."""
    return {p: i for (i, key), v in groups.items() if key == "params" and isinstance(v, (list, tuple))
            for p in v if isinstance(p, str)}


def param_holder(ck, name: str) -> str:
    """The parameter whose ``param`` array is ``name``'s model tensor in the universal checkpoint
    ``ck``: ``name``, or the holder of a tied alias stored without arrays (``ck.holder``). Every
    ``model.<fqn>`` DCP entry is made from one; an error names the parameter that has none."""
    holder = ck.holder(name)
    if "param" not in ck.states(holder):
        raise UcpError(f"{getattr(ck, 'path', ck)}: parameter {name!r} has no 'param' array (and no tied_to "
                       "that has one)")
    return holder


def check_states_held(where, state_names, param_names) -> None:
    """Optimizer state must come with its model tensor: a universal parameter is made from its
    ``model.<fqn>`` entry (its ``param`` array), so state alone could be stored but never loaded
    or exported."""
    held = set(param_names)
    missing = sorted(set(state_names) - held)
    listed = [n for n in missing if n.rpartition(".")[0] in held]
    if listed:   # optim.state.<fqn>.<state>.<i>: read as state <i> of a parameter "<fqn>.<state>"
        name, _, state = listed[0].rpartition(".")
        more = f" (and {len(listed) - 1} more)" if len(listed) > 1 else ""
        raise UcpError(f"{where}: optimizer state {state!r} of {name}{more} is a list of tensors (keys "
                       f"optim.state.{name}.{state}.<i>, as LBFGS keeps its history), which ucp does not store")
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise UcpError(f"{where}: optimizer state for {', '.join(missing[:5])}{more}, which the model "
                       f"section (model.<fqn>) does not hold: {_why_unheld(missing, held)}")


def _why_unheld(missing: list[str], held: set[str]) -> str:
    """The fix for optimizer state named otherwise than the model's tensors, naming the two usual
    causes where the names show them."""
    if all(n.isdigit() for n in missing):
        return ("its names are numbers, as the optimizer's own state_dict() gives them: save "
                "get_optimizer_state_dict(model, optimizer), which names each state by its parameter")
    compiled = {h.replace("_orig_mod.", ""): h for h in held if "_orig_mod." in h}
    if any(n in compiled for n in missing):
        return ("the model's keys hold '_orig_mod.' (the state_dict() of a torch.compile'd module) and "
                "the optimizer's do not: save get_model_state_dict(model), which leaves it out")
    return ("save the model's state dict with the optimizer's ({'model': ..., 'optim': ...} of "
            "get_state_dict(model, optimizer))")


def non_tensor_metadata(groups: dict, extras: dict, planner_data=None, flattened: bool = False,
                        form: str = "get_state_dict") -> dict:
    """The universal checkpoint's non-tensor metadata: ``{"optimizer": {"param_groups":
    [...]}}`` from ``{(group, key): value}`` (``"flattened": true`` where they were saved per
    parameter, :func:`regroup`), ``{"dcp": {key: value}}`` from the other entries, and their
    nested paths where the keys alone do not give them (``"dcp_paths"``, :func:`extra_paths` of
    the saved ``planner_data``, keyed as ``extras``); ``"dcp_keys"``: the form of the saved keys
    where it is not ``get_state_dict``."""
    md: dict[str, Any] = {}
    if form != "get_state_dict":
        md["dcp_keys"] = form
    if groups:
        n_groups = max(i for i, _ in groups) + 1
        md["optimizer"] = {"param_groups": [{k: v for (i, k), v in sorted(groups.items(), key=_group_order)
                                             if i == g} for g in range(n_groups)]}
        if flattened:
            md["optimizer"]["flattened"] = True
    if extras:
        md["dcp"] = dict(extras)
        paths = extra_paths(extras, planner_data)
        if paths:
            md["dcp_paths"] = paths
    return md


def _group_order(item):
    (i, k), _ = item
    return (i, k != "params", k)
