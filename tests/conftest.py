"""Shared fixtures (kept small), the Hypothesis profile, and the CI rule that a skip is a failure."""
import json
import os
import pathlib

import pytest
from hypothesis import settings

ROOT = pathlib.Path(__file__).resolve().parents[1]
SKIP_ALLOWLIST = ROOT / "tests" / "skip_allowlist.txt"

# No wall-clock deadline for any property test: a loaded CI machine must not fail them.
settings.register_profile("ucp", deadline=None)
# bench/mutation.py: the same examples on every run, so a mutant's verdict repeats.
settings.register_profile("mutation", deadline=None, derandomize=True, database=None)
settings.load_profile(os.environ.get("UCP_HYPOTHESIS_PROFILE", "ucp"))


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


# -- skips are failures in CI ----------------------------------------------------------------
# Under CI=true a test that was skipped (or xfailed) fails the run unless its node id, or its
# module's path, is listed in tests/skip_allowlist.txt with a reason. A skip that nobody chose
# (a server that did not start, a framework that did not import) must not pass unnoticed.

def _allowed_skips():
    """Node ids (or module paths) listed in the allow-list; comments and blank lines ignored."""
    if not SKIP_ALLOWLIST.exists():
        return set()
    lines = (ln.split("#", 1)[0].strip() for ln in SKIP_ALLOWLIST.read_text().splitlines())
    return {ln for ln in lines if ln}


def _is_allowed(nodeid, allowed):
    return nodeid in allowed or nodeid.split("::", 1)[0] in allowed


_SKIPPED: list = []


def _record_skip(report):
    if report.skipped:
        reason = getattr(report, "wasxfail", None)
        if reason is None and isinstance(report.longrepr, tuple):
            reason = report.longrepr[2]
        _SKIPPED.append((report.nodeid, str(reason)))


def pytest_runtest_logreport(report):
    _record_skip(report)


def pytest_collectreport(report):
    _record_skip(report)  # module-level skips (importorskip, allow_module_level=True)


def _ci():
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_sessionfinish(session, exitstatus):
    if not _ci():
        return
    allowed = _allowed_skips()
    bad = [(n, r) for n, r in _SKIPPED if not _is_allowed(n, allowed)]
    if bad and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if not _ci():
        return
    allowed = _allowed_skips()
    bad = [(n, r) for n, r in _SKIPPED if not _is_allowed(n, allowed)]
    if bad:
        terminalreporter.section("skips are failures under CI=true", sep="=", red=True)
        for nodeid, reason in bad:
            terminalreporter.line(f"SKIPPED (not in tests/skip_allowlist.txt): {nodeid}: {reason}")
