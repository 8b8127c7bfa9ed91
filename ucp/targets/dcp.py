"""Target plug-in: stock torch DCP files (``.metadata`` + ``__<r>_0.distcp``) from a universal
checkpoint, for users who want DCP again (``ucp export SRC DST --to dcp [--dp N]``).

Keys follow ``ucp.dcp`` (``get_state_dict``'s layout): ``model.<fqn>``,
``optim.state.<fqn>.<state>`` (scalars such as Adam ``step`` as 0-d tensors of their recorded
dtype), ``optim.param_groups.<i>.<key>``, the entries a DCP source or ``UniversalWriter``
kept under ``metadata["dcp"]`` under their own keys, and other non-tensor metadata under their
keys (nested dicts flattened with dots, as DCP flattens them); all spelled in the form the
checkpoint was saved in (``metadata["dcp_keys"]``) or the one ``--keys`` names
(``ucp.dcp.KEY_FORMS``: ``torchtitan`` puts the model's keys at the top level and the optimizer
under ``optimizer.``). The conversion record (``metadata["source"]``) is not written.

Layout: ``--dp N`` files, file ``r`` holding rows chunk ``r`` (``torch.chunk`` along dim 0,
FSDP2's convention) of every tensor, and non-tensor, 0-d and zero-size items (one chunk of the
whole size, as ``dcp.save`` writes them) in file 0. Any layout can load it (``dcp.load``
reshards); with ``--dp N`` it is exactly what FSDP2 over N ranks saves.
Each item is a ``torch.save`` stream at ``(offset, length)`` of its file, as DCP's
``FileSystemWriter`` writes them; ``.metadata`` is written last (atomically), by DCP's own
classes, so ``FileSystemReader`` reads it as its own. Each unit leaves a small JSON index of
its items next to its file for ``finish`` (works under a torchrun export, where units are
written by several processes); ``finish`` merges and deletes them.
"""
from __future__ import annotations

from typing import Any, Mapping

from ucp.errors import UcpError
from ucp.targets import Target, TargetUnit, check_states_shaped_as_params
from ucp.targets._distcp import DistcpWriter, distcp_name



class DcpTarget(Target):
    name = "dcp"
    description = "torch DCP directory (.metadata + __<r>_0.distcp), get_state_dict or --keys torchtitan keys; --dp N files"

    def __init__(self, dst, *, degrees=None, spec=None, storage_options=None, **options):
        from ucp.dcp.keys import check_form

        super().__init__(dst, degrees=degrees, spec=spec, storage_options=storage_options, **options)
        self.reject_options(allowed=("keys",))
        keys = self.options.get("keys")
        self.keys = None if keys is None else check_form(keys, "keys")
        if spec is not None:
            raise UcpError("--to dcp takes no --spec: DCP files describe their own layout")
        others = sorted(a for a, d in self.degrees.items() if a != "dp" and d > 1)
        if others:
            raise UcpError(f"--to dcp writes FSDP2-style files over --dp N; DCP reshards on load, so "
                           f"{', '.join('--' + a for a in others)} is not needed")
        self.world = self.degrees.get("dp", 1)
        self._aliases: set[str] = set()     # tied aliases stored without arrays (their holder's are read)
        self._files = DistcpWriter(self.dst)

    # -- plan --------------------------------------------------------------------------------
    def plan(self, checkpoint) -> list[TargetUnit]:
        from ucp.dcp.keys import saves_flattened
        from ucp.dcp.metadata import is_flattened

        self.check_destination()
        self._ck = checkpoint
        # one set of row chunks serves every state of a parameter here (an alias has no states)
        check_states_shaped_as_params(checkpoint, [n for n in checkpoint.params if checkpoint.states(n)],
                                      "--to dcp writes states shaped as their parameter; UniversalReader "
                                      "loads this checkpoint as it is")
        units = [TargetUnit(key=distcp_name(r), coords={"dp": r},
                            fragments=[f for n in checkpoint.params for f in self._fragments(checkpoint, n, r)])
                 for r in range(self.world)]
        md = checkpoint.metadata if isinstance(checkpoint.metadata, dict) else {}
        saved = md.get("dcp_keys") or "get_state_dict"
        self.form = self.keys or saved
        # param groups as saved for a job of the saved form (which loads them as it saved them),
        # as another form's jobs do by default (torchtitan's flattened, the others indexed)
        self.flat = is_flattened(md) if self.form == saved else saves_flattened(self.form)
        self.dst.mkdir(parents=True, exist_ok=True)
        return units

    def _fragments(self, ck, name: str, rank: int) -> list:
        """Rows chunk ``rank`` of ``name``; none where that chunk is empty. A 0-d or zero-size
        tensor is one item of rank 0, at offsets 0 of its whole size, as ``dcp.save`` writes it."""
        from ucp.format import split_boxes
        from ucp.plan import Box, Fragment, Piece

        from ucp.dcp.metadata import param_holder

        holder = param_holder(ck, name)
        if holder != name:
            self._aliases.add(name)
        shape = tuple(ck.array_info(holder, "param").shape)
        whole = Box.full(shape)
        if not shape or whole.empty:
            boxes = [whole] if rank == 0 else []
        else:
            boxes = [box for box in [Box(*split_boxes(shape, self.world, 0, "chunk")[rank])] if not box.empty]
        return [Fragment(name=holder, local_name=name, coords=(("dp", rank),), local_shape=box.shape,
                         pieces=(Piece(box, Box.full(box.shape)),), global_shape=shape) for box in boxes]

    # -- writing -------------------------------------------------------------------------------
    def write_unit(self, unit: TargetUnit, tensors: Mapping[str, Mapping[str, Any]]) -> None:
        from ucp.dcp.keys import form_key, optim_key

        frags = {f.local_name: f for f in unit.fragments}
        items = []
        for state, by_name in tensors.items():
            for local, t in by_name.items():
                if state != "param" and local in self._aliases:
                    continue   # an alias read through its tied_to: the optimizer state is the other's
                f = frags[local]
                items.append((form_key(optim_key(local, state), self.form), list(f.pieces[0].src.start),
                              list(f.global_shape), t))
        self._write_file(unit.key, items, extra=unit.coords.get("dp", 0) == 0)

    def _write_file(self, rel: str, items: list, extra: bool) -> None:
        self._files.write(rel, items + (self._extra_items() if extra else []))

    def _extra_items(self) -> list:
        """Scalars (0-d tensors) and non-tensor entries, written with file 0."""
        import torch

        from ucp.dcp.keys import form_key, optim_key
        from ucp.format.dtypes import scalar_dtype

        ck = self._ck
        out = []
        for name in ck.params:
            meta = ck.param_meta(name)
            dtypes = meta.get("scalar_dtypes") or {}
            for state, v in (meta.get("scalars") or {}).items():
                out.append((form_key(optim_key(name, state), self.form), [], [],
                            torch.tensor(v, dtype=scalar_dtype(v, dtypes.get(state),
                                                                   f"{ck.path}: scalar_dtypes[{state!r}] of {name!r}"))))
        for key, value in _non_tensor_entries(ck, self.flat):
            key = form_key(key, self.form)
            if isinstance(value, torch.Tensor):
                out.append((key, [0] * value.dim(), list(value.shape), value))
            else:
                out.append((key, None, None, value))
        return out

    def finish(self, checkpoint) -> None:
        """Merge the units' indexes into DCP ``Metadata`` and write ``.metadata`` last."""
        from ucp.dcp.keys import canonical_key, planner_path

        md = checkpoint.metadata if isinstance(checkpoint.metadata, dict) else {}
        paths, flat = md.get("dcp_paths"), self.flat
        self._files.finish([distcp_name(r) for r in range(self.world)], checkpoint_id=self.dst,
                           planner_data=lambda k: planner_path(canonical_key(k, self.form), paths, flat, self.form))

    def abort(self) -> None:
        self.remove_written(self._files.written)


def _non_tensor_entries(ck, flattened: bool) -> list[tuple[str, Any]]:
    """``(key, value)`` of every non-tensor entry to write: param groups, the ``dcp`` entries,
    then other metadata flattened with dots (the conversion record, the entries' saved paths,
    ``dcp_paths``, and their form, ``dcp_keys``, left out); param groups ``flattened`` or not."""
    from ucp.dcp.metadata import group_entries, listed_param_groups

    md = ck.metadata if isinstance(ck.metadata, dict) else {}
    out = group_entries(listed_param_groups(ck, md), flattened)
    out += list((md.get("dcp") or {}).items())
    for key, value in md.items():
        if key not in ("optimizer", "dcp", "dcp_paths", "dcp_keys", "source"):
            out += _flatten(key, value)
    return out


def _flatten(prefix: str, value) -> list[tuple[str, Any]]:
    if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
        return [x for k, v in value.items() for x in _flatten(f"{prefix}.{k}", v)]
    return [(prefix, value)]
