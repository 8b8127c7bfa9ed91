"""The CI rule of tests/conftest.py: under CI=true a skipped test (also a whole module skipped
at import) fails the run unless tests/skip_allowlist.txt lists it; outside CI a skip stays a skip."""
import pathlib

pytest_plugins = ["pytester"]

CONFTEST = pathlib.Path(__file__).resolve().parent / "conftest.py"

SKIPPING = """
import pytest

def test_runs():
    assert 1 + 1 == 2

def test_skips():
    pytest.skip("a server did not start")

def test_allowed():
    pytest.skip("listed with a reason")
"""


def _project(pytester):
    tests = pytester.path / "tests"
    tests.mkdir(exist_ok=True)
    (tests / "conftest.py").write_text(CONFTEST.read_text())
    (tests / "test_s.py").write_text(SKIPPING)
    (tests / "test_m.py").write_text("import pytest\npytest.importorskip('no_such_module_ucp')\n")
    (tests / "skip_allowlist.txt").write_text("# documented\ntests/test_s.py::test_allowed  # the reason\n")


def test_unlisted_skips_fail_the_run_under_ci(pytester, monkeypatch):
    _project(pytester)
    monkeypatch.setenv("CI", "true")
    res = pytester.runpytest_inprocess("-q", "tests")
    assert res.ret == 1
    res.assert_outcomes(passed=1, skipped=3)
    out = res.stdout.str()
    assert "SKIPPED (not in tests/skip_allowlist.txt): tests/test_s.py::test_skips: " in out
    assert "a server did not start" in out
    assert "SKIPPED (not in tests/skip_allowlist.txt): tests/test_m.py: " in out  # module-level skip
    assert "test_allowed" not in out.split("skips are failures under CI=true")[1]


def test_listed_skips_pass_under_ci_and_skips_pass_outside_ci(pytester, monkeypatch):
    _project(pytester)
    (pytester.path / "tests" / "test_m.py").unlink()
    (pytester.path / "tests" / "test_s.py").write_text(SKIPPING.replace('pytest.skip("a server did not start")', "pass"))
    monkeypatch.setenv("CI", "true")
    res = pytester.runpytest_inprocess("-q", "tests")
    assert res.ret == 0
    res.assert_outcomes(passed=2, skipped=1)
    _project(pytester)
    monkeypatch.delenv("CI")
    res = pytester.runpytest_inprocess("-q", "tests")
    assert res.ret == 0
    res.assert_outcomes(passed=1, skipped=3)
