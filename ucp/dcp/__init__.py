"""torch.distributed.checkpoint (DCP) storage over the universal format.

``UniversalReader`` and ``UniversalWriter`` plug the universal format into DCP's own
``dcp.load`` / ``dcp.save`` / ``dcp.async_save``, so a training job reads and writes universal
checkpoints with no conversion step, in whatever DTensor layout it runs::

    sd = {"model": msd, "optim": osd}               # get_state_dict(model, optimizer)
    dcp.save(sd, storage_writer=UniversalWriter(path))
    dcp.load(sd, storage_reader=UniversalReader(path))   # ANY layout, ANY world size
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])

**Keys** (:func:`parse_key` / :func:`model_key` / :func:`optim_key`, the one mapping used by
the reader, the writer, the DCP source and the DCP target). With ``get_state_dict``'s layout:

* ``model.<fqn>`` — state ``param`` of parameter ``<fqn>`` (buffers included: every key of the
  model's state dict is a parameter of the universal checkpoint);
* ``optim.state.<fqn>.<state>`` — state ``<state>`` of ``<fqn>``; 0-d states (Adam ``step``)
  are per-parameter ``scalars`` in the parameter's metadata, their dtypes in ``scalar_dtypes``;
* ``optim.param_groups.<i>.<key>`` — ``metadata["optimizer"]["param_groups"][i][key]``;
* ``optim.param_groups.<fqn>.<key>`` (``flatten_optimizer_state_dict=True``, which pipeline stages
  need: each stage's groups are numbered from 0) — the same groups, rebuilt from the
  parameters' values (:func:`regroup`), with ``metadata["optimizer"]["flattened"]`` so that
  reads and exports give back that form;
* anything else — ``metadata["dcp"][<key>]`` (values JSON-encoded, tensors as small arrays).

torchtitan's form (the model's keys at the top level, the optimizer under ``optimizer.``; also a
plain ``dcp.save(model.state_dict())``) is read into these keys at the edges
(:func:`key_form`, :func:`canonical_key`) and written back from them (:func:`form_key`).

A model tensor that is the same storage as another (tied embeddings) is stored once: the alias
is a parameter with no arrays, ``tied_to`` the one the optimizer steps (and that one's shape
and dtype), and the reader serves both keys from the one stored array. A model tensor that the
optimizer neither lists in a group nor keeps state for gets ``frozen: true``
(:func:`param_flags`).

**Reading only what is needed.** The reader describes every universal array to DCP as ONE
saved chunk covering the whole tensor; DCP's planner then asks, for each chunk of each rank's
DTensor, for exactly the region it needs (``storage_offsets`` / ``lengths``), and
:meth:`UniversalReader.read_data` hands all of a rank's regions to ``Checkpoint.read_boxes`` at
once: it touches only the zarr chunks (inner chunks of shards) they intersect, reads them on one
pool of :func:`rank_threads` threads and copies them straight into the DTensors' local shards.
DCP's ``FileSystemReader`` instead loads each whole saved chunk and narrows it (pytorch issue
76331).

**Writing from every rank.** The writer uses the several-writers protocol (FORMAT.md §13):
the coordinator picks each array's chunk grid in ``prepare_global_plan`` (aligned with every
rank's boxes where possible, so no chunk is shared), each rank writes its boxes and its part
record in ``write_data``, and the coordinator commits its own part and then the manifest in
``finish`` — which DCP calls only when every rank's ``write_data`` succeeded. A failure
anywhere (DCP's ``CheckpointException`` derives from ``BaseException``) leaves no manifest.

Modules: ``keys`` (the key forms and what each key means), ``metadata`` (param groups, scalars
and flags: the non-tensor side), ``reader`` and ``writer`` (the two storage classes),
``saveplan`` (the coordinator's pure planning of a save: arrays, chunk grids, who writes each
document), ``threads`` (threads per rank, one rule for both).
"""
from __future__ import annotations

from ucp.dcp.keys import (KEY_FORMS, MODEL, OPTIM_STATE, PARAM_GROUPS, DcpKey, canonical_key, check_form, form_key,
                          key_form, model_key, optim_key, parse_key, planner_path)

#: the storage classes, imported on first use: ``ucp.dcp.keys`` (pure string rules) serves the
#: command line's help without importing torch
_LAZY = {"UniversalReader": "reader", "UniversalWriter": "writer", "rank_threads": "threads",
         "MAX_RANK_THREADS": "threads"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"ucp.dcp.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'ucp.dcp' has no attribute {name!r}")

__all__ = ["UniversalReader", "UniversalWriter", "rank_threads", "MAX_RANK_THREADS", "KEY_FORMS", "DcpKey",
           "parse_key", "key_form", "check_form", "canonical_key", "form_key", "model_key", "optim_key",
           "planner_path", "MODEL", "OPTIM_STATE", "PARAM_GROUPS"]
