"""``ucp.convert``: pick the source reader for a checkpoint and run it.

Detection looks only at file names and small index files, never at pickles. Sources that
have not landed yet fail with a clear message instead of guessing.
"""
from __future__ import annotations

from pathlib import Path

from ucp.errors import UcpError

#: source name -> "module:function"; None = planned, not implemented in this version.
SOURCES = {
    "ranks": "ucp.layout_ranks:convert_ranks",
    "deepspeed": None,
    "deepspeed-universal": None,
    "dcp": None,
    "megatron": None,
    "hf": None,
}


def detect(src) -> str:
    """Name the layout of ``src`` from its file names alone."""
    p = Path(src)
    if not p.exists():
        raise UcpError(f"{src}: no such file or directory")
    if (p / "layout.json").is_file():
        return "ranks"
    if (p / ".metadata").is_file() and any(p.glob("*.distcp")):
        return "dcp"
    if (p / "metadata.json").is_file() and (p / "common.pt").is_file():
        return "megatron"
    if any(p.glob("*model_states.pt")) or (p / "latest").is_file():
        return "deepspeed"
    if (p / "zero").is_dir() and any((p / "zero").iterdir()):
        return "deepspeed-universal"
    if (p / "model.safetensors.index.json").is_file() or (p / "model.safetensors").is_file():
        return "hf"
    raise UcpError(f"{src}: cannot tell which framework wrote this checkpoint; pass --from "
                   f"({'|'.join(SOURCES)})")


def convert(src, dst, source="auto", spec=None, **kwargs):
    from ucp.registry import resolve

    name = detect(src) if source in (None, "auto") else source
    try:
        fn = resolve(SOURCES, name, "source")
    except UcpError as e:
        raise UcpError(f"{src}: {e}") from None
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return fn(src, dst, spec=spec, **kwargs)
