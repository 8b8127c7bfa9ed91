"""The manifest ``ucp.manifest.json``: canonical JSON whose first member is its own crc32c."""
from __future__ import annotations

import json
import re

import crc32c

from ucp.errors import FormatError, NotCommittedError
from ucp.format.layout import canonical

FORMAT_VERSION = 1
_PREFIX = b'{"crc32c":'


def dump(body: dict) -> bytes:
    """Serialize ``body`` canonically and prepend its checksum member.

    With sorted keys "crc32c" is the first member, so the file is exactly
    ``{"crc32c":<n>,`` + canonical(body)[1:], and n = crc32c(canonical(body)).
    """
    if "crc32c" in body:
        raise ValueError("manifest body must not contain crc32c")
    c = canonical(body)
    n = crc32c.crc32c(c)
    out = _PREFIX + str(n).encode() + b"," + c[1:]
    assert out == canonical({**body, "crc32c": n}), "crc32c must sort first"
    return out


def load(raw: bytes, where: str) -> dict:
    doc = load_verified(raw, where)
    if not isinstance(doc, dict) or doc.get("format") != "ucp":
        raise FormatError(f"{where}: not a ucp manifest")
    v = doc.get("format_version")
    if not isinstance(v, int) or v > FORMAT_VERSION:
        raise FormatError(f"{where}: format_version {v!r} is newer than this reader supports ({FORMAT_VERSION})")
    check_structure(doc, where)
    return doc


def load_verified(raw: bytes, where: str):
    """Parse a file written by ``dump`` after checking its leading crc32c member (manifest, part record)."""
    if not raw.startswith(_PREFIX):
        raise FormatError(f"{where}: malformed manifest (does not start with {_PREFIX.decode()})")
    comma = raw.find(b",", len(_PREFIX))
    digits = raw[len(_PREFIX):comma]
    if comma < 0 or not digits.isdigit():
        raise FormatError(f"{where}: malformed manifest checksum member")
    body = b"{" + raw[comma + 1:]
    got = crc32c.crc32c(body)
    if int(digits) != got:
        raise FormatError(f"{where}: manifest checksum mismatch (recorded {int(digits)}, computed {got}): "
                          "the manifest is corrupt")
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise FormatError(f"{where}: manifest is not valid JSON: {e}") from None
    return doc


def not_committed(path) -> NotCommittedError:
    return NotCommittedError(
        f"{path} is not a committed ucp checkpoint: no ucp.manifest.json (incomplete or still being written)")


# A checksum proves a manifest is intact, not that it is benign: a crafted one could point a reader
# at files outside the checkpoint ("../../x") or at absurd shapes. Every path and number a reader
# acts on is checked here, before any of it is used.
_SEG = re.compile(r"[A-Za-z0-9_%-][A-Za-z0-9._%-]*|\.[A-Za-z0-9_%-][A-Za-z0-9._%-]*|\.\.[A-Za-z0-9._%-]+")
_KEY = re.compile(r"c(/[0-9]+)*")


def _safe_rel(p) -> bool:
    return isinstance(p, str) and 0 < len(p) < 4096 and all(_SEG.fullmatch(seg) for seg in p.split("/"))


def _ints(x, lo) -> bool:
    return isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= lo for i in x)


def _check_array(rec, where, what, prefix):
    from ucp.format import dtypes

    if not isinstance(rec, dict):
        raise FormatError(f"{where}: {what}: array record is not an object")
    path = rec.get("path")
    if not _safe_rel(path) or (prefix is not None and path != prefix):
        raise FormatError(f"{where}: {what}: unsafe or unexpected array path {path!r}")
    shape, chunks, inner = rec.get("shape"), rec.get("chunks"), rec.get("inner_chunks")
    if not _ints(shape, 0) or not _ints(chunks, 1) or len(chunks) != len(shape):
        raise FormatError(f"{where}: {what}: bad shape {shape!r} or chunks {chunks!r}")
    if inner is not None and (not _ints(inner, 1) or len(inner) != len(shape)
                              or any(c % i for c, i in zip(chunks, inner))):
        raise FormatError(f"{where}: {what}: bad inner_chunks {inner!r} for chunks {chunks!r}")
    try:
        dtypes.torch_dtype(rec.get("dtype"))
    except Exception:
        raise FormatError(f"{where}: {what}: unknown dtype {rec.get('dtype')!r}") from None
    table = rec.get("chunk_table")
    if not isinstance(table, dict) or not all(isinstance(k, str) and _KEY.fullmatch(k) for k in table):
        raise FormatError(f"{where}: {what}: malformed chunk_table keys")


def check_structure(doc: dict, where: str) -> None:
    params = doc.get("params")
    if not isinstance(params, list):
        raise FormatError(f"{where}: 'params' is not a list")
    for p in params:
        if not isinstance(p, dict) or not isinstance(p.get("name"), str) or not _safe_rel(p.get("path")) \
                or "/" in p["path"] or not isinstance(p.get("states"), dict):
            raise FormatError(f"{where}: malformed parameter record {str(p)[:120]!r}")
        for st, rec in p["states"].items():
            if not isinstance(st, str) or not _safe_rel(st) or "/" in st:
                raise FormatError(f"{where}: parameter {p['name']!r}: unsafe state name {st!r}")
            _check_array(rec, where, f"parameter {p['name']!r} state {st!r}", f"{p['path']}/{st}")
    for key, rec in (doc.get("meta_arrays") or {}).items():
        if not (isinstance(key, str) and key.startswith("_ucp/meta/") and _safe_rel(key)):
            raise FormatError(f"{where}: unsafe metadata array path {key!r}")
        _check_array(rec, where, f"metadata array {key!r}", key)
    files = doc.get("files") or {}
    if not isinstance(files, dict) or not all(_safe_rel(k) for k in files):
        raise FormatError(f"{where}: unsafe path in 'files'")
