"""The manifest ``ucp.manifest.json``: canonical JSON whose first member is its own crc32c."""
from __future__ import annotations

import json

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
