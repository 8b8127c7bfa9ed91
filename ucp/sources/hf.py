"""Hugging Face ``save_pretrained`` checkpoints (safetensors) as a source.

One ``model.safetensors`` or shards listed by ``model.safetensors.index.json``. Every
tensor is one whole universal parameter (no parallelism), named as the files name it; the
spec (default ``converters/hf_llama.ucp``) only checks that every name is known, so an
unexpected tensor is a hard error instead of a silent pass-through. Tensors are read one
box at a time through ``safe_open(...).get_slice``: a rank converting a share of the
parameters reads only those bytes, never a whole file.

A tied ``lm_head.weight`` (``tie_word_embeddings``) is absent from the files and from the
universal checkpoint; the tie is recorded in ``metadata["hf"]["tied"]`` (alias -> the tensor
that holds it) so that the HF target leaves it out again and another target can write it.
The embedding, which holds the values, carries no ``tied_to``: that key marks an alias and
names its holder (spec/FORMAT.md §6.1), as the DCP and DeepSpeed sources write it. ``config.json`` and
``generation_config.json`` are carried into the metadata as JSON.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ucp.errors import UcpError
from ucp.sources import Source, SourceLayout, SourceParam

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_SPEC = "hf_llama"
CARRIED_JSON = ("config.json", "generation_config.json")

#: safetensors dtype codes -> torch dtype names
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
#: the tied output-layer names of the model families the bundled specs know
TIED_PAIRS = {"lm_head.weight": "model.embed_tokens.weight"}


class HFError(UcpError):
    """A Hugging Face checkpoint is incomplete or does not match its index."""


def read_json(path: Path) -> Any:
    """A small JSON file, with an error naming the file and the position."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise HFError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise HFError(f"{path}: not a JSON text file (byte {e.start} is not UTF-8)") from None


def open_safetensors(path: Path):
    """``safe_open`` of one file, its header checked (a truncated file or a damaged header is an
    error naming the file, not safetensors' own exception)."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error type for bad headers
        raise HFError(f"{path}: not a readable safetensors file, truncated or damaged? ({e})") from None


def shard_files(path: Path) -> dict[str, str]:
    """``{tensor name: file name}`` from the index, or from the single file's header."""
    index = path / INDEX_FILE
    if index.is_file():
        doc = read_json(index)
        wmap = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise HFError(f"{index}: no 'weight_map' object listing the tensors")
        for f in sorted(set(wmap.values())):
            if "/" in f or f.startswith(".") or not (path / f).is_file():
                raise HFError(f"{index}: lists shard {f!r}, which is not a file in {path}")
        return dict(wmap)
    single = path / SINGLE_FILE
    if single.is_file():
        with open_safetensors(single) as fh:
            return {k: SINGLE_FILE for k in fh.keys()}
    raise HFError(f"{path}: neither {INDEX_FILE} nor {SINGLE_FILE}; not a Hugging Face checkpoint")


def torch_dtype_of(code: str, where: str):
    """The torch dtype of a safetensors dtype code; unknown codes are refused by name."""
    import torch

    name = SAFETENSORS_DTYPES.get(code)
    if name is None or not hasattr(torch, name):
        raise HFError(f"{where}: safetensors dtype {code!r} is not supported "
                      f"(known: {', '.join(SAFETENSORS_DTYPES)})")
    return getattr(torch, name)


class HFSource(Source):
    """Reads ``save_pretrained`` safetensors checkpoints (whole tensors)."""
    name = "hf"
    description = "Hugging Face safetensors (model.safetensors or sharded with an index)"
    priority = 90

    def __init__(self, path, *, spec=None, storage_options=None, **options):
        super().__init__(path, spec=spec, storage_options=storage_options, **options)
        self.reject_options()
        self._files: dict[str, str] = {}
        self._handles: dict[str, Any] = {}

    @classmethod
    def detect(cls, path) -> bool:
        p = Path(path)
        return (p / INDEX_FILE).is_file() or (p / SINGLE_FILE).is_file()

    def _handle(self, fname: str):
        h = self._handles.get(fname)
        if h is None:
            h = self._handles[fname] = open_safetensors(self.path / fname)
        return h

    def layout(self) -> SourceLayout:
        from ucp.engine import bind_layout

        self._files = shard_files(self.path)
        shapes, dtypes = {}, {}
        for name, fname in self._files.items():
            h = self._handle(fname)
            if name not in h.keys():
                raise HFError(f"{self.path / fname}: has no tensor {name!r} (listed in {INDEX_FILE})")
            sl = h.get_slice(name)
            shapes[name] = tuple(sl.get_shape())
            dtypes[name] = torch_dtype_of(sl.get_dtype(), f"{self.path / fname}: {name}")
        bound = bind_layout(self.spec or DEFAULT_SPEC, list(shapes), {})  # lists every unknown name
        frags = {f.name: f for f in bound.rank_fragments(shapes, {})}
        metadata = self._carried_metadata(set(shapes))
        params = [SourceParam(name=n, shape=shapes[n], dtypes={"param": dtypes[n]}, fragments=[frags[n]],
                              meta={**bound.param_meta(n, shapes[n]),
                                    "fragmentation": {"layout": "hf", "file": self._files[n]}})
                  for n in shapes]
        return SourceLayout(params=params, metadata=metadata, spec_name=bound.spec_name,
                            spec_text=bound.spec.text)

    def _carried_metadata(self, names: set[str]) -> dict:
        """``{"hf": {"config": ..., "generation_config": ..., "tied": {...}}}``."""
        hf: dict[str, Any] = {}
        for fname in CARRIED_JSON:
            if (self.path / fname).is_file():
                doc = hf[fname.removesuffix(".json")] = read_json(self.path / fname)
                if not isinstance(doc, dict):
                    raise HFError(f"{self.path / fname}: holds a JSON {type(doc).__name__}, not the object "
                                  "save_pretrained writes")
        config = hf.get("config", {})
        tie = config.get("tie_word_embeddings", False)
        tied = {head: emb for head, emb in TIED_PAIRS.items() if head not in names and emb in names}
        if tied and not tie and config:
            raise HFError(f"{self.path}: {', '.join(tied)} missing from the files but config.json does "
                          "not set tie_word_embeddings")
        if tied:
            hf["tied"] = tied
        return {"hf": hf}

    def local(self, fragment, state: str):
        return self._slice(fragment, state)[tuple(slice(0, n) for n in fragment.local_shape)]

    def read(self, fragment, state: str, piece):
        """Only the bytes of ``piece`` (a safetensors slice of the tensor, no whole-file read)."""
        return self._slice(fragment, state)[piece.dst.slices()].reshape(piece.src.shape)

    def _slice(self, fragment, state: str):
        if state != "param":
            raise HFError(f"{self.describe(fragment, state)}: a Hugging Face checkpoint has no {state!r} state")
        return self._handle(self._files[fragment.local_name]).get_slice(fragment.local_name)

    def describe(self, fragment, state: str) -> str:
        return f"{self.path / self._files.get(fragment.local_name, '?')}: {state} of {fragment.name}"

    def close(self) -> None:
        self._handles.clear()
