"""Crafting manifests for tests: edit the JSON of a committed checkpoint and write it back with
a valid checksum, so that only the check under test can refuse it."""
import json

from ucp.format import manifest as M


def rewrite_manifest(root, edit):
    """Apply ``edit(doc)`` to ``root``'s manifest and re-sign it (``ucp.format.manifest.dump``)."""
    path = root / "ucp.manifest.json"
    doc = json.loads(path.read_bytes())
    doc.pop("crc32c")
    edit(doc)
    path.write_bytes(M.dump(doc))
