"""The package as a user installs it: a wheel built from this checkout, installed into a fresh
virtual environment outside the checkout, runs ``ucp demo`` to PASS — so the grammar and the
bundled specs travel as package data and nothing is read from the source tree.

The venv sees the machine's site-packages (``--system-site-packages``) so torch, zarr and
the rest come from the machine; the wheel is installed with ``--no-deps --no-index``.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env=None, timeout=600):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_wheel_installs_into_a_fresh_venv_and_the_demo_passes(tmp_path):
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    # build from a copy of what the sdist holds, so that no build/ or egg-info (and no stale
    # module left in an old build/) touches the checkout or the wheel
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(CHECKOUT / name, src / name)
    shutil.copytree(CHECKOUT / "ucp", src / "ucp", ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", tmp_path / "dist", src], cwd=tmp_path, env=clean)
    (wheel,) = (tmp_path / "dist").glob("ucp-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], cwd=tmp_path, env=clean)
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q", wheel],
         cwd=tmp_path, env=clean)
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([py, "-c", "import ucp, ucp.lang; print(ucp.__file__); print(ucp.lang.GRAMMAR)"],
                 cwd=work, env=clean).split()
    assert all(Path(p).is_relative_to(venv) for p in where), where
    out = _run([venv / "bin" / "ucp", "demo"], cwd=work, env={**clean, "OMP_NUM_THREADS": "1"})
    assert "ucp demo: PASS" in out, out[-3000:]
    names = _run([venv / "bin" / "ucp", "export", "--help"], cwd=work, env=clean)
    assert "ranks" in names
