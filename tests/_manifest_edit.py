"""Crafting manifests for tests: edit the JSON of a committed checkpoint and write it back with
a valid checksum, so that only the check under test can refuse it."""
import json

from ucp.format import manifest as M


def rewrite_manifest(root, edit, rel="ucp.manifest.json"):
    """Apply ``edit(doc)`` to ``root``'s manifest (or to another file written by
    ``ucp.format.manifest.dump``, such as a part record ``_ucp/parts/<rank>.json``) and re-sign it."""
    path = root / rel
    doc = json.loads(path.read_bytes())
    doc.pop("crc32c")
    edit(doc)
    path.write_bytes(M.dump(doc))
