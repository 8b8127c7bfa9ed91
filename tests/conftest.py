"""Shared fixtures (kept small)."""
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def manifest_schema():
    """The manifest JSON schema, or skip when spec/metadata.schema.json is absent."""
    p = ROOT / "spec" / "metadata.schema.json"
    if not p.exists():
        pytest.skip("spec/metadata.schema.json not present")
    return json.loads(p.read_text())


@pytest.fixture
def check_manifest(manifest_schema):
    """Validate the manifest of a committed checkpoint against spec/metadata.schema.json."""
    import jsonschema

    def check(path):
        raw = (pathlib.Path(path) / "ucp.manifest.json").read_bytes()
        jsonschema.validate(json.loads(raw), manifest_schema)

    return check


def validate_manifest(path):
    """Validate ``path``/ucp.manifest.json against the schema (usable outside fixtures)."""
    import jsonschema

    schema = json.loads((ROOT / "spec" / "metadata.schema.json").read_text())
    jsonschema.validate(json.loads((pathlib.Path(path) / "ucp.manifest.json").read_bytes()), schema)


@pytest.fixture(autouse=True)
def _schema_checks_format_manifests(request):
    """Every checkpoint a test_format_* test leaves under tmp_path must match the manifest schema."""
    if not request.module.__name__.split(".")[-1].startswith("test_format_"):
        yield
        return
    tmp_path = request.getfixturevalue("tmp_path")
    yield
    for m in tmp_path.rglob("ucp.manifest.json"):
        try:
            json.loads(m.read_bytes())
        except ValueError:
            continue  # a corruption test may leave a deliberately broken manifest
        validate_manifest(m.parent)
