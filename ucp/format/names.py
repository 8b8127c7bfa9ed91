"""Parameter and state names <-> zarr node names."""
from __future__ import annotations

import hashlib
import re

from ucp.errors import UcpError

_SAFE = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_PLAIN = re.compile(r"[A-Za-z0-9._-]+")
RESERVED_FILES = {"zarr.json", "ucp.manifest.json", "ucp.manifest.json.tmp"}
#: the longest node name encoding keeps whole: file systems allow 255 bytes a name (NAME_MAX)
MAX_NODE = 200
_KEPT = 160     # bytes of a longer encoding kept before "~" and the name's hash


def check_param_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise UcpError(f"parameter name must be a non-empty string, got {name!r}")
    if name.startswith("_ucp") or name.startswith("__"):
        raise UcpError(f"parameter name {name!r} is reserved: names may not start with '_ucp' or '__'")


def encode_param(name: str) -> str:
    """Percent-encode every byte outside [A-Za-z0-9._-] (UTF-8), and dots of all-dot names."""
    check_param_name(name)
    if _PLAIN.fullmatch(name):  # the common case, no character to encode
        enc = name
    else:
        enc = "".join(ch if ch in _SAFE else "".join(f"%{b:02X}" for b in ch.encode("utf-8")) for ch in name)
    if set(enc) == {"."}:
        enc = "%2E" * len(enc)
    if enc in RESERVED_FILES:
        enc = enc.replace(".", "%2E")
    if len(enc) > MAX_NODE:   # "~" is never in an encoding otherwise: no name's node is another's
        head = re.sub(r"%[0-9A-F]?$", "", enc[:_KEPT])
        enc = f"{head}~{hashlib.sha256(name.encode('utf-8')).hexdigest()[:32]}"
    return enc


# One name per line that ``encode_param`` leaves as it is: plain characters, not reserved by its prefix,
# not all dots (a reserved file name is plain too: ``all_encode_to_themselves`` refuses those by set).
_SELF = r"(?!_ucp|__|\.++(?:\n|\Z))[A-Za-z0-9._-]++"
_SELVES = re.compile(rf"{_SELF}(?:\n{_SELF})*+")


def all_encode_to_themselves(names) -> bool:
    """``encode_param(n) == n`` for every name, in one regex call over the names joined by newlines: a
    manifest's parameter paths are almost always their names, and one ``encode_param`` call each costs
    more at open than this whole check (2000 names: 1.4 -> 0.2 ms)."""
    names = list(names)
    if not names or set(map(type, names)) != {str} or max(map(len, names)) > MAX_NODE:
        return False
    joined = "\n".join(names)
    return (joined.count("\n") == len(names) - 1 and RESERVED_FILES.isdisjoint(names)
            and _SELVES.fullmatch(joined) is not None)


def decode_param(enc: str) -> str:
    from urllib.parse import unquote

    return unquote(enc, encoding="utf-8", errors="strict")


def check_state_name(state: str) -> None:
    if (not isinstance(state, str) or not state or state[0] in "._-" or state.startswith("__")
            or not set(state) <= _SAFE or state in RESERVED_FILES):
        raise UcpError(
            f"state name {state!r} is invalid: use letters, digits, '_', '.', '-' "
            "(not starting with '.', '_' or '-', not 'zarr.json')")
